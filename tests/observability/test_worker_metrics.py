"""The worker collector turns each registered EngineSnapshot into labelled Prometheus samples."""

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observability.worker_metrics import EngineSnapshot, register_worker, unregister_worker


def _samples() -> dict[tuple[str, tuple], float]:
    text = generate_latest(REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ridgeline_")
        for s in family.samples
    }


def test_snapshot_becomes_labelled_samples_and_leaves_with_its_worker():
    labels = {"model": "m", "pool": "decode-test", "role": "decode"}
    snapshot = EngineSnapshot(
        running=3,
        waiting=2,
        preemptions=1,
        busy_seconds=1.5,
        steps=40,
        lookup_blocks=7,
        kv_blocks={"hbm": (128, 20), "dram": (512, 9)},
        hit_blocks={"hbm": 4, "dram": 2, "ssd": 1},
        moved_bytes={("dram", "offload"): 4096, ("ssd", "load"): 1024},
        spec_draft_tokens=12,
        spec_accepted_tokens=9,
        spec_verifications=4,
        weight_dtype="fp8",
        kv_dtype="bfloat16",
        kv_formats={"bfloat16": (100, 30, 2048), "turboquant4": (300, 50, 544)},
        kv_blocks_aged=61,
        tier_formats={("dram", "turboquant4"): 33, ("ssd", "turboquant4"): 5},
        document_lookups=(11, 4, 3),
        document_tokens=(900, 120),
        document_fallbacks=2,
        document_cache_blocks=48,
    )
    token = register_worker(labels, lambda: snapshot)
    try:
        got = _samples()
        base = tuple(sorted(labels.items()))

        def at(name: str, **extra: str) -> float:
            return got[(name, tuple(sorted({**labels, **extra}.items())))]

        assert got[("ridgeline_num_requests_running", base)] == 3
        assert got[("ridgeline_num_requests_waiting", base)] == 2
        assert got[("ridgeline_preemptions_total", base)] == 1
        assert got[("ridgeline_engine_busy_seconds_total", base)] == 1.5
        assert got[("ridgeline_engine_steps_total", base)] == 40
        assert got[("ridgeline_kv_lookup_blocks_total", base)] == 7
        assert at("ridgeline_kv_capacity_blocks", tier="dram") == 512
        assert at("ridgeline_kv_used_blocks", tier="hbm") == 20
        assert at("ridgeline_kv_hit_blocks_total", tier="ssd") == 1
        assert at("ridgeline_kv_moved_bytes_total", tier="dram", direction="offload") == 4096
        assert got[("ridgeline_spec_accepted_tokens_total", base)] == 9
        assert got[("ridgeline_spec_verifications_total", base)] == 4
        assert at("ridgeline_engine_info", weight_dtype="fp8", kv_dtype="bfloat16") == 1
        assert at("ridgeline_kv_format_capacity_blocks", kv_dtype="turboquant4") == 300
        assert at("ridgeline_kv_format_used_blocks", kv_dtype="bfloat16") == 30
        assert at("ridgeline_kv_format_used_bytes", kv_dtype="turboquant4") == 50 * 544
        assert got[("ridgeline_kv_saved_bytes", base)] == 50 * (2048 - 544)
        assert got[("ridgeline_kv_aged_blocks_total", base)] == 61
        assert at("ridgeline_kv_format_tier_blocks", tier="dram", kv_dtype="turboquant4") == 33
        assert at("ridgeline_kv_format_tier_blocks", tier="ssd", kv_dtype="turboquant4") == 5
        assert at("ridgeline_document_lookups_total", outcome="hit") == 11
        assert at("ridgeline_document_lookups_total", outcome="tier_hit") == 4
        assert at("ridgeline_document_lookups_total", outcome="miss") == 3
        assert at("ridgeline_document_tokens_total", kind="reused") == 900
        assert at("ridgeline_document_tokens_total", kind="recomputed") == 120
        assert got[("ridgeline_document_fallbacks_total", base)] == 2
        assert got[("ridgeline_document_cache_blocks", base)] == 48
    finally:
        unregister_worker(token)
    assert ("ridgeline_num_requests_running", base) not in _samples()


def test_a_worker_whose_read_fails_is_skipped_not_fatal():
    def broken() -> EngineSnapshot:
        raise RuntimeError("replica shutting down")

    token = register_worker({"model": "m", "pool": "gone", "role": "prefill"}, broken)
    try:
        assert all(dict(labels).get("pool") != "gone" for _, labels in _samples())
    finally:
        unregister_worker(token)
