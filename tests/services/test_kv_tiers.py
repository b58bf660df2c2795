"""DRAM and SSD tiers: bit-exact round trips, LRU eviction, restart, torn writes never served, concurrency,
bad configuration."""

import os
import random
import threading

import pytest
import torch

from services.kv_memory.dram_tier import DramTier
from services.kv_memory.ssd_tier import SsdTier
from services.kv_memory.tiered_store import TieredKVStore
from services.messages.pools import TierSettings

BLOCK = 4096


def block(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_dram_round_trip_and_lru_eviction():
    tier = DramTier(capacity_blocks=2, block_bytes=BLOCK, pin=False)
    assert tier.put(h(1), block(1)) == [] and tier.put(h(2), block(2)) == []
    assert torch.equal(tier.get(h(1)), block(1))  # 1 is now the most recently used
    evicted = tier.put(h(3), block(3))
    assert [e[0] for e in evicted] == [h(2)] and torch.equal(evicted[0][1], block(2))
    assert tier.get(h(2)) is None and len(tier) == 2


def test_hbm_to_dram_to_ssd_and_back_is_bit_exact(tmp_path):
    hbm = torch.randn(4, 2, 16, 2, 8, dtype=torch.bfloat16)  # four KV blocks
    raw = hbm.view(4, -1).view(torch.uint8)
    dram = DramTier(capacity_blocks=1, block_bytes=raw.shape[1], pin=False)
    ssd = SsdTier(tmp_path, capacity_blocks=8, block_bytes=raw.shape[1])
    for i in range(4):  # each put demotes the previous block to SSD
        for old_hash, data, _ in dram.put(h(i), raw[i]):
            ssd.put(old_hash, data.numpy().tobytes())
    back = torch.empty_like(hbm)
    back.view(4, -1).view(torch.uint8)[3] = dram.get(h(3))
    for i in range(3):
        back.view(4, -1).view(torch.uint8)[i] = torch.frombuffer(bytearray(ssd.get(h(i))), dtype=torch.uint8)
    assert torch.equal(back, hbm)


def test_ssd_blocks_survive_a_restart(tmp_path):
    tier = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    for i in range(6):  # 2 evictions
        tier.put(h(i), block(i).numpy().tobytes())
    tier.close()
    again = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert sorted(int.from_bytes(k, "little") for k in again._entries) == [2, 3, 4, 5]
    assert all(again.get(h(i)) == block(i).numpy().tobytes() for i in range(2, 6))


def test_torn_slab_write_is_detected_and_never_served(tmp_path):
    tier = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    for i in range(3):
        tier.put(h(i), block(i).numpy().tobytes())
    tier.close()
    os.truncate(tmp_path / "slab.bin", 2 * tier.slot_bytes + 100)  # the third block was torn mid-write
    again = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert again.get(h(2)) is None and again.corrupt_blocks == 1
    assert h(2) not in again and again.get(h(0)) == block(0).numpy().tobytes()
    again.close()
    assert h(2) not in SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)  # the drop is durable


def test_damaged_byte_is_detected(tmp_path):
    tier = SsdTier(tmp_path, capacity_blocks=2, block_bytes=BLOCK)
    tier.put(h(7), block(7).numpy().tobytes())
    fd = os.open(tmp_path / "slab.bin", os.O_RDWR)
    os.pwrite(fd, b"\xff", 123)
    os.close(fd)
    assert tier.get(h(7)) is None and tier.corrupt_blocks == 1


def test_torn_index_record_ends_the_replay(tmp_path):
    tier = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    tier.put(h(1), block(1).numpy().tobytes())
    tier.put(h(2), block(2).numpy().tobytes())
    tier.close()
    log = tmp_path / "index.log"
    os.truncate(log, log.stat().st_size - 5)  # the crash hit the second record's append
    again = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert h(1) in again and h(2) not in again
    again.put(h(3), block(3).numpy().tobytes())  # appends after the good prefix
    again.close()
    third = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert third.get(h(3)) == block(3).numpy().tobytes() and third.get(h(1)) == block(1).numpy().tobytes()


def test_log_compaction_keeps_every_live_block(tmp_path):
    tier = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK, sync=False)
    for i in range(200):
        tier.put(h(i), block(i % 7).numpy().tobytes())
    assert (tmp_path / "index.log").stat().st_size <= (4 * 4 + 64 + 1) * 33
    tier.close()
    again = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert [again.get(h(i)) == block(i % 7).numpy().tobytes() for i in range(196, 200)] == [True] * 4


