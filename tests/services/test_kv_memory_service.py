"""The per-node KV memory service under real Ray: workers in separate processes share it (a block one
evicted, another loads), it survives a restart with its SSD blocks, a torn SSD write is never served, and
pinned slots are released by readers or reclaimed by lease."""

import os
import signal
import time

import pytest
import ray
import torch
from ray_helpers import TierWorker

from services.kv_memory.service import NAMESPACE, KVMemoryService, shutdown_services
from services.transport import KVLayout

pytestmark = pytest.mark.ray

ENGINE = {"num_blocks": 8, "max_model_len": 256}
PROMPT = list(range(30, 30 + 5 * 16 + 3))  # 5 full blocks
FILLER = list(range(200, 200 + 7 * 16))  # needs the whole 8-block pool: evicts PROMPT's blocks


class _Spares:
    """TierWorker processes started ahead (imported, no worker built yet): a test's worker is built in one
    that is already up, and a new spare starts in its place while the tests go on, up to `total` in all
    (past that, take() starts one when asked)."""

    def __init__(self, count: int, total: int):
        self.ready = [TierWorker.remote() for _ in range(count)]
        self.left = total - count

    def take(self):
        if self.left > 0:
            self.ready.append(TierWorker.remote())
            self.left -= 1
        return self.ready.pop(0) if self.ready else TierWorker.remote()


@pytest.fixture(scope="module")
def spares(ray_serve):
    pool = _Spares(2, total=8)  # the module's tests build 8 workers: 2 + 2, then 2 and 2 (a, later b)
    yield pool
    for actor in pool.ready:
        ray.kill(actor)


@pytest.fixture
def services(spares):
    """Each test starts without KV memory services and leaves none behind."""
    shutdown_services()
    workers = []
    yield spares, workers
    for w in workers:
        ray.get(w.close.remote(), timeout=60)
        ray.kill(w)
    shutdown_services()


def _service():
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith("kv-memory-")
    ]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace=NAMESPACE)


def _start(services, llama, tiers, kv_transport="nixl", count=1):
    """count workers built side by side, each in a spare process; returns the worker (or the list of them)."""
    spares, workers = services
    started = [spares.take() for _ in range(count)]
    workers.extend(started)
    ray.get([w.start.remote(llama, ENGINE, tiers, kv_transport) for w in started], timeout=120)
    return started[0] if count == 1 else started


def _evict_prompt(worker):
    """Serve PROMPT, push its blocks out of HBM into the service, wait until the service holds them."""
    reference, computed = ray.get(worker.run.remote(PROMPT), timeout=120)
    assert computed == len(PROMPT)
    ray.get(worker.run.remote(FILLER), timeout=120)
    ray.get(worker.flush.remote(), timeout=60)
    return reference


def _push_prompt_to_ssd(worker):
    """Another prompt's blocks go through the service: what DRAM still held of PROMPT moves to SSD."""
    ray.get(worker.run.remote([t % 100 + 250 for t in range(7 * 16)]), timeout=120)  # evicts FILLER
    ray.get(worker.flush.remote(), timeout=60)


@pytest.mark.parametrize("use_shm", [True, False], ids=["shared-memory", "nixl"])
def test_a_block_one_worker_evicted_is_loaded_by_another(services, llama, use_shm):
    tiers = {"dram_blocks": 32, "service": True, "staging_blocks": 16, "use_shm": use_shm}
    a, b = _start(services, llama, tiers, count=2)
    reference = _evict_prompt(a)
    tokens, computed = ray.get(b.run.remote(PROMPT), timeout=120)  # b never saw this prompt
    assert tokens == reference
    assert computed == len(PROMPT) - 5 * 16  # every full block came from the service
    stats = ray.get(b.stats.remote())
    path = "shm" if use_shm else "transport"
    assert stats["kv_store"]["loads_by_path"][path] >= 1 and stats["kv_tier_loaded_blocks"] == 5
    service = ray.get(_service().stats.remote())
    assert service["ingest_by_path"][path] >= 1 and service["dram_blocks"] >= 5
    deadline = time.monotonic() + 10  # b released what it read: nothing stays pinned
    while ray.get(_service().stats.remote())["dram_pinned_blocks"]:
        assert time.monotonic() < deadline, "slots still pinned after the load"
        time.sleep(0.05)


def test_restarted_service_still_finds_its_ssd_blocks(services, llama, tmp_path):
    tiers = {"dram_blocks": 2, "ssd_dir": str(tmp_path), "ssd_blocks": 64, "service": True}
    a = _start(services, llama, tiers)
    reference = _evict_prompt(a)  # DRAM holds 2 blocks: the rest went down to SSD
    _push_prompt_to_ssd(a)
    service = _service()
    before = ray.get(service.info.remote())
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # Ray restarts it (max_restarts=-1); the new incarnation reopens the SSD tier
        try:
            info = ray.get(service.info.remote(), timeout=5)
            if info.incarnation != before.incarnation:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "service did not come back"
        time.sleep(0.2)
    stats = ray.get(service.stats.remote())
    assert stats["dram_blocks"] == 0 and stats["ssd_blocks"] >= 5  # DRAM died with the process
    b = _start(services, llama, tiers)
    tokens, computed = ray.get(b.run.remote(PROMPT), timeout=120)
    assert tokens == reference and computed == len(PROMPT) - 5 * 16  # all 5 blocks read back from SSD
    assert ray.get(service.stats.remote())["tier_ssd_hits"] >= 5
    # the first worker's client keeps working against the new incarnation
    tokens_a, _ = ray.get(a.run.remote(PROMPT), timeout=120)
    assert tokens_a == reference


