"""The document cache: documents' KV at canonical positions 0.., in blocks of the engine's pool, found by
content (engine/documents.py: document_key).

A document holds its blocks in the block manager under its own id (`doc:<key>`), as a request would, so
they are never handed out while it is cached. Entries are evicted least recently used first when a new
document needs room (beyond `max_blocks`, or when the pool has too few free blocks) and when the scheduler
needs blocks for requests (`evict_one`, before it preempts anyone). A pinned entry (stored through the API,
`POST /v1/documents`) is never evicted; it goes when it is removed.
"""

from collections import OrderedDict
from dataclasses import dataclass

from engine.kv.block_manager import BlockManager
from engine.kv.events import KVEventLog


@dataclass
class DocumentEntry:
    key: bytes
    num_tokens: int
    block_ids: list[int]
    pinned: bool = False

    @property
    def owner(self) -> str:
        """Its id in the block manager."""
        return f"doc:{self.key.hex()}"


class DocumentCache:
    def __init__(self, block_manager: BlockManager, max_blocks: int, events: KVEventLog | None = None):
        """events: where documents' keys are recorded as stored / removed in HBM (for a KV-aware router)."""
        if max_blocks < 0:
            raise ValueError(f"max_document_blocks: got {max_blocks}, allowed >= 0")
        self.block_manager = block_manager
        self.max_blocks = max_blocks
        self.entries: OrderedDict[bytes, DocumentEntry] = OrderedDict()  # least recently used first
        self.num_blocks = 0  # held by entries
        self.evictions = 0
        self.events = events or KVEventLog()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> DocumentEntry | None:
        """The cached document, now the most recently used; None when absent."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def reserve(
        self, key: bytes, num_tokens: int, keep: frozenset[bytes] = frozenset()
    ) -> DocumentEntry | None:
        """Blocks for a new document's KV (the caller computes it), evicting unpinned entries not in `keep`
        least recently used first; None, changing nothing but evictions, when it cannot fit."""
        if key in self.entries:
            raise ValueError(f"document {key.hex()} is cached already")
        bm = self.block_manager
        need = -(-num_tokens // bm.block_size)
        victims = [e for e in self.entries.values() if not e.pinned and e.key not in keep]
        evictable = sum(len(e.block_ids) for e in victims)
        if self.num_blocks - evictable + need > self.max_blocks or need > bm.num_free_blocks + evictable:
            return None  # would not fit even with every evictable entry gone: evict nothing
        for victim in victims:
            if self.num_blocks + need <= self.max_blocks and need <= bm.num_free_blocks:
                break
            self.remove(victim.key)
            self.evictions += 1
        entry = DocumentEntry(key, num_tokens, [])
        block_ids = bm.allocate_blocks(entry.owner, need)
        assert block_ids is not None, "the free blocks were counted"
        entry.block_ids = block_ids
        self.entries[key] = entry
        self.num_blocks += need
        self.events.record("stored", "hbm", key)
        return entry

    def evict_one(self) -> bool:
        """Free the least recently used unpinned entry's blocks (requests need them); False when none is left."""
        victim = next((e for e in self.entries.values() if not e.pinned), None)
        if victim is None:
            return False
        self.remove(victim.key)
        self.evictions += 1
        return True

    @property
    def pinned_blocks(self) -> int:
        return sum(len(e.block_ids) for e in self.entries.values() if e.pinned)

    def remove(self, key: bytes) -> bool:
        """Drop a document (pinned or not) and free its blocks; False when it was not cached."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.block_manager.free_blocks(entry.owner)
        self.num_blocks -= len(entry.block_ids)
        self.events.record("removed", "hbm", key)
        return True

    def block_slots(self, entry: DocumentEntry, positions: range) -> list[int]:
        """Flat pool slots of the document's tokens at canonical `positions`."""
        bs = self.block_manager.block_size
        return [entry.block_ids[p // bs] * bs + p % bs for p in positions]
