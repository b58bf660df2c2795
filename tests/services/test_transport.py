"""KV transports: checksums, leases, and real NIXL transfers over UCX between two processes."""

import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from transport_owner import BLOCK_SHAPE, owner_pool, pull, serve

from services.transport import KVLayout, TransferError
from services.transport.checksum import block_checksums
from services.transport.factory import make_transport
from services.transport.leases import LeaseTable

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # loopback only, in this process and the owner it spawns


@pytest.mark.parametrize("algorithm", ["crc32", "wsum64"])
def test_checksum_changes_with_any_word(algorithm):
    pool = torch.randn(4, 64, dtype=torch.bfloat16)
    before = block_checksums(pool, [0, 1, 2, 3], algorithm)
    pool[2, 63] += 1
    after = block_checksums(pool, [0, 1, 2, 3], algorithm)
    assert [a == b for a, b in zip(before, after, strict=True)] == [True, True, False, True]


@pytest.mark.parametrize("algorithm", ["crc32", "wsum64"])
def test_checksum_sees_swapped_words(algorithm):
    pool = torch.arange(32, dtype=torch.float32).reshape(2, 16)
    swapped = pool.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    assert block_checksums(pool, [0], algorithm)[0] != block_checksums(swapped, [0], algorithm)[0]


def test_unknown_checksum_algorithm():
    with pytest.raises(ValueError, match="checksum algorithm"):
        block_checksums(torch.zeros(1, 4), [0], "md4")


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


def spawn(target, *args):
    """Run target(conn, *args) in a fresh process; returns ask(*command) and a stopper."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=target, args=(there, *args), daemon=True)
    proc.start()
    answered, stopped = [], []

    def ask(*command, timeout=30.0):
        here.send(command)
        # the first answer waits for the process to start too (several start side by side: see `started`)
        if not here.poll(timeout if answered else max(timeout, 120.0)):
            raise AssertionError(f"{target.__name__} process did not answer {command[0]!r}")
        answered.append(True)
        return here.recv()

    def stop():
        if not stopped:  # once: a test stops its own process, the module's end the rest
            stopped.append(True)
            ask("stop")
            proc.join(timeout=10)

    return ask, stop


# every NIXL process of the module, by name, with its arguments: started side by side when the first NIXL
# test runs (each is a fresh interpreter importing torch and NIXL: seconds), each used by one test or fixture
KV_SCALES = torch.tensor([[[0.01, 0.02], [0.03, 0.005]], [[0.02, 0.01], [0.004, 0.05]]])  # [layers, 2, heads]


def _processes() -> dict[str, tuple]:
    from transport_owner import CODED

    from engine.kv.coded_pool import CodedFormat

    other_seed = CodedFormat(4, 6, 2, 16, 2, 8)
    return {
        "owner": (serve, 32, 1234),
        "puller": (pull, 16),
        "coded_owner": (serve, 32, 555, None, 8),
        "layout_puller": (pull, 4, (2, 2, 16, 2, 4)),
        "fp8_puller": (pull, 8, BLOCK_SHAPE, KV_SCALES),
        "unscaled_fp8_puller": (pull, 4, BLOCK_SHAPE, None, True),
        "fp8_owner": (serve, 16, 77, KV_SCALES),
        "coded_puller": (pull, 16, BLOCK_SHAPE, None, False, (CODED, 8)),
        "other_seed_puller": (pull, 8, BLOCK_SHAPE, KV_SCALES, False, (other_seed, 4)),
    }


@pytest.fixture(scope="module")
def started():
    """name -> (ask, stop) of every process in _processes(), all started now; those left are stopped at the
    module's end, side by side."""
    procs = {name: spawn(*spec) for name, spec in _processes().items()}
    yield procs
    with ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(lambda p: p[1](), procs.values()))


@pytest.fixture(scope="module")
def owner(started):
    """A process owning a registered pool of 32 blocks, driven over a pipe."""
    return started["owner"][0]


@pytest.fixture(scope="module")
def puller(started):
    """A second process with its own 16-block pool that pulls handles it is given."""
    return started["puller"][0]


def test_nixl_pull_between_processes_is_byte_exact(owner, puller):
    src = [3, 0, 31, 17]
    handle = owner("handle", src)
    assert handle.backend == "nixl" and handle.layout == KVLayout(BLOCK_SHAPE, "float32")
    status, blocks = puller("pull", handle, [5, 6, 7, 8])
    assert status == "ok" and torch.equal(blocks, owner_pool(32, 1234)[src])
    deadline = time.monotonic() + 10
    while handle.handle_id not in owner("released"):  # the puller released it after verifying
        assert time.monotonic() < deadline, "release notification never reached the owner"
        time.sleep(0.05)