@pytest.mark.parametrize("tier_kind", ["dram", "ssd"])
def test_concurrent_readers_and_writers_lose_nothing(tmp_path, tier_kind):
    capacity = 16
    tier = (
        DramTier(capacity, BLOCK, pin=False)
        if tier_kind == "dram"
        else SsdTier(tmp_path, capacity, BLOCK, sync=False)
    )
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            i = rng.randrange(40)
            if rng.random() < 0.5:
                tier.put(h(i), block(i) if tier_kind == "dram" else block(i).numpy().tobytes())
            else:
                got = tier.get(h(i))
                want = block(i) if tier_kind == "dram" else block(i).numpy().tobytes()
                if got is not None and not (torch.equal(got, want) if tier_kind == "dram" else got == want):
                    errors.append(i)
            if len(tier) > capacity:
                errors.append("over capacity")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(tier) <= capacity
    if tier_kind == "ssd":  # every slot is used by at most one entry
        slots = [slot for slot, _ in tier._entries.values()]
        assert len(slots) == len(set(slots))


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="capacity_blocks"):
        SsdTier(tmp_path, capacity_blocks=0, block_bytes=BLOCK)
    with pytest.raises(ValueError, match="capacity_blocks"):
        DramTier(capacity_blocks=0, block_bytes=BLOCK)
    with pytest.raises(ValueError, match="more than this machine"):
        DramTier(capacity_blocks=2**40, block_bytes=2**20)
    SsdTier(tmp_path / "t", capacity_blocks=4, block_bytes=BLOCK).close()
    with pytest.raises(ValueError, match="holds a tier"):
        SsdTier(tmp_path / "t", capacity_blocks=8, block_bytes=BLOCK)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        SsdTier(tmp_path / "file" / "sub", capacity_blocks=4, block_bytes=BLOCK)


def _prefix_run(llama, store, **options):
    """Serve a long prompt, push its blocks out of an 8-block HBM pool, then serve it again."""
    from engine import LLM, SamplingParams

    llm = LLM(llama, num_blocks=8, kv_store=store, **options)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))  # 5 full blocks
    first = llm.generate([prompt], params)[0]
    llm.generate([list(range(200, 200 + 7 * 16))], params)  # needs the whole pool: evicts the prefix
    engine = llm.engine
    if store is not None and hasattr(store, "flush"):
        engine.offloader.drain()
        store.flush()
    before = engine.stats.prompt_tokens_computed
    again = llm.generate([prompt], params)[0]
    return first, again, engine.stats.prompt_tokens_computed - before, engine


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_evicted_prefix_is_served_from_dram(llama, async_scheduling):
    """With async scheduling too: blocks freed under a step in flight are loaded into only after it."""
    from services.kv_memory.tiered_store import TieredKVStore

    first, again, computed, engine = _prefix_run(
        llama, TieredKVStore(DramTier(64, _block_bytes(llama), pin=False)), async_scheduling=async_scheduling
    )
    _, _, computed_without, _ = _prefix_run(llama, None)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert computed_without == 83 and computed == 83 - 5 * 16  # all 5 blocks came back from DRAM
    assert engine.offloader.stats.loaded_blocks == 5


def test_aging_pool_offloads_and_loads_its_16_bit_blocks(llama):
    """With a KV age policy the blocks go down to DRAM as they are cached (16-bit, before they age), come
    back on a later hit, and the request ages them again: the same tokens as the first time."""
    from engine.kv.age_policy import KVAgePolicy
    from services.kv_memory.tiered_store import TieredKVStore

    policy = KVAgePolicy(bits=4, sinks=16, window=16)
    store = TieredKVStore(DramTier(64, _block_bytes(llama), pin=False))
    first, again, computed, engine = _prefix_run(llama, store, kv_age_policy=policy)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert computed == 83 - 5 * 16 and engine.offloader.stats.loaded_blocks == 5
    assert engine.stats.kv_blocks_aged >= 2 * 3  # the prompt's blocks 1-3 aged each time
    assert engine.block_manager.num_used_coded_blocks == 0


