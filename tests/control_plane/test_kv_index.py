"""The KV index (exact, from KV events) and the KV-aware policy; a shared-prefix workload over real engines
where the KV-aware router's prefix hit rate beats least-loaded's."""

import pytest

from control_plane.kv_index import KVIndex, PrefixMatch
from control_plane.router import KVAwarePolicy, LeastLoadedPolicy, ReplicaLoad, TierCosts


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_index_follows_events_per_tier_and_source():
    index = KVIndex()
    index.apply("w1", [("stored", "hbm", [h(1), h(2), h(3)])])
    index.apply("w2", [("stored", "hbm", [h(1)]), ("stored", "dram", [h(2)])])
    assert index.match([h(1), h(2), h(3)], ["w1", "w2", "w3"]) == {
        "w1": PrefixMatch(hbm=3),
        "w2": PrefixMatch(hbm=1, dram=1),
        "w3": PrefixMatch(),
    }
    index.apply("w1", [("removed", "hbm", [h(2)]), ("stored", "ssd", [h(2)])])  # moved down, not gone
    assert index.match([h(1), h(2), h(3)], ["w1"])["w1"] == PrefixMatch(hbm=2, ssd=1)
    index.apply("w1", [("removed", "ssd", [h(2)])])  # the run stops at the first block nobody holds
    assert index.match([h(1), h(2), h(3)], ["w1"])["w1"] == PrefixMatch(hbm=1)
    index.apply("w2", [("stored", "hbm", [h(2)])])  # in two tiers: counted in the fastest
    assert index.match([h(1), h(2)], ["w2"])["w2"] == PrefixMatch(hbm=2)


def test_rebuild_drop_and_shared_node_service():
    index = KVIndex()
    index.apply("w1", [("stored", "hbm", [h(1), h(2)])])
    index.rebuild("w1", {"hbm": [h(5)], "dram": [h(6)]})  # re-registered: the snapshot is the truth
    assert index.match([h(1)], ["w1"])["w1"] == PrefixMatch() and len(index) == 2
    assert index.match([h(5), h(6)], ["w1"])["w1"] == PrefixMatch(hbm=1, dram=1)
    index.apply("node-a", [("stored", "dram", [h(1)]), ("stored", "ssd", [h(2)])])
    index.share("w1", "node-a")  # w1 runs on node a: it can load what a's service holds
    assert index.match([h(1), h(2)], ["w1", "w2"]) == {"w1": PrefixMatch(dram=1, ssd=1), "w2": PrefixMatch()}
    index.drop("node-a")  # the service's lease lapsed
    assert index.match([h(1)], ["w1"])["w1"] == PrefixMatch() and len(index) == 2
    index.drop("w1")
    assert len(index) == 0


def test_bad_events_and_costs_are_clear_errors():
    with pytest.raises(ValueError, match="tier"):
        KVIndex().apply("w", [("stored", "tape", [h(1)])])
    with pytest.raises(ValueError, match="kind"):
        KVIndex().apply("w", [("moved", "hbm", [h(1)])])
    with pytest.raises(ValueError, match="tier_costs.ssd"):
        TierCosts(ssd=2.0)
    with pytest.raises(ValueError, match="queue_weight"):
        KVAwarePolicy(KVIndex(), queue_weight=-1)


def test_kv_aware_policy_weighs_cached_tiers_against_queue():
    index = KVIndex()
    blocks = [h(i) for i in range(10)]
    index.apply("hot", [("stored", "hbm", blocks)])
    index.apply("warm", [("stored", "dram", blocks)])
    policy = KVAwarePolicy(index, TierCosts(dram=0.1, ssd=0.5), queue_weight=0.4)
    idle = [ReplicaLoad("cold"), ReplicaLoad("warm"), ReplicaLoad("hot")]
    assert policy.rank(idle, blocks) == ["hot", "warm", "cold"]
    busy = [
        ReplicaLoad("cold"),
        ReplicaLoad("warm"),
        ReplicaLoad("hot", ongoing=3),
    ]  # 3 x 0.4 x 10 = 12 blocks
    assert policy.rank(busy, blocks) == ["warm", "cold", "hot"]
    assert LeastLoadedPolicy().rank(busy, blocks) == ["cold", "warm", "hot"]


