"""The router's KV index: which worker holds which KV block, in which tier. Exact, fed by the workers' KV
events (engine/kv/events.py: block hashes stored/removed per tier), rebuilt from a snapshot when a worker
(re)registers, and forgetting a worker whose registration lapsed. No torch, no Ray.

Document keys (RAG documents' KV, engine/documents.py) are indexed like block hashes; `held` counts them
wherever they sit in a prompt, not as a prefix.

A node's KV memory service is a source of its own (its DRAM and SSD tiers); `share` makes its blocks
count for every worker on that node.
"""

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from control_plane.tiers import TIERS

# a prompt's documents for the router: (key, or keys that all stand for it; blocks) each
DocumentEntries = Sequence[tuple[bytes | tuple[bytes, ...], int]]


@dataclass(frozen=True)
class PrefixMatch:
    """How many of a request's leading blocks a worker can serve without computing, by the fastest tier
    holding each."""

    hbm: int = 0
    dram: int = 0
    ssd: int = 0

    @property
    def blocks(self) -> int:
        return self.hbm + self.dram + self.ssd


class KVIndex:
    def __init__(self) -> None:
        self._where: dict[bytes, dict[str, int]] = {}  # hash -> {source: bitmask of tiers}
        self._shared: dict[str, set[str]] = {}  # worker -> sources whose blocks it can load (its node's)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    def apply(self, source: str, events: Iterable) -> None:
        """KV events of one source, in order: (kind, tier, block hashes) tuples or objects with those
        attributes. kind is "stored" or "removed"."""
        with self._lock:
            for event in events:
                kind, tier, hashes = (
                    event if isinstance(event, tuple) else (event.kind, event.tier, event.block_hashes)
                )
                if tier not in TIERS:
                    raise ValueError(f"tier: got {tier!r}, allowed {', '.join(TIERS)}")
                bit = 1 << TIERS.index(tier)
                if kind == "stored":
                    for h in hashes:
                        holders = self._where.setdefault(h, {})
                        holders[source] = holders.get(source, 0) | bit
                elif kind == "removed":
                    for h in hashes:
                        self._clear(h, source, bit)
                else:
                    raise ValueError(f"kind: got {kind!r}, allowed stored, removed")

    def _clear(self, block_hash: bytes, source: str, bits: int) -> None:
        holders = self._where.get(block_hash)
        if holders is None or source not in holders:
            return
        left = holders[source] & ~bits
        if left:
            holders[source] = left
        else:
            del holders[source]
            if not holders:
                del self._where[block_hash]

    def rebuild(self, source: str, snapshot: Mapping[str, Iterable[bytes]]) -> None:
        """Replace everything known about a source by its full state ({tier: hashes}): after it
        registers again, or when its event stream had a gap."""
        with self._lock:
            self._drop(source)
        self.apply(source, [("stored", tier, list(hashes)) for tier, hashes in snapshot.items()])

    def drop(self, source: str) -> None:
        """The source is gone (its lease lapsed): none of its blocks can be served any more."""
        with self._lock:
            self._drop(source)
            self._shared.pop(source, None)
            for shared in self._shared.values():
                shared.discard(source)

    def _drop(self, source: str) -> None:
        for block_hash in [h for h, holders in self._where.items() if source in holders]:
            self._clear(block_hash, source, ~0)

    def share(self, worker: str, source: str) -> None:
        """Blocks `source` holds (a node's KV memory service) can be loaded by `worker`."""
        with self._lock:
            self._shared.setdefault(worker, set()).add(source)

    def held(self, entries: DocumentEntries, workers: Iterable[str]) -> dict[str, PrefixMatch]:
        """For each worker, the blocks of these entries ((key, blocks) each: a prompt's documents) it (or a
        source it shares) holds, each entry in the fastest tier holding it, wherever it sits in the prompt. An
        entry's key may be a tuple of keys that all stand for it (a document's HBM key, and its first block's
        key in the tiers below)."""
        out = {}
        with self._lock:
            for worker in workers:
                sources = (worker, *self._shared.get(worker, ()))
                counts = [0, 0, 0]
                for key, blocks in entries:
                    mask = 0
                    for k in key if isinstance(key, tuple) else (key,):
                        holders = self._where.get(k) or {}
                        for source in sources:
                            mask |= holders.get(source, 0)
                    if mask:
                        counts[(mask & -mask).bit_length() - 1] += blocks
                out[worker] = PrefixMatch(*counts)
        return out

    def match(self, block_hashes: list[bytes], workers: Iterable[str]) -> dict[str, PrefixMatch]:
        """For each worker, its longest run of the leading blocks it (or a source it shares) holds, each
        counted in the fastest tier holding it."""
        out = {}
        with self._lock:
            for worker in workers:
                sources = (worker, *self._shared.get(worker, ()))
                counts = [0, 0, 0]
                for block_hash in block_hashes:
                    holders = self._where.get(block_hash)
                    mask = 0
                    if holders:
                        for source in sources:
                            mask |= holders.get(source, 0)
                    if not mask:
                        break
                    counts[(mask & -mask).bit_length() - 1] += 1  # the lowest bit: the fastest tier
                out[worker] = PrefixMatch(*counts)
        return out