def test_aged_blocks_go_down_coded_and_come_back_coded(llama):
    """A coded pool with tiers of its own: an aged block that took a cached block's hash goes down as it is
    (codes and norms), and a later request loads it back into a coded block where its policy holds that
    block coded and the 16-bit tier has lost it. It then runs exactly as when the coded copies were still in
    HBM: the same tokens, the same logprobs, the same tokens computed."""
    from engine import LLM, SamplingParams
    from engine.kv.age_policy import KVAgePolicy

    policy = KVAgePolicy(bits=4, sinks=0, window=16)  # a prompt of 83 tokens holds blocks 0-3 coded
    coded_stores = []

    def factory(pool, events, coded=None):
        if coded is not None:
            coded_stores.append(TieredKVStore(DramTier(64, coded.block_bytes, pin=False)))
            return coded_stores[-1]
        store = TieredKVStore(DramTier(1, pool[0].numel() * pool.element_size(), pin=False))  # keeps one
        store.events = events
        return store

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    runs = []
    for options in (
        {"num_coded_blocks": 64},  # the coded copies stay in HBM
        {"num_coded_blocks": 4, "kv_store_factory": factory},  # the next prompt's aging takes their blocks
    ):
        llm = LLM(llama, num_blocks=8, kv_age_policy=policy, **options)
        llm.generate([prompt], params)
        llm.generate([list(range(200, 200 + 7 * 16))], params)  # needs every 16-bit block
        engine = llm.engine
        engine.offloader.drain()
        before = engine.stats.prompt_tokens_computed
        again = llm.generate([prompt], params)[0].outputs[0]
        runs.append((again.token_ids, again.logprobs, engine.stats.prompt_tokens_computed - before))
        bm = engine.block_manager
        assert bm.num_free_blocks == 8 and bm.num_used_coded_blocks == 0
    assert runs[1] == runs[0] and runs[0][2] == 83 - 4 * 16
    assert engine.offloader.stats.loaded_coded_blocks == 4 and engine.offloader.stats.loaded_blocks == 4
    assert coded_stores[0].stats["dram_hits"] == 4 and len(coded_stores[0].dram) >= 4 + 4


def test_evicted_prefix_is_served_from_ssd(llama, tmp_path):
    from services.kv_memory.tiered_store import TieredKVStore

    store = TieredKVStore(
        DramTier(1, _block_bytes(llama), pin=False), SsdTier(tmp_path, 64, _block_bytes(llama))
    )
    first, again, computed, _ = _prefix_run(llama, store)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert computed == 83 - 5 * 16 and store.stats["ssd_hits"] >= 4
    # what the worker's metrics read: blocks served by tier, and the DRAM -> SSD demotions behind them
    served = store.served_blocks()
    assert served["ssd"] == store.stats["ssd_hits"] and served["dram"] + served["ssd"] == 5
    assert store.demoted_blocks() >= served["ssd"]
    store.close()


def test_fp8_blocks_go_down_to_ssd_and_come_back_bit_for_bit(llama, tmp_path):
    """An e4m3 pool's blocks keep their format below HBM (half a bf16 block's bytes): evicted to DRAM and
    SSD, loaded back, they are the bytes that were written, and the answer does not change."""
    from engine import LLM, SamplingParams

    fp8_bytes = LLM(llama, num_blocks=1, kv_cache_dtype="fp8").engine.kv_pool[0].nbytes
    assert fp8_bytes * 4 == _block_bytes(llama)  # e4m3 against the tiny model's float32
    store = TieredKVStore(DramTier(2, fp8_bytes, pin=False), SsdTier(tmp_path, 64, fp8_bytes))
    llm = LLM(llama, num_blocks=8, kv_store=store, kv_cache_dtype="fp8")
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    first = llm.generate([prompt], params)[0]
    table = [engine.block_manager.cached_block_id(h) for h in _prompt_hashes(engine, prompt)]
    written = engine.kv_pool[table].clone()
    llm.generate([list(range(200, 200 + 7 * 16))], params)  # evicts the prompt's blocks
    engine.offloader.drain()
    store.flush()
    before = engine.stats.prompt_tokens_computed
    again = llm.generate([prompt], params)[0]
    assert engine.stats.prompt_tokens_computed - before == 3 and store.stats["ssd_hits"] >= 3
    loaded = [engine.block_manager.cached_block_id(h) for h in _prompt_hashes(engine, prompt)]
    assert torch.equal(engine.kv_pool[loaded].view(torch.uint8), written.view(torch.uint8))
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    store.close()


def _prompt_hashes(engine, prompt: list[int]) -> list[bytes]:
    from engine.kv.block_hash import prompt_block_hashes

    return prompt_block_hashes(prompt, engine.block_manager.block_size, engine._hash_extra(None))


def test_damaged_ssd_block_is_recomputed_not_served(llama, tmp_path):
    from services.kv_memory.tiered_store import TieredKVStore

    store = TieredKVStore(
        DramTier(1, _block_bytes(llama), pin=False), SsdTier(tmp_path, 64, _block_bytes(llama))
    )
    from engine import LLM, SamplingParams

    llm = LLM(llama, num_blocks=8, kv_store=store)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    first = llm.generate([prompt], params)[0]
    llm.generate([list(range(200, 200 + 7 * 16))], params)
    llm.engine.offloader.drain()
    store.flush()
    os.truncate(tmp_path / "slab.bin", 0)  # every block on SSD is torn
    before = llm.engine.stats.prompt_tokens_computed
    again = llm.generate([prompt], params)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # only what DRAM still held could be loaded; the torn SSD blocks were recomputed
    assert llm.engine.stats.prompt_tokens_computed - before >= 83 - 16 and store.ssd.corrupt_blocks >= 1
    store.close()


