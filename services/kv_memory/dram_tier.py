"""DRAM tier: a preallocated host pool of KV blocks (pinned when CUDA is present), LRU within the tier."""

import os
import threading
from collections import OrderedDict

import torch


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DramTier:
    """Holds up to `capacity_blocks` blocks of `block_bytes` bytes each, keyed by block hash.

    Contract: `put` stores a copy and returns the blocks it evicted to make room (least recently used
    first), so the caller can demote them; `get` returns a copy or None. Thread-safe.
    """

    def __init__(self, capacity_blocks: int, block_bytes: int, pin: bool | None = None):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks: got {capacity_blocks}, allowed >= 1")
        if block_bytes < 1:
            raise ValueError(f"block_bytes: got {block_bytes}, allowed >= 1")
        total = capacity_blocks * block_bytes
        if total > physical_memory_bytes():
            raise ValueError(f"capacity_blocks: {capacity_blocks} blocks of {block_bytes} B need {total} B, "
                             f"more than this machine's {physical_memory_bytes()} B of memory")
        pin = torch.cuda.is_available() if pin is None else pin
        self.block_bytes = block_bytes
        self.capacity_blocks = capacity_blocks
        # zeros, not empty: the pages are faulted in now, not on the first offloads of a busy step
        self.pool = torch.zeros((capacity_blocks, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slots

    def put(self, block_hash: bytes, data: torch.Tensor) -> list[tuple[bytes, torch.Tensor]]:
        """data: the block as bytes ([block_bytes] uint8, any device). Returns the evicted blocks."""
        data = data.reshape(-1)
        if data.dtype != torch.uint8 or data.numel() != self.block_bytes:
            raise ValueError(f"data: need {self.block_bytes} uint8 values, got {data.numel()} {data.dtype}")
        evicted = []
        with self._lock:
            if block_hash in self._slots:
                self._slots.move_to_end(block_hash)
                return evicted
            if not self._free:
                old_hash, slot = self._slots.popitem(last=False)
                evicted.append((old_hash, self.pool[slot].clone()))
                self._free.append(slot)
            slot = self._free.pop()
            self.pool[slot].copy_(data)
            self._slots[block_hash] = slot
        return evicted

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        with self._lock:
            slot = self._slots.get(block_hash)
            if slot is None:
                return None
            self._slots.move_to_end(block_hash)
            return self.pool[slot].clone()

    def copy_into(self, block_hash: bytes, dst: torch.Tensor) -> bool:
        """Copy a block straight from the (pinned) pool into dst; False if absent."""
        with self._lock:  # held through the copy: a concurrent put may not reuse the slot meanwhile
            slot = self._slots.get(block_hash)
            if slot is None:
                return False
            self._slots.move_to_end(block_hash)
            dst.copy_(self.pool[slot])
            return True

    def discard(self, block_hash: bytes) -> bool:
        with self._lock:
            slot = self._slots.pop(block_hash, None)
            if slot is not None:
                self._free.append(slot)
            return slot is not None
