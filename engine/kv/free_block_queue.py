"""The free blocks of a KV pool in eviction order: empty blocks first, then cached blocks of the least
important requests (largest `priority` value: batch traffic), least recently freed first within a class.

A cached free block keeps its KV and its hash until it is handed out again, so this order decides whose
prefix survives in HBM when memory runs short (and which blocks a lower tier receives first).
"""

from collections import OrderedDict

_EMPTY = None  # blocks whose content nobody can hit


class FreeBlockQueue:
    def __init__(self, block_ids: range):
        self._queues: dict[int | None, OrderedDict[int, None]] = {_EMPTY: OrderedDict.fromkeys(block_ids)}
        self._where: dict[int, int | None] = dict.fromkeys(block_ids, _EMPTY)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._where

    def push(self, block_id: int, cached: bool, priority: int) -> None:
        """A block became free; `priority` is its last user's (lower = more important)."""
        key = priority if cached else _EMPTY
        self._queues.setdefault(key, OrderedDict())[block_id] = None
        self._where[block_id] = key

    def remove(self, block_id: int) -> None:
        """A free cached block is reused as a prefix hit."""
        del self._queues[self._where.pop(block_id)][block_id]

    def pop(self) -> tuple[int, int | None]:
        """The next block to hand out, and the priority of its last user (None for an empty block): an
        empty one, else the least important class's oldest."""
        if self._queues[_EMPTY]:
            key = _EMPTY
        else:
            key = max(k for k, q in self._queues.items() if k is not _EMPTY and q)
        block_id, _ = self._queues[key].popitem(last=False)
        del self._where[block_id]
        return block_id, key
