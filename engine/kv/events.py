"""KV events: which block hashes a worker stored or removed, per tier, for a KV-aware router's index.

Producers append to a `KVEventLog`; the worker drains it (the router consumes the events in the
control-plane work). Consecutive events of the same kind and tier are merged, so a prefill of many blocks
is one event.
"""

import threading
from dataclasses import dataclass, field


@dataclass
class KVEvent:
    kind: str  # "stored" | "removed"
    tier: str  # "hbm" | "dram" | "ssd"
    block_hashes: list[bytes] = field(default_factory=list)


class KVEventLog:
    def __init__(self, max_events: int = 100_000):
        self.max_events = max_events
        self._events: list[KVEvent] = []
        self.dropped = 0  # events lost because nobody drained the log (the index must then resync)
        self._lock = threading.Lock()  # the engine thread and a tier's writer thread both record

    def record(self, kind: str, tier: str, block_hash: bytes) -> None:
        with self._lock:
            last = self._events[-1] if self._events else None
            if last is not None and last.kind == kind and last.tier == tier:
                last.block_hashes.append(block_hash)
                return
            if len(self._events) >= self.max_events:
                self._events.pop(0)
                self.dropped += 1
            self._events.append(KVEvent(kind, tier, [block_hash]))

    def drain(self) -> list[KVEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events