class _Worker:
    """A real engine (tiny model) whose KV events feed the index after each step."""

    def __init__(self, name: str, model: str):
        from engine import LLMEngine

        self.name = name
        self.engine = LLMEngine.from_pretrained(model, num_blocks=48, max_model_len=256)
        self.running: list[str] = []
        self.cached_tokens = 0
        self.prompt_tokens = 0

    def add(self, request_id: str, prompt: list[int]) -> None:
        from engine import SamplingParams
        from engine.request import EngineRequest

        self.engine.add_request(
            EngineRequest(request_id, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        )
        self.running.append(request_id)
        self.prompt_tokens += len(prompt)

    def step(self, index: KVIndex) -> None:
        for out in self.engine.step():
            if out.finished:
                self.running.remove(out.request_id)
                self.cached_tokens += out.num_cached_tokens
        index.apply(self.name, self.engine.kv_events.drain())


def _shared_prefix_hit_rate(model: str, policy_name: str) -> float:
    """4 system prompts (3 blocks each) x 6 user turns, arriving 3 at a time, over 3 workers."""
    from engine.kv.block_hash import update_block_hashes
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    index = KVIndex()
    policy = LeastLoadedPolicy() if policy_name == "least_loaded" else KVAwarePolicy(index)
    workers = {name: _Worker(name, model) for name in ("w0", "w1", "w2")}
    any_engine = workers["w0"].engine
    extra = any_engine._hash_extra(None)
    systems = [[(17 * s + 3 * t) % 300 + 5 for t in range(48)] for s in range(4)]
    requests = [systems[(i * 7) % 4] + [(11 * i + t) % 300 + 5 for t in range(9)] for i in range(24)]
    for start in range(0, len(requests), 3):
        for i, prompt in enumerate(requests[start : start + 3], start=start):
            probe = Request("probe", prompt, SamplingParams(), hash_extra=extra)  # what the frontend computes
            update_block_hashes(probe, 16)
            loads = [ReplicaLoad(w.name, ongoing=len(w.running)) for w in workers.values()]
            workers[policy.rank(loads, probe.block_hashes)[0]].add(f"r{i}", prompt)
        for _ in range(200):  # bounded: this batch finishes in a few steps
            if not any(w.running for w in workers.values()):
                break
            for w in workers.values():
                if w.running:
                    w.step(index)
    return sum(w.cached_tokens for w in workers.values()) / sum(w.prompt_tokens for w in workers.values())


def test_kv_aware_router_hits_more_shared_prefixes_than_least_loaded(llama):
    least_loaded = _shared_prefix_hit_rate(llama, "least_loaded")
    kv_aware = _shared_prefix_hit_rate(llama, "kv_aware")
    assert kv_aware > least_loaded, (kv_aware, least_loaded)
    assert kv_aware > 0.5  # most prompts find their system prompt where they are sent


def test_slo_classes_resolve_from_header_or_priority():
    from control_plane.slo import DEFAULT_SLO_TABLE, SLOClass, SLOTable

    table = DEFAULT_SLO_TABLE
    assert table.resolve(None, None).name == "standard"
    assert table.resolve("Batch", None).priority == 2 and table.resolve(None, 0).name == "interactive"
    assert table.resolve("batch", 2).name == "batch"
    with pytest.raises(ValueError, match="x-slo-class"):
        table.resolve("premium", None)
    with pytest.raises(ValueError, match="priority: got 7"):
        table.resolve(None, 7)
    with pytest.raises(ValueError, match="priority: 0 is class interactive"):
        table.resolve("batch", 0)
    with pytest.raises(ValueError, match="unique"):
        SLOTable([SLOClass("a", 0, 1, 1), SLOClass("b", 0, 1, 1)], default="a")
    with pytest.raises(ValueError, match="lowest_tier"):
        SLOClass("a", 0, 1, 1, lowest_tier="tape")
    assert table.lowest_tiers() == {0: "ssd", 1: "ssd", 2: "ssd"}
    # in pools with a KV age policy, interactive requests keep 2048 recent tokens at full precision
    assert table.kv_windows() == {0: 2048}
    with pytest.raises(ValueError, match="kv_window 0"):
        SLOClass("a", 0, 1, 1, kv_window=0)


def test_documents_count_wherever_they_sit_in_the_prompt():
    index = KVIndex()
    index.apply("docs", [("stored", "hbm", [h(100), h(101)])])  # two documents' keys
    index.apply("prefix", [("stored", "hbm", [h(1), h(2)])])
    documents = [(h(101), 6), (h(100), 5), (h(102), 4)]  # another order, and one nobody holds
    assert index.held(documents, ["docs", "prefix"]) == {"docs": PrefixMatch(hbm=11), "prefix": PrefixMatch()}
    policy = KVAwarePolicy(index)
    loads = [ReplicaLoad("prefix"), ReplicaLoad("docs")]
    # 2 prefix blocks, then 15 blocks of documents and 3 more: the documents weigh more than the prefix
    assert policy.rank(loads, [h(1), h(2)], documents, prompt_blocks=20) == ["docs", "prefix"]
    assert policy.costs(loads, [h(1), h(2)], documents, prompt_blocks=20) == {"prefix": 18, "docs": 9}
    # a document one worker holds only below HBM counts by its first block's tier key, at DRAM's cost
    index.apply("dram", [("stored", "dram", [h(201)])])
    assert index.held([((h(102), h(201)), 4)], ["dram", "docs"]) == {
        "dram": PrefixMatch(dram=4),
        "docs": PrefixMatch(),
    }
    assert (
        policy.rank([ReplicaLoad("docs"), ReplicaLoad("dram")], [], [((h(102), h(201)), 4)], 6)[0] == "dram"
    )


def test_a_worker_holding_the_documents_wins_and_reuses_them(llama):
    """Real engines: a worker's document cache reports its documents' keys; the next prompt holding them (in
    another order, after another system prompt) goes there and reuses them."""
    from engine import SamplingParams
    from engine.documents import DocumentSpan, document_key
    from engine.request import EngineRequest

    index = KVIndex()
    workers = {name: _Worker(name, llama) for name in ("w0", "w1")}
    docs = [[(7 * d + t) % 300 + 5 for t in range(40)] for d in range(3)]

    def prompt(system, order):
        ids, spans = list(system), []
        for d in order:
            spans.append(DocumentSpan(len(ids), len(docs[d])))
            ids += docs[d]
        return ids + [9, 8, 7], tuple(spans)

    ids, spans = prompt([5] * 20, (0, 1, 2))
    w1 = workers["w1"]
    w1.engine.add_request(EngineRequest("first", ids, SamplingParams(max_tokens=1), documents=spans))
    while w1.engine.has_unfinished_requests():
        w1.engine.step()
    index.apply("w1", w1.engine.kv_events.drain())
    ids, spans = prompt([6] * 30, (2, 0, 1))
    extra = w1.engine._hash_extra(None)
    documents = [(document_key(ids[s.start : s.end], extra), s.length // 16) for s in spans]
    loads = [ReplicaLoad("w0"), ReplicaLoad("w1", ongoing=1)]
    assert KVAwarePolicy(index).rank(loads, [], documents, len(ids) // 16)[0] == "w1"
    assert LeastLoadedPolicy().rank(loads)[0] == "w0"
    hits = w1.engine.stats.document_hits
    w1.engine.add_request(EngineRequest("second", ids, SamplingParams(max_tokens=1), documents=spans))
    while w1.engine.has_unfinished_requests():
        w1.engine.step()
    assert w1.engine.stats.document_hits - hits == 3
