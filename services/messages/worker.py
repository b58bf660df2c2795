"""What a worker says about itself: counters, the stats Ray Serve's routers read every period, and the
registration it keeps in the registry (JSON there)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from services.messages.kv_feed import KVFeedReport


@dataclass(frozen=True)
class ModelInfo:
    """What the app needs of a pool's model before it serves: limits and the vocabulary."""

    max_model_len: int
    vocab_size: int
    block_size: int | None = None  # a draft worker's engine is not paged for the app's purposes


@dataclass
class WorkerCounters:
    """Monotonic counts of one replica's work, besides the engine's own (EngineStats)."""

    requests: int = 0
    kv_pulls: int = 0
    kv_pull_bytes: int = 0
    kv_pull_failures: int = 0
    kv_recomputes: int = 0
    kv_blocks_reused: int = 0
    kv_blocks_converted: int = 0  # pulled blocks that arrived in another KV format and were converted
    kv_handles: int = 0
    kv_leases_released: int = 0
    kv_leases_reclaimed: int = 0


@dataclass
class WorkerStats:
    """One replica's load, KV occupancy and counters (its routing stats, and what tests and /stats read)."""

    role: str
    replica: str
    pid: int
    pool: str
    transport: str
    unfinished: int
    running: int
    waiting: int
    kv_free_blocks: int
    kv_total_blocks: int
    counters: WorkerCounters
    busy_seconds: float = 0.0
    kv_loading: int = 0
    kv_pulls_by_path: dict[str, int] = field(default_factory=dict)
    kv_tier_loaded_blocks: int = 0
    kv_tier_offloaded_blocks: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    kv_blocks_aged: int = 0  # blocks a KV age policy moved into a coded pool
    drafter: dict[str, Any] = field(default_factory=dict)
    registered: bool | None = None
    held_leases: int = 0  # prefill: handed-out KV not yet released
    kv_store: dict[str, Any] = field(default_factory=dict)  # the tiers' own counters and occupancy

    def to_dict(self) -> dict[str, Any]:
        """Flat, the counters beside the rest (Ray Serve keeps routing stats as a dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "counters"}
        return out | dataclasses.asdict(self.counters)


@dataclass
class RoutingStats:
    """What a router reads of a replica each stats period (from the flat dict Serve carries)."""

    running: int = 0
    waiting: int = 0
    kv_free_blocks: int = 0
    kv_total_blocks: int = 1
    block_size: int = 16
    kv_fingerprint: str = ""
    kv_format: str = ""  # the KV format's tag in block hashes (engine/kv/kv_format.py)
    kv_feed: KVFeedReport | None = None

    @classmethod
    def from_dict(cls, stats: dict[str, Any] | None) -> "RoutingStats":
        """None or {} (no report yet): an empty replica with no KV feed."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (stats or {}).items() if k in names})

    @property
    def kv_free_fraction(self) -> float:
        return self.kv_free_blocks / max(self.kv_total_blocks, 1)


@dataclass
class WorkerRegistration:
    """A worker in the registry (JSON): who it is, where its KV and metrics are, what it runs."""

    pool: str
    role: str
    replica: str
    pid: int
    host: str
    node_ip: str
    device: str
    transport: dict[str, Any]  # the transport's own description (NIXL agent name and metadata)
    block_size: int
    kv_blocks: int
    kv_dtype: str
    kv_fingerprint: str
    max_model_len: int
    weight_dtype: str = ""  # fp8, or the weights' torch dtype
    metrics_url: str | None = None
    registered_at: float | None = None  # the registry's stamp of the registration
    lease: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "WorkerRegistration":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})