def _block_bytes(llama) -> int:
    from engine.llm_engine import LLMEngine

    engine = LLMEngine.from_pretrained(llama, num_blocks=1)
    return engine.kv_pool[0].numel() * engine.kv_pool.element_size()


def test_workers_attach_their_tiers_from_the_pool_config(llama, tmp_path):
    from services.app import PoolConfig, ServeConfig
    from services.decode import DecodeWorker

    pool = PoolConfig(engine={"num_blocks": 16}, kv_dram_blocks=8, kv_ssd_dir=str(tmp_path), kv_ssd_blocks=32)
    classes = [
        {"name": "interactive", "priority": 0, "ttft_ms": 500, "tpot_ms": 50, "lowest_tier": "dram"},
        {"name": "standard", "priority": 1, "ttft_ms": 2000, "tpot_ms": 100},
        {"name": "batch", "priority": 2, "ttft_ms": 60000, "tpot_ms": 1000, "lowest_tier": "hbm"},
    ]
    config = ServeConfig(model=llama, decode=pool, slo_classes=classes)
    worker = DecodeWorker(llama, pool.engine, kv_transport="ray", kv_tiers=config.kv_tiers(config.decode))
    try:
        store = worker.engine.offloader.store
        assert store.dram.capacity_blocks == 8 and store.ssd.capacity_blocks == 32
        assert store.ssd.dir.parent == tmp_path  # a directory of its own under the configured one
        policy = store.policy  # each SLO class's lowest tier
        assert policy.allows(0, "dram") and not policy.allows(0, "ssd") and not policy.allows(2, "dram")
        assert policy.allows(1, "ssd")
    finally:
        worker.llm.shutdown()
    aging = {"num_blocks": 16, "num_coded_blocks": 16, "kv_age_policy": {"bits": 4, "window": 32}}
    worker = DecodeWorker(llama, aging, kv_transport="ray", kv_tiers=config.kv_tiers(config.decode))
    try:  # a coded pool gets tiers of its own, as many blocks of its size
        (entry,) = worker.engine.offloader.coded
        coded, block_bytes = entry.store, worker.engine.coded_kv.pools[0].block_bytes()
        assert coded.dram.capacity_blocks == 8 and coded.dram.block_bytes == block_bytes
        assert coded.ssd.capacity_blocks == 32 and coded.ssd.dir.parent == tmp_path
        assert coded.ssd.dir != worker.engine.offloader.store.ssd.dir
        read = worker._metrics_read()  # what Prometheus scrapes: the coded tiers by format
        assert read.tier_formats == {("dram", "turboquant4"): 0, ("ssd", "turboquant4"): 0}
    finally:
        worker.llm.shutdown()
    with pytest.raises(ValueError, match="lowest_tier"):
        ServeConfig(
            model=llama, slo_classes=[{**classes[0], "lowest_tier": "tape"}], slo_default="interactive"
        )
    with pytest.raises(ValueError, match="slo_classes"):
        ServeConfig(model=llama, slo_classes=[{"name": "x", "priority": 0}], slo_default="x")
    with pytest.raises(ValueError, match="slo default"):
        ServeConfig(model=llama, slo_classes=classes[:1])
    with pytest.raises(ValueError, match="kv_ssd_dir"):
        PoolConfig(kv_ssd_dir=str(tmp_path)).kv_tiers()
    with pytest.raises(ValueError, match="kv_ssd_blocks"):
        DecodeWorker(
            llama,
            {"num_blocks": 16},
            kv_transport="ray",
            kv_tiers=TierSettings(dram_blocks=4, ssd_dir=str(tmp_path / "x"), ssd_blocks=0),
        )


def test_with_hbm_full_batch_blocks_are_offloaded_before_interactive_ones(llama):
    from engine import LLM, SamplingParams
    from services.kv_memory.tiered_store import TieredKVStore

    store = TieredKVStore(DramTier(32, _block_bytes(llama), pin=False))
    llm = LLM(llama, num_blocks=12, kv_store=store, scheduling_policy="priority")
    one = SamplingParams(temperature=0, max_tokens=1)
    interactive, batch = list(range(10, 58)), list(range(100, 148))  # 3 full blocks each
    llm.generate([interactive], one, priority=[0])
    llm.generate([batch], one, priority=[2])  # freed last: plain LRU would evict "interactive" first
    engine = llm.engine
    engine.kv_events.drain()
    llm.generate([list(range(200, 328))], one)  # needs 8 blocks: 6 empty ones and 2 cached ones
    evicted = [
        h for e in engine.kv_events.drain() if (e.kind, e.tier) == ("removed", "hbm") for h in e.block_hashes
    ]

    def hashes(prompt):
        probe = engine.kv_handoff.reserve(
            "probe", len(prompt), prompt
        )  # reports HBM hits without keeping them
        engine.kv_handoff.free_reserved("probe")
        return probe.num_cached_blocks

    # the batch prompt's two tail blocks left HBM (tail first), already in DRAM (written through after
    # their step); every interactive block stayed in HBM
    assert len(evicted) == 2 and all(h in store.dram for h in evicted)
    assert hashes(interactive) == 3
    assert hashes(batch) == 1  # its head block is still in HBM


