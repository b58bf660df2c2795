"""DRAM tier: a preallocated host pool of KV blocks (pinned when CUDA is present), LRU within the tier.

Slots can be pinned: a pinned slot is neither evicted nor overwritten, so a reader may copy from it (an
async DMA, a remote NIXL read) without holding the tier's lock. The pool can live in a shared-memory file
so that workers on the same host map it and copy from it directly (services/kv_memory/shm.py).
"""

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from services.kv_memory import shm


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class DramFull(RuntimeError):
    """Every slot is pinned by a reader or writer: nothing can be stored until one is released."""


class DramTier:
    """Holds up to `capacity_blocks` blocks of `block_bytes` bytes each, keyed by block hash.

    Contract: `put` stores a copy and returns the blocks it evicted to make room (least recently used
    unpinned first) as (hash, bytes, slot), so the caller can demote them; `get` returns a copy or None.
    Thread-safe. With a `demote` hook, an evicted block the hook accepts is demoted in place: its slot stays
    pinned and `bytes` is a view of it (no copy) until the caller wrote it below and `release_demoted(slot)`
    (at most a quarter of the slots at once; beyond that, and without a hook, `bytes` is a copy and slot
    None); a block the hook refuses comes back as (hash, None, None) and its slot is reused at once.
    `pool` is [capacity, block_bytes] uint8; `typed` views it as [capacity, *block_shape] of `dtype`.
    """

    def __init__(
        self,
        capacity_blocks: int,
        block_bytes: int,
        pin: bool | None = None,
        *,
        block_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.uint8,
        shm_path: str | None = None,
    ):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks: got {capacity_blocks}, allowed >= 1")
        if block_bytes < 1:
            raise ValueError(f"block_bytes: got {block_bytes}, allowed >= 1")
        total = capacity_blocks * block_bytes
        if total > physical_memory_bytes():
            raise ValueError(
                f"capacity_blocks: {capacity_blocks} blocks of {block_bytes} B need {total} B, "
                f"more than this machine's {physical_memory_bytes()} B of memory"
            )
        block_shape = tuple(block_shape or (block_bytes // torch.empty((), dtype=dtype).element_size(),))
        if torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size() != block_bytes:
            raise ValueError(f"block_shape: {block_shape} of {dtype} is not {block_bytes} bytes")
        pin = torch.cuda.is_available() if pin is None else pin
        self.block_bytes, self.capacity_blocks, self.shm_path = block_bytes, capacity_blocks, shm_path
        if shm_path is not None:
            self.pool = shm.create(shm_path, capacity_blocks, block_bytes, pin)
        else:
            # zeros, not empty: the pages are faulted in now, not on the first offloads of a busy step
            self.pool = torch.zeros((capacity_blocks, block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.typed = self.pool.view(dtype).view(capacity_blocks, *block_shape)
        self.checksums: list[int | None] = [None] * capacity_blocks  # per slot, when the writer gave one
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self._pins = [0] * capacity_blocks
        self._reserved: set[int] = set()  # reserved for a write, not committed yet
        self.demote: Callable[[bytes], bool] | None = None  # demote this evicted block in place?
        self._demoting: set[int] = set()  # slots whose evicted blocks are being written below
        self.max_demoting = max(1, capacity_blocks // 4)  # beyond it evicted blocks are dropped
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    def hashes(self) -> list[bytes]:
        """The blocks held now (a snapshot, least recently used first)."""
        return list(self._slots)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slots

    @property
    def num_reserved(self) -> int:
        """Slots reserved for a write not yet committed."""
        with self._lock:
            return len(self._reserved)

    @property
    def num_pinned(self) -> int:
        with self._lock:
            return sum(1 for p in self._pins if p)

    def _take_slot(self, evicted: list) -> int | None:
        """A free slot, evicting least recently used unpinned blocks if needed (lock held)."""
        if self._free:
            return self._free.pop()
        demoted_here: list[int] = []  # indices into `evicted` of blocks on their way down
        for old_hash, slot in list(self._slots.items()):
            if self._pins[slot]:
                continue
            del self._slots[old_hash]
            self.checksums[slot] = None
            if self.demote is None:
                evicted.append((old_hash, self.pool[slot].clone(), None))
                return slot
            if not self.demote(old_hash):
                evicted.append((old_hash, None, None))  # dropped
                return slot
            if len(self._demoting) < self.max_demoting:
                self._pins[slot] = 1  # written below from here; the next LRU block gives its slot
                self._demoting.add(slot)
                evicted.append((old_hash, self.pool[slot], slot))
                demoted_here.append(len(evicted) - 1)
                continue
            evicted.append((old_hash, self.pool[slot].clone(), None))  # a burst: demoted from a copy
            return slot
        if demoted_here:  # no other slot to give: copy the last demoted block out and reuse its slot
            i = demoted_here[-1]
            old_hash, view, slot = evicted[i]
            evicted[i] = (old_hash, view.clone(), None)
            self._demoting.discard(slot)
            self._pins[slot] = 0
            return slot
        return None  # every slot is pinned by a reader, a writer or a demotion

    def release_demoted(self, slot: int) -> None:
        """The evicted block in `slot` is below now (or given up): the slot is free."""
        with self._lock:
            self._demoting.discard(slot)
            self._pins[slot] = 0
            self._free.append(slot)

    def _check(self, data: torch.Tensor) -> torch.Tensor:
        data = data.reshape(-1)
        if data.dtype != torch.uint8 or data.numel() != self.block_bytes:
            raise ValueError(f"data: need {self.block_bytes} uint8 values, got {data.numel()} {data.dtype}")
        return data

    def put(self, block_hash: bytes, data: torch.Tensor, checksum: int | None = None) -> list[tuple]:
        """data: the block as bytes ([block_bytes] uint8, any device). Returns the evicted blocks; a put
        while every slot is pinned stores nothing."""
        data = self._check(data)
        evicted: list = []
        with self._lock:
            if block_hash in self._slots:
                self._slots.move_to_end(block_hash)
                return evicted
            slot = self._take_slot(evicted)
            if slot is None:
                return evicted
            self.pool[slot].copy_(data)
            self._slots[block_hash] = slot
            self.checksums[slot] = checksum
        return evicted

    def reserve(self, block_hash: bytes) -> tuple[int | None, list]:
        """A pinned slot for a block someone else will write (a NIXL read, an SSD read); not findable
        until `commit`. (None, []) when the block is present already; DramFull when every slot is pinned."""
        evicted: list = []
        with self._lock:
            if block_hash in self._slots:
                return None, evicted
            slot = self._take_slot(evicted)
            if slot is None:
                raise DramFull(f"all {self.capacity_blocks} DRAM slots are pinned")
            self._pins[slot] = 1
            self._reserved.add(slot)
            return slot, evicted

    def commit(
        self, block_hash: bytes, slot: int, checksum: int | None = None, keep_pinned: bool = False
    ) -> bool:
        """Make a reserved slot findable under block_hash. False (slot freed) if the hash arrived
        meanwhile through another slot."""
        with self._lock:
            self._reserved.discard(slot)
            if block_hash in self._slots:
                self._pins[slot] = 0
                self._free.append(slot)
                return False
            self._slots[block_hash] = slot
            self.checksums[slot] = checksum
            if not keep_pinned:
                self._pins[slot] = 0
            return True

    def abort(self, slot: int) -> None:
        """Give back a reserved slot whose write failed."""
        with self._lock:
            self._reserved.discard(slot)
            self._pins[slot] = 0
            self.checksums[slot] = None
            self._free.append(slot)

    def acquire(self, block_hashes: list[bytes]) -> list[int]:
        """Pin the slots of the leading run of these blocks that the tier holds (marked recently used)."""
        slots = []
        with self._lock:
            for block_hash in block_hashes:
                slot = self._slots.get(block_hash)
                if slot is None:
                    break
                self._slots.move_to_end(block_hash)
                self._pins[slot] += 1
                slots.append(slot)
        return slots

    def unpin(self, slots: list[int]) -> None:
        with self._lock:
            for slot in slots:
                if self._pins[slot] <= 0:
                    raise ValueError(f"slot {slot} is not pinned")
                self._pins[slot] -= 1

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        with self._lock:
            slot = self._slots.get(block_hash)
            if slot is None:
                return None
            self._slots.move_to_end(block_hash)
            return self.pool[slot].clone()

    def discard(self, block_hash: bytes) -> bool:
        with self._lock:
            slot = self._slots.get(block_hash)
            if slot is None or self._pins[slot]:
                return False
            del self._slots[block_hash]
            self.checksums[slot] = None
            self._free.append(slot)
            return True

    def close(self) -> None:
        if self.shm_path is not None:
            shm.remove(self.shm_path, self.pool)