def test_nixl_corrupted_block_is_detected_then_retry_succeeds(owner, puller):
    handle = owner("handle", [9, 10])
    owner("corrupt", 10)
    status, message = puller("pull", handle, [0, 1])
    assert status == "error" and "checksum mismatch in 1 of 2" in message
    owner("restore", 10)
    status, blocks = puller("pull", handle, [0, 1])
    assert status == "ok" and torch.equal(blocks, owner_pool(32, 1234)[[9, 10]])


def test_nixl_pulls_only_the_tail_of_a_handle(owner, puller):
    handle = owner("handle", [20, 21, 22]).tail(2)
    status, blocks = puller("pull", handle, [3])
    assert status == "ok" and torch.equal(blocks, owner_pool(32, 1234)[[22]])


def test_nixl_rejects_mismatched_length(owner, puller):
    handle = owner("handle", [1, 2])
    status, message = puller("pull", handle, [0])
    assert status == "error" and "length mismatch" in message


def test_nixl_rejects_mismatched_layout(owner, started):
    ask, stop = started["layout_puller"]
    try:
        status, message = ask("pull", owner("handle", [1, 2]), [0, 1])
        assert status == "error" and "layout mismatch" in message
    finally:
        stop()


def test_nixl_pull_converts_16_bit_blocks_into_an_fp8_pool(owner, started):
    """A float32 owner, an e4m3 puller: the bytes as sent are verified in staging, then converted to the
    puller's scales; a block damaged in transit is still caught before any conversion."""
    from transport_owner import fp8_blocks

    ask, stop = started["fp8_puller"]
    try:
        src = [4, 30, 11]
        status, blocks = ask("pull", owner("handle", src), [6, 1, 2])
        assert status == "ok" and blocks.dtype == torch.float8_e4m3fn
        want = fp8_blocks(owner_pool(32, 1234)[src], KV_SCALES)
        assert torch.equal(blocks.view(torch.uint8), want.view(torch.uint8))
        assert ask("converted") == 3
        handle = owner("handle", [12, 13])
        owner("corrupt", 13)
        status, message = ask("pull", handle, [0, 3])
        assert status == "error" and "checksum mismatch in 1 of 2" in message
        owner("restore", 13)
    finally:
        stop()


def test_nixl_pull_refuses_to_convert_into_an_fp8_pool_without_scales(owner, started):
    ask, stop = started["unscaled_fp8_puller"]
    try:
        status, message = ask("pull", owner("handle", [1]), [0])
        assert status == "error" and "its scales are not set" in message
    finally:
        stop()


def test_nixl_pull_reads_fp8_blocks_back_into_a_16_bit_pool(puller, started):
    from transport_owner import fp8_blocks

    ask, stop = started["fp8_owner"]
    try:
        handle = ask("handle", [2, 9])
        assert handle.layout.dtype == "float8_e4m3fn" and handle.kv_scales == KV_SCALES.tolist()
        status, blocks = puller("pull", handle, [10, 11])
        stored = fp8_blocks(owner_pool(16, 77)[[2, 9]], KV_SCALES)
        want = stored.float() * KV_SCALES[:, :, None, :, None]
        assert status == "ok" and torch.equal(blocks, want)
        assert puller("converted") == 2
    finally:
        stop()


@pytest.fixture(scope="module")
def coded_owner(started):
    """An owner whose 32-block pool is followed by 8 coded blocks (ids 32..39), as an aging engine's is."""
    return started["coded_owner"][0]


def test_nixl_coded_blocks_travel_as_they_are(coded_owner, started):
    """A handle mixing 16-bit and coded blocks: each block lands in the puller's pool of its format, byte for
    byte; a coded block damaged in transit is caught like any other."""
    from transport_owner import CODED, coded_blocks

    ask, stop = started["coded_puller"]
    try:
        handle = coded_owner("handle", [3, 33, 0, 38])
        assert handle.block_formats == [0, 1, 0, 1] and handle.coded_layouts[0].coded == CODED
        assert handle.num_bytes == 2 * handle.layout.block_bytes + 2 * CODED.block_bytes
        assert ask("coded", handle) == [-1, 0, -1, 0]
        status, blocks = ask("pull", handle, [5, 16 + 2, 6, 16 + 7])
        assert status == "ok", blocks
        base, raw = owner_pool(32, 555), coded_blocks(8, 555)
        assert torch.equal(blocks[0], base[3]) and torch.equal(blocks[2], base[0])
        assert torch.equal(blocks[1], raw[1]) and torch.equal(blocks[3], raw[6])
        assert ask("converted") == 0
        coded_owner("corrupt", 38)
        status, message = ask("pull", handle, [5, 16 + 2, 6, 16 + 7])
        assert status == "error" and "checksum mismatch in 1 of 2" in message
        coded_owner("restore", 38)
        status, message = ask("pull", handle, [5, 6, 7, 8])  # coded blocks into 16-bit ids: decoded
        assert status == "ok" and ask("converted") == 2
    finally:
        stop()