def test_free_queue_hands_out_empty_blocks_before_evicting():
    from engine.kv.free_block_queue import FreeBlockQueue

    q = FreeBlockQueue(range(0))
    q.push(1, cached=True, priority=0)
    q.push(2, cached=True, priority=5)
    q.push(3, cached=False, priority=0)
    q.push(4, cached=True, priority=5)
    q.remove(4)  # reused as a prefix hit
    assert [q.pop() for _ in range(3)] == [(3, None), (2, 5), (1, 0)] and len(q) == 0


def test_tier_policy_limits_how_far_down_a_class_goes(tmp_path):
    from services.kv_memory.tier_policy import TierPolicy
    from services.kv_memory.tiered_store import TieredKVStore

    policy = TierPolicy(lowest_tier={0: "dram", 1: "hbm"})  # interactive: DRAM at most; 1: never offloaded
    store = TieredKVStore(DramTier(1, BLOCK, pin=False), SsdTier(tmp_path, 8, BLOCK), policy)
    store.put(h(1), block(1), priority=1)
    assert h(1) not in store.dram and store.stats["dropped"] == 1
    store.put(h(2), block(2), priority=0)
    store.put(h(3), block(3), priority=2)  # evicts 2 from DRAM: an interactive block may not go to SSD
    store.put(h(4), block(4), priority=0)  # evicts 3: batch goes down to SSD
    store.flush()
    assert h(2) not in store.ssd and h(3) in store.ssd and store.stats["dropped"] == 2
    assert torch.equal(store.get(h(3)), block(3))
    store.close()
    with pytest.raises(ValueError, match="lowest_tier"):
        TierPolicy(lowest_tier={0: "tape"})


def test_kv_events_follow_blocks_across_tiers(llama, tmp_path):
    from engine import LLM, SamplingParams

    store = TieredKVStore(
        DramTier(4, _block_bytes(llama), pin=False), SsdTier(tmp_path, 16, _block_bytes(llama))
    )
    llm = LLM(llama, num_blocks=8, kv_store=store)
    one = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([list(range(10, 58))], one)  # 3 full blocks, written through to DRAM
    llm.engine.offloader.drain()  # on a GPU the copies down are launched and land asynchronously
    store.flush()
    events = llm.engine.kv_events.drain()
    assert (events[0].kind, events[0].tier, len(events[0].block_hashes)) == ("stored", "hbm", 3)
    stored = events[0].block_hashes
    llm.generate([list(range(100, 227))], one)  # 8 blocks (7 full): evicts the 3 from HBM, and from DRAM
    llm.engine.offloader.drain()
    store.flush()
    by = {}
    for e in events + llm.engine.kv_events.drain():
        by.setdefault((e.kind, e.tier), []).extend(e.block_hashes)
    assert sorted(by[("removed", "hbm")]) == sorted(stored) and len(by[("stored", "hbm")]) == 3 + 7
    # the first prompt's blocks went HBM -> DRAM -> SSD, and whatever DRAM let go is on SSD
    assert set(stored) <= set(by[("stored", "dram")]) and set(stored) <= set(by[("stored", "ssd")])
    assert sorted(by[("stored", "ssd")]) == sorted(by[("removed", "dram")])
    assert all(h in store.ssd for h in stored)
    store.close()


class _GatedStore(TieredKVStore):
    """A DRAM store whose loads wait for a gate: a slow tier, to watch the engine while a load runs."""

    def __init__(self, dram):
        super().__init__(dram)
        self.gate = threading.Event()

    def load(self, block_hashes, pool, block_ids):
        assert self.gate.wait(60), "gate never opened"
        return super().load(block_hashes, pool, block_ids)


