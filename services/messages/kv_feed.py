"""A worker's KV events as numbered batches (services/kv_feed.py writes them, services/routing.py reads them
into control_plane/kv_index.py)."""

from dataclasses import dataclass, field

# (kind "stored" | "removed", tier "hbm" | "dram" | "ssd", block hashes)
KVEventTuple = tuple[str, str, list[bytes]]


@dataclass
class KVFeedReport:
    seq: int  # the number of the latest batch
    batches: list[tuple[int, list[KVEventTuple]]] = field(default_factory=list)  # the last few, oldest first
    snapshot: tuple[int, dict[str, list[bytes]]] | None = None  # (as of batch seq, {tier: every hash held})