def test_torn_ssd_write_of_a_killed_service_is_recomputed_never_served(services, llama, tmp_path):
    tiers = {"dram_blocks": 1, "ssd_dir": str(tmp_path), "ssd_blocks": 64, "service": True}
    a = _start(services, llama, tiers)
    reference = _evict_prompt(a)
    _push_prompt_to_ssd(a)
    service = _service()
    info = ray.get(service.info.remote())
    slab = next(tmp_path.rglob("slab.bin"))
    os.kill(info.pid, signal.SIGKILL)  # killed; its last block writes are torn below
    block_bytes = info.layout.block_bytes
    os.truncate(slab, block_bytes + 100)  # only the first slot survives whole
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(service.info.remote(), timeout=5).incarnation != info.incarnation:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "service did not come back"
        time.sleep(0.2)
    b = _start(services, llama, tiers)
    tokens, computed = ray.get(b.run.remote(PROMPT), timeout=120)
    assert tokens == reference  # identical output: damaged blocks were computed, not loaded
    assert computed >= len(PROMPT) - 16  # at most the one intact block came back
    assert ray.get(service.stats.remote())["ssd_corrupt_blocks"] >= 1


def test_pins_are_released_by_readers_or_reclaimed_by_lease(ray_serve):
    layout = KVLayout((2, 2, 16, 2, 8), "bfloat16")
    svc = KVMemoryService(
        "kv-memory-test",
        layout.block_shape,
        layout.dtype,
        dram_blocks=4,
        kv_transport="ray",
        use_shm=True,
        lease_ttl_s=0.3,
    )
    try:
        hashes = [i.to_bytes(16, "little") for i in range(6)]
        data = torch.randn(6, *layout.block_shape, dtype=torch.bfloat16)
        for i in range(4):
            svc.store.put(hashes[i], data[i].reshape(-1).view(torch.uint8))
        handle = svc.acquire(hashes[:3] + [hashes[5]])  # the run stops at the first missing block
        assert len(handle.block_ids) == 3 and svc.store.dram.num_pinned == 3
        for i in (4, 5):  # DRAM is full: only the unpinned block may be evicted, then nothing can go
            svc.store.put(hashes[i], data[i].reshape(-1).view(torch.uint8))
        assert all(h in svc.store.dram for h in hashes[:3]) and len(svc.store.dram) == 4
        assert svc.release(handle.handle_id) and svc.store.dram.num_pinned == 0
        assert not svc.release(handle.handle_id)  # a second release changes nothing
        svc.acquire(hashes[:2])  # nobody releases this one
        deadline = time.monotonic() + 10
        while svc.store.dram.num_pinned:
            assert time.monotonic() < deadline, "lease not reclaimed"
            time.sleep(0.05)
        assert svc.stats()["leases_reclaimed"] == 1
        for slot, h in zip(handle.block_ids, hashes[:3], strict=True):  # bytes intact through it all
            i = hashes.index(h)
            assert torch.equal(svc.store.dram.typed[slot], data[i])
    finally:
        svc.close()
    assert not os.path.exists(svc.shm.path)  # the shared-memory pool is gone with the service


def test_bad_service_configuration_is_a_clear_error(ray_serve, tmp_path):
    layout = KVLayout((2, 2, 16, 2, 8), "bfloat16")
    with pytest.raises(ValueError, match="capacity_blocks"):
        KVMemoryService("kv-memory-bad", layout.block_shape, layout.dtype, dram_blocks=0, kv_transport="ray")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        KVMemoryService(
            "kv-memory-bad",
            layout.block_shape,
            layout.dtype,
            dram_blocks=2,
            ssd_dir=str(tmp_path / "file" / "sub"),
            ssd_blocks=4,
            kv_transport="ray",
        )
    with pytest.raises(ValueError, match="lowest_tier"):
        KVMemoryService(
            "kv-memory-bad",
            layout.block_shape,
            layout.dtype,
            dram_blocks=2,
            kv_transport="ray",
            policy={0: "tape"},
        )


def test_serve_app_with_node_kv_memory_reads_an_evicted_prefix_back(services, deploy, llama):
    """The deployed app (`kv_memory="node"`): replicas start the node's service and use it."""
    import httpx
    from ray_helpers import MODEL, POOL, app_config, pool_stats

    pool = {
        **POOL,
        "engine": {"num_blocks": 8, "max_model_len": 256},
        "kv_dram_blocks": 32,
        "kv_memory": "node",
    }
    url = deploy("kvnode", **app_config(llama, mode="aggregated", decode=pool))

    def complete(prompt):
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=120,
            json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        return r.json()

    first = complete(PROMPT)
    complete(FILLER)  # evicts PROMPT's blocks from the replica's 8-block pool
    again = complete(PROMPT)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 * 16
    (stats,) = pool_stats("kvnode", "DecodeWorker", 1).values()
    assert stats["kv_store"]["loads_by_path"]["shm"] == 1 and stats["kv_tier_loaded_blocks"] == 5
    assert ray.get(_service().stats.remote())["ingested_blocks"] >= 5