def test_engine_steps_other_requests_while_a_kv_load_runs_and_abort_frees_its_blocks(llama):
    from engine import LLM, SamplingParams
    from engine.request import EngineRequest, RequestStatus

    store = _GatedStore(DramTier(64, _block_bytes(llama), pin=False))
    store.gate.set()
    llm = LLM(llama, num_blocks=8, kv_store=store)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    llm.generate([prompt], params)
    llm.generate([list(range(200, 200 + 7 * 16))], params)  # the prompt's 5 blocks go to DRAM
    store.gate.clear()
    engine.add_request(EngineRequest("slow", prompt, params))
    engine.step()
    assert engine.scheduler.loading["slow"].status is RequestStatus.LOADING_KV
    engine.add_request(
        EngineRequest(
            "other", list(range(300, 310)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        )
    )
    finished = []
    for _ in range(50):  # the other request runs to completion while the load is stuck
        finished += [o.request_id for o in engine.step() if o.finished]
        if finished:
            break
    assert finished == ["other"] and "slow" in engine.scheduler.loading
    engine.abort_request("slow")
    engine.step()
    assert engine.block_manager.num_free_blocks < 8  # the loader may still write its blocks: kept
    store.gate.set()
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == 8
    engine.offloader.close()


def test_a_block_evicted_before_its_write_through_goes_down_as_it_was():
    """A coded block cached and evicted within one step (its pool reused it before the step's write-through):
    the store gets the bytes it held under that hash, never the slot's next content."""
    from engine.kv.offload import KVOffloader

    pool = torch.randn(4, 2, 16, 2, 8)
    store = TieredKVStore(DramTier(8, pool[0].numel() * 4, pin=False))
    offloader = KVOffloader(store, pool)
    held = pool[1].clone()
    offloader.on_cached(1, b"h" * 16)
    offloader.on_evict(1, b"h" * 16)  # the pool hands block 1 out again in the same step
    pool[1] = 0.0  # its next content
    offloader.write_through()
    out = torch.zeros_like(pool)
    assert store.load([b"h" * 16], out, [2]) == 1 and torch.equal(out[2], held)
    assert offloader.stats.offloaded_blocks == 1  # put once, at the eviction; nothing left for later
    offloader.close()


def test_an_abort_during_a_coded_load_gives_every_block_back(llama):
    """A load from a coded tier that is still running when its request is aborted: the coded blocks it
    fills (and the 16-bit ones they replace) come back once the loader is done with them."""
    from engine import LLM, SamplingParams
    from engine.kv.age_policy import KVAgePolicy
    from engine.request import EngineRequest, RequestStatus

    coded_store = None

    def factory(pool, events, coded=None):
        nonlocal coded_store
        if coded is None:
            return TieredKVStore(DramTier(1, pool[0].numel() * pool.element_size(), pin=False))
        coded_store = _GatedStore(DramTier(64, coded.block_bytes, pin=False))
        coded_store.gate.set()
        return coded_store

    policy = KVAgePolicy(bits=4, sinks=0, window=16)
    llm = LLM(llama, num_blocks=8, num_coded_blocks=4, kv_age_policy=policy, kv_store_factory=factory)
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    llm.generate([prompt], params)
    llm.generate([list(range(200, 200 + 7 * 16))], params)
    engine.offloader.drain()
    assert coded_store is not None
    coded_store.gate.clear()
    engine.add_request(EngineRequest("slow", prompt, params))
    engine.step()
    assert engine.scheduler.loading["slow"].status is RequestStatus.LOADING_KV
    engine.abort_request("slow")
    engine.step()
    coded_store.gate.set()
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    bm = engine.block_manager
    assert not engine.has_unfinished_requests() and bm.num_free_blocks == 8 and bm.num_used_coded_blocks == 0
    assert engine.offloader.stats.loads == 1 and engine.offloader.stats.loaded_coded_blocks == 4
    engine.offloader.close()


def test_a_failed_kv_load_means_recompute_with_identical_output(llama):
    from engine import LLM, SamplingParams

    class Failing(TieredKVStore):
        def load(self, block_hashes, pool, block_ids):
            raise OSError("tier went away")

    store = Failing(DramTier(64, _block_bytes(llama), pin=False))
    llm = LLM(llama, num_blocks=8, kv_store=store)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    first = llm.generate([prompt], params)[0]
    llm.generate([list(range(200, 200 + 7 * 16))], params)
    before = llm.engine.stats.prompt_tokens_computed
    again = llm.generate([prompt], params)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.stats.prompt_tokens_computed - before == len(prompt)
    assert llm.engine.offloader.stats.load_failures == 1


def test_ssd_promotion_reads_in_parallel_and_stops_at_a_damaged_block(tmp_path):
    store = TieredKVStore(DramTier(8, BLOCK, pin=False), SsdTier(tmp_path, 8, BLOCK))
    for i in range(6):
        store.ssd.put(h(i), block(i).numpy().tobytes())
    fd = os.open(tmp_path / "slab.bin", os.O_RDWR)
    os.pwrite(fd, b"\x00\x01", 3 * store.ssd.slot_bytes + 64)  # block 3 (slot 3) damaged
    os.close(fd)
    slots = store.acquire([h(i) for i in range(6)])
    assert (
        len(slots) == 3
        and [torch.equal(store.dram.pool[s], block(i)) for i, s in enumerate(slots)] == [True] * 3
    )
    store.release(slots)
    assert store.ssd.corrupt_blocks == 1 and h(3) not in store.ssd and h(3) not in store.dram
    assert all(h(i) in store.dram for i in (4, 5))  # read intact in the same round: kept, unpinned
    assert store.dram.num_pinned == 0
    pool = torch.zeros(6, BLOCK, dtype=torch.uint8)
    assert store.load([h(i) for i in range(6)], pool, [5, 4, 3, 2, 1, 0]) == 3
    assert torch.equal(pool[5], block(0)) and torch.equal(pool[3], block(2)) and not pool[2].any()
    store.close()


def test_concurrent_readers_writers_and_pins_keep_every_block_intact(tmp_path):
    """Writers reserve/commit and put, readers acquire (pin) and load, while SSD demotion and promotion
    run: nothing read is ever wrong, pinned slots are never reused, capacity holds, no pin leaks."""
    store = TieredKVStore(DramTier(12, BLOCK, pin=False), SsdTier(tmp_path, 24, BLOCK, sync=False))
    errors = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            i = rng.randrange(40)
            if rng.random() < 0.5:
                store.put(h(i), block(i))
                continue
            plan, _ = store.reserve([h(i)], [0])
            for _, slot in plan:
                store.dram.pool[slot].copy_(block(i))
                store.commit(h(i), slot, 0)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        pool = torch.zeros(4, BLOCK, dtype=torch.uint8)
        for _ in range(400):
            start = rng.randrange(38)
            want = [h(start + k) for k in range(3)]
            slots = store.acquire(want)
            for k, slot in enumerate(slots):
                if not torch.equal(store.dram.pool[slot], block(start + k)):
                    errors.append(("pinned slot changed", start + k))
            store.release(slots)
            got = store.load(want, pool, [0, 1, 2])
            errors.extend(
                ("loaded", start + k) for k in range(got) if not torch.equal(pool[k], block(start + k))
            )
            if len(store.dram) > 12 or len(store.ssd) > 24:
                errors.append("over capacity")

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=reader, args=(10 + s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store.flush()
    assert errors == [] and store.dram.num_pinned == 0 and store.dram.num_reserved == 0
    slots = [slot for slot in store.dram._slots.values()]
    assert len(slots) == len(set(slots)) and len(slots) + len(store.dram._free) == 12  # no slot lost
    store.close()


def test_blocks_slower_to_load_than_to_compute_are_computed(llama, tmp_path):
    from engine import LLM, SamplingParams

    store = TieredKVStore(
        DramTier(1, _block_bytes(llama), pin=False), SsdTier(tmp_path, 64, _block_bytes(llama))
    )
    llm = LLM(llama, num_blocks=8, kv_store=store)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = list(range(30, 30 + 5 * 16 + 3))
    filler = list(range(200, 200 + 7 * 16))
    first = llm.generate([prompt], params)[0]
    assert engine.offloader.prefill_tokens_per_s > 0  # measured on the 83-token prefill

    def again(ssd_bytes_per_s: float) -> int:
        llm.generate([filler], params)
        llm.engine.offloader.drain()
        store.flush()
        store.bandwidth = {"dram": 1e12, "ssd": ssd_bytes_per_s}
        before = engine.stats.prompt_tokens_computed
        out = llm.generate([prompt], params)[0]
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
        return engine.stats.prompt_tokens_computed - before

    assert again(ssd_bytes_per_s=1.0) == len(prompt)  # a disk at 1 B/s: computing wins
    assert engine.offloader.stats.skipped_slower_than_compute >= 5
    assert again(ssd_bytes_per_s=1e12) == len(prompt) - 5 * 16  # a fast disk: every block is loaded
    store.close()


def test_staging_files_of_dead_workers_are_swept(tmp_path):
    import subprocess
    import sys

    from services.kv_memory import shm

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    (tmp_path / f"ridgeline-stage-{dead_pid}-abcd").write_bytes(b"x")
    (tmp_path / f"ridgeline-stage-{os.getpid()}-abcd").write_bytes(b"x")  # alive: kept
    (tmp_path / "ridgeline-kv-memory-x").write_bytes(b"x")  # not a staging file: kept
    assert shm.sweep_dead_staging(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ridgeline-stage-{os.getpid()}-abcd", "ridgeline-kv-memory-x"]
    )


def _rewrite_index(directory, records) -> None:
    """Write index.log as a forger would: every record well-formed with a valid record CRC."""
    import struct
    import zlib

    with open(directory / "index.log", "wb") as f:
        for block_hash, slot, checksum in records:
            body = struct.pack("<4sB16sII", b"RLKV", 1, block_hash, slot, checksum)
            f.write(body + struct.pack("<I", zlib.crc32(body)))


def test_a_forged_index_that_swaps_slots_is_detected_not_served(tmp_path):
    """Swapping two entries' slots (record CRCs valid, each block's own checksum moved with its slot) used
    to serve block 2's bytes for block 1: 11 of 12 wrong under HTTP 200."""
    from services.kv_memory.ssd_tier import block_checksum

    tier = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    tier.put(h(1), block(1).numpy().tobytes())
    tier.put(h(2), block(2).numpy().tobytes())
    (slot1, crc1), (slot2, crc2) = tier._entries[h(1)], tier._entries[h(2)]
    tier.close()
    _rewrite_index(tmp_path, [(h(1), slot2, crc2), (h(2), slot1, crc1)])
    forged = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    assert forged.get(h(1)) is None and forged.get(h(2)) is None and forged.corrupt_blocks == 2
    forged.close()
    # a forger who also recomputes each checksum over (hash, bytes) still meets the slots' own headers
    data1, data2 = block(1).numpy().tobytes(), block(2).numpy().tobytes()
    _rewrite_index(
        tmp_path, [(h(1), slot2, block_checksum(h(1), data2)), (h(2), slot1, block_checksum(h(2), data1))]
    )
    forged = SsdTier(tmp_path, capacity_blocks=4, block_bytes=BLOCK)
    out = torch.empty(BLOCK, dtype=torch.uint8)
    assert not forged.read_into(h(1), out.numpy()) and forged.get(h(2)) is None and forged.corrupt_blocks == 2
    forged.close()


def test_one_tier_per_directory_and_a_restarted_replica_finds_its_slot(tmp_path):
    from services.kv_memory.ssd_tier import DirectoryInUse
    from services.kv_memory.tiered_store import build_store

    first = build_store(BLOCK, 2, str(tmp_path), 8, ssd_claim="decode", pin=False)
    second = build_store(BLOCK, 2, str(tmp_path), 8, ssd_claim="decode", pin=False)
    assert (first.ssd.dir.name, second.ssd.dir.name) == ("decode-0", "decode-1")
    with pytest.raises(DirectoryInUse):
        SsdTier(first.ssd.dir, capacity_blocks=8, block_bytes=BLOCK)
    first.ssd.put(h(5), block(5).numpy().tobytes())
    first.close()  # the replica stops (a crash releases the lock too: it dies with the process)
    restarted = build_store(BLOCK, 2, str(tmp_path), 8, ssd_claim="decode", pin=False)
    assert restarted.ssd.dir.name == "decode-0"
    assert restarted.ssd.get(h(5)) == block(5).numpy().tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode-0", "decode-1"]  # nothing piles up
    restarted.close()
    second.close()


def test_documents_go_down_the_tiers_and_come_back_per_tenant(llama, tmp_path):
    """A document evicted from the HBM document cache comes back from DRAM (then from SSD once DRAM let it
    go) byte for byte: the prompt's output equals the one that computed it. Another tenant never finds it."""
    from engine.documents import DocumentRecompute, DocumentSpan
    from engine.llm_engine import LLMEngine
    from engine.request import EngineRequest
    from engine.sampling_params import SamplingParams

    nbytes = _block_bytes(llama)
    store = TieredKVStore(DramTier(6, nbytes, pin=False), SsdTier(tmp_path, 64, nbytes))
    engine = LLMEngine.from_pretrained(llama, num_blocks=64, max_document_blocks=6, kv_store=store)
    docs = [[(11 * d + t) % 300 + 5 for t in range(40)] for d in range(4)]  # 3 blocks each

    def run(rid, d, salt=None, system=5, on=engine):
        ids = [7] * system + docs[d] + [9, 8, 7, 6]
        request = EngineRequest(
            rid,
            ids,
            SamplingParams(max_tokens=5, temperature=0.0, logprobs=2),
            documents=(DocumentSpan(system, 40),),
            document_recompute=DocumentRecompute(first_tokens=2),
            cache_salt=salt,
        )
        out = on.run([request])[0].outputs[0]
        return out.token_ids, out.logprobs

    stats = engine.stats
    run("a", 0)
    assert (stats.document_misses, stats.document_tier_hits) == (1, 0)
    for d in (1, 2, 3):  # each evicts the least recently used one from HBM (6 blocks hold two)
        run(f"d{d}", d)
    assert store.stats["stored_blocks"] >= 12
    again = run("a-again", 0, system=21)  # another offset: no prefix hit, the document comes from a tier
    assert stats.document_tier_hits == 1 and stats.document_misses == 4  # loaded, not computed
    fresh = LLMEngine.from_pretrained(llama, num_blocks=64)
    assert again == run("a-fresh", 0, system=21, on=fresh)  # the same bytes as computing it
    misses = stats.document_misses
    run("other-tenant", 0, salt="b")
    assert stats.document_misses == misses + 1 and stats.document_tier_hits == 1