def test_nixl_decodes_coded_blocks_where_the_puller_has_no_pool_of_their_format(coded_owner, puller, started):
    """A puller with no coded pool (or one of another seed) decodes coded blocks into its base pool after
    verifying them as sent; into an e4m3 pool they are then quantized to its scales."""
    from transport_owner import CODED, coded_blocks, fp8_blocks

    handle = coded_owner("handle", [35, 4, 32])
    assert puller("coded", handle) == [-1, -1, -1]
    status, blocks = puller("pull", handle, [0, 1, 2])
    decoded = CODED.decode(coded_blocks(8, 555))
    assert status == "ok" and torch.equal(blocks[0], decoded[3]) and torch.equal(blocks[2], decoded[0])
    assert torch.equal(blocks[1], owner_pool(32, 555)[4])
    assert ((blocks[0] - owner_pool(8, 556)[3]).norm() / blocks[0].norm()) < 0.15  # 4 bits of the original

    ask, stop = started["other_seed_puller"]  # a coded pool of CodedFormat(4, 6, 2, 16, 2, 8): another seed
    try:
        assert ask("coded", handle) == [-1, -1, -1]
        status, message = ask("pull", handle, [8, 1, 2])  # a coded id of another format
        assert status == "error" and "layout mismatch" in message
        status, blocks = ask("pull", handle, [0, 1, 2])
        assert status == "ok" and ask("converted") == 3
        want = fp8_blocks(decoded[[3, 0]], KV_SCALES)
        got = torch.stack([blocks[0], blocks[2]])
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    finally:
        stop()


@ray.remote(num_cpus=0)
class _RayOwner:
    """Owns a pool in its own process and hands out Ray-object-store handles."""

    def __init__(self):
        self.transport = make_transport("ray")
        self.transport.register(owner_pool(64, 99))

    def handle(self, block_ids):
        return self.transport.handle(block_ids, num_tokens=len(block_ids) * BLOCK_SHAPE[2])


@pytest.mark.ray
def test_ray_transport_between_processes(ray_serve):
    owner = _RayOwner.remote()
    puller = make_transport("ray")
    puller.register(torch.zeros((32, *BLOCK_SHAPE)))
    handle = ray.get(owner.handle.remote([6, 2]))
    assert handle.backend == "ray" and not puller.holds_source_blocks
    puller.pull(handle, [1, 3])
    assert torch.equal(puller.pool[[1, 3]], owner_pool(64, 99)[[6, 2]])

    part = ray.get(owner.handle.remote([6, 2, 5])).tail(1)  # the puller already holds block 6's KV
    puller.pull(part, [10, 11])
    assert torch.equal(puller.pool[[10, 11]], owner_pool(64, 99)[[2, 5]])

    tampered = ray.get(owner.handle.remote([5, 7]))
    tampered.checksums[1] ^= 1  # what a block damaged in flight looks like to the puller
    with pytest.raises(TransferError, match="checksum mismatch in 1 of 2"):
        puller.pull(tampered, [0, 1])

    big = ray.get(owner.handle.remote(list(range(32))))  # 128 KiB: in the object store, not inlined
    ray.kill(owner)
    deadline = time.monotonic() + 30
    while True:  # ray.kill is asynchronous: a call may still be served until the actor is gone
        try:
            ray.get(owner.handle.remote([0]), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "owner still alive 30 s after ray.kill"
        time.sleep(0.05)
    try:  # Ray may keep a dead owner's object on this node; then it must still verify byte-exact
        puller.pull(big, list(range(32)), timeout_s=10)
        assert torch.equal(puller.pool, owner_pool(64, 99)[:32])
    except TransferError as e:
        assert "unavailable" in str(e)


def test_cuda_ipc_copies_coalesce_consecutive_blocks():
    from services.transport.block_copy import runs as _runs

    assert _runs([4, 5, 6, 9, 2, 3], [0, 1, 2, 3, 7, 8]) == [(4, 0, 3), (9, 3, 1), (2, 7, 2)]
    assert _runs([], []) == []


def test_cpu_pools_never_take_the_cuda_ipc_path(owner):
    handle = owner("handle", [1])
    assert handle.source["cuda_ipc"] is None  # only GPU pools are exported for IPC
