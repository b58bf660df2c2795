"""KV transports: checksums, leases, and real NIXL transfers over UCX between two processes."""

import multiprocessing as mp
import os
import time

import pytest
import torch
from transport_owner import BLOCK_SHAPE, owner_pool, serve

from services.transport import KVLayout, TransferError, make_transport
from services.transport.checksum import block_checksums
from services.transport.leases import LeaseTable

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only, in this process and the owner it spawns


def test_checksum_changes_with_any_word():
    pool = torch.randn(4, 64, dtype=torch.bfloat16)
    before = block_checksums(pool, [0, 1, 2, 3])
    pool[2, 63] += 1
    after = block_checksums(pool, [0, 1, 2, 3])
    assert [a == b for a, b in zip(before, after, strict=True)] == [True, True, False, True]


def test_checksum_sees_swapped_words():
    pool = torch.arange(32, dtype=torch.float32).reshape(2, 16)
    swapped = pool.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    assert block_checksums(pool, [0])[0] != block_checksums(swapped, [0])[0]


def test_lease_table_releases_and_reclaims():
    now = [0.0]
    leases = LeaseTable(ttl_s=5.0, clock=lambda: now[0])
    leases.grant("h1", "r1")
    leases.grant("h2", "r2")
    assert leases.end("h1").request_id == "r1" and leases.end("h1") is None
    now[0] = 4.9
    assert leases.expired() == []
    now[0] = 5.0
    assert [lease.request_id for lease in leases.expired()] == ["r2"] and len(leases) == 0
    with pytest.raises(ValueError, match="ttl_s"):
        LeaseTable(ttl_s=0)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="kv_transport"):
        make_transport("carrier-pigeon")


@pytest.fixture(scope="module")
def owner():
    """A second process owning a registered pool of 32 blocks, driven over a pipe."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(there, 32, 1234), daemon=True)
    proc.start()

    def ask(*command, timeout=30.0):
        here.send(command)
        if not here.poll(timeout):
            raise AssertionError(f"owner did not answer {command[0]!r}")
        return here.recv()

    yield ask
    ask("stop")
    proc.join(timeout=10)


@pytest.fixture(scope="module")
def puller():
    transport = make_transport("nixl")
    transport.register(torch.zeros((16, *BLOCK_SHAPE)))
    yield transport
    transport.close()


def test_nixl_pull_between_processes_is_byte_exact(owner, puller):
    src = [3, 0, 31, 17]
    handle = owner("handle", src)
    assert handle.backend == "nixl" and handle.layout == KVLayout(BLOCK_SHAPE, "float32")
    puller.pull(handle, [5, 6, 7, 8])
    expected = owner_pool(32, 1234)[src]
    assert torch.equal(puller.pool[[5, 6, 7, 8]], expected)
    puller.release(handle)
    deadline = time.monotonic() + 10
    while handle.handle_id not in owner("released"):
        assert time.monotonic() < deadline, "release notification never reached the owner"
        time.sleep(0.05)


def test_nixl_corrupted_block_is_detected_then_retry_succeeds(owner, puller):
    handle = owner("handle", [9, 10])
    owner("corrupt", 10)
    with pytest.raises(TransferError, match="checksum mismatch in 1 of 2"):
        puller.pull(handle, [0, 1])
    owner("restore", 10)
    puller.pull(handle, [0, 1])
    assert torch.equal(puller.pool[[0, 1]], owner_pool(32, 1234)[[9, 10]])


def test_nixl_rejects_mismatched_layout_and_length(owner, puller):
    handle = owner("handle", [1, 2])
    with pytest.raises(TransferError, match="length mismatch"):
        puller.pull(handle, [0])
    other = make_transport("nixl")
    other.register(torch.zeros((4, 2, 2, 16, 2, 4)))
    try:
        with pytest.raises(TransferError, match="layout mismatch"):
            other.pull(handle, [0, 1])
    finally:
        other.close()
