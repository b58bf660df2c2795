"""Engine state as Prometheus metrics, read at scrape time (nothing on the engine's hot path): every worker
in this process registers a `read()` giving its EngineSnapshot: running and waiting requests, preemptions, busy time, KV
blocks per tier, hits and moves. One collector serves them all, each with its own labels."""

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from observability.metrics import ENGINE_COUNTERS, ENGINE_GAUGES


@dataclass(frozen=True)
class EngineSnapshot:
    """One worker's engine state at scrape time (services/engine_worker.py builds it)."""

    running: int
    waiting: int  # incl. preempted and loading from a lower tier
    preemptions: int
    busy_seconds: float
    steps: int
    lookup_blocks: int  # full prompt blocks looked up at admission
    kv_blocks: dict[str, tuple[int, int]]  # tier -> (capacity, used)
    hit_blocks: dict[str, int]  # tier -> prompt blocks found there instead of computed
    moved_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, direction) -> bytes
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0
    weight_dtype: str = ""  # fp8, or the weights' dtype
    kv_dtype: str = ""
    # HBM KV by format (the pool's, and a KV age policy's low-bit one): (capacity blocks, used, bytes a block)
    kv_formats: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    kv_blocks_aged: int = 0
    tier_formats: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, coded format) -> blocks
    # RAG documents: lookups (hit in HBM, loaded from a tier, miss), tokens (reused, recomputed), fallbacks,
    # blocks the HBM cache holds
    document_lookups: tuple[int, int, int] = (0, 0, 0)
    document_tokens: tuple[int, int] = (0, 0)
    document_fallbacks: int = 0
    document_cache_blocks: int = 0


_sources: dict[int, tuple[dict[str, str], Callable[[], EngineSnapshot]]] = {}
_lock = threading.Lock()
_ids = itertools.count(1)
_registered = False


class _EngineCollector:
    def collect(self):
        with _lock:
            sources = list(_sources.values())
        gauges = {
            name: GaugeMetricFamily(name, doc, labels=_labels(name)) for name, doc in ENGINE_GAUGES.items()
        }
        counters = {
            name: CounterMetricFamily(name, doc, labels=_labels(name))
            for name, doc in ENGINE_COUNTERS.items()
        }
        for labels, read in sources:
            try:
                s = read()
            except Exception:  # noqa: BLE001 - a worker shutting down: skip it this scrape
                continue
            base = [labels["model"], labels["pool"], labels["role"]]
            gauges["ridgeline_num_requests_running"].add_metric(base, s.running)
            gauges["ridgeline_num_requests_waiting"].add_metric(base, s.waiting)
            gauges["ridgeline_engine_info"].add_metric([*base, s.weight_dtype, s.kv_dtype], 1)
            for tier, (capacity, used) in s.kv_blocks.items():
                gauges["ridgeline_kv_capacity_blocks"].add_metric([*base, tier], capacity)
                gauges["ridgeline_kv_used_blocks"].add_metric([*base, tier], used)
            counters["ridgeline_preemptions"].add_metric(base, s.preemptions)
            counters["ridgeline_engine_busy_seconds"].add_metric(base, s.busy_seconds)
            counters["ridgeline_engine_steps"].add_metric(base, s.steps)
            counters["ridgeline_kv_lookup_blocks"].add_metric(base, s.lookup_blocks)
            counters["ridgeline_spec_draft_tokens"].add_metric(base, s.spec_draft_tokens)
            counters["ridgeline_spec_accepted_tokens"].add_metric(base, s.spec_accepted_tokens)
            counters["ridgeline_spec_verifications"].add_metric(base, s.spec_verifications)
            counters["ridgeline_kv_aged_blocks"].add_metric(base, s.kv_blocks_aged)
            _add_formats(gauges, base, s)
            _add_documents(gauges, counters, base, s)
            for tier, n in s.hit_blocks.items():
                counters["ridgeline_kv_hit_blocks"].add_metric([*base, tier], n)
            for (tier, direction), n in s.moved_bytes.items():
                counters["ridgeline_kv_moved_bytes"].add_metric([*base, tier, direction], n)
        yield from gauges.values()
        yield from counters.values()

    def describe(self):
        return []  # families are made at collect time (registering twice is not checked by name)


def _add_formats(gauges: dict[str, GaugeMetricFamily], base: list[str], s: EngineSnapshot) -> None:
    """Blocks and bytes by format; bytes the low-bit blocks in use save against the pool's format."""
    base_bytes = s.kv_formats.get(s.kv_dtype, (0, 0, 0))[2]
    saved = 0
    for fmt, (capacity, used, block_bytes) in s.kv_formats.items():
        gauges["ridgeline_kv_format_capacity_blocks"].add_metric([*base, fmt], capacity)
        gauges["ridgeline_kv_format_used_blocks"].add_metric([*base, fmt], used)
        gauges["ridgeline_kv_format_used_bytes"].add_metric([*base, fmt], used * block_bytes)
        if fmt != s.kv_dtype:
            saved += used * (base_bytes - block_bytes)
    gauges["ridgeline_kv_saved_bytes"].add_metric(base, saved)
    for (tier, fmt), n in s.tier_formats.items():
        gauges["ridgeline_kv_format_tier_blocks"].add_metric([*base, tier, fmt], n)


def _add_documents(gauges: dict, counters: dict, base: list[str], s: EngineSnapshot) -> None:
    for outcome, n in zip(("hit", "tier_hit", "miss"), s.document_lookups, strict=True):
        counters["ridgeline_document_lookups"].add_metric([*base, outcome], n)
    for kind, n in zip(("reused", "recomputed"), s.document_tokens, strict=True):
        counters["ridgeline_document_tokens"].add_metric([*base, kind], n)
    counters["ridgeline_document_fallbacks"].add_metric(base, s.document_fallbacks)
    gauges["ridgeline_document_cache_blocks"].add_metric(base, s.document_cache_blocks)


def _labels(name: str) -> list[str]:
    extra = {
        "ridgeline_kv_capacity_blocks": ["tier"],
        "ridgeline_kv_used_blocks": ["tier"],
        "ridgeline_kv_hit_blocks": ["tier"],
        "ridgeline_kv_moved_bytes": ["tier", "direction"],
        "ridgeline_engine_info": ["weight_dtype", "kv_dtype"],
        "ridgeline_kv_format_capacity_blocks": ["kv_dtype"],
        "ridgeline_kv_format_used_blocks": ["kv_dtype"],
        "ridgeline_kv_format_used_bytes": ["kv_dtype"],
        "ridgeline_kv_format_tier_blocks": ["tier", "kv_dtype"],
        "ridgeline_document_lookups": ["outcome"],
        "ridgeline_document_tokens": ["kind"],
    }
    return ["model", "pool", "role", *extra.get(name, [])]


def register_worker(labels: dict[str, str], read: Callable[[], EngineSnapshot]) -> int:
    """`read()` gives the worker's EngineSnapshot at each scrape. Returns a token for unregister_worker."""
    global _registered
    with _lock:
        if not _registered:
            REGISTRY.register(_EngineCollector())
            _registered = True
        token = next(_ids)
        _sources[token] = (dict(labels), read)
        return token


def unregister_worker(token: int) -> None:
    with _lock:
        _sources.pop(token, None)
