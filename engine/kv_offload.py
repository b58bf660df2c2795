"""The engine's seam to KV tiers below HBM: blocks evicted from the prefix cache are offloaded to a
`KVStore`, and a prompt's blocks found there (after the HBM hits) are loaded instead of recomputed.

The store is anything with contains/put/get keyed by block hash (services/kv_memory gives DRAM and SSD
tiers); the engine never imports it. A block that comes back damaged is simply not loaded: the store
checks its checksums and answers None, and the scheduler computes the block.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.request import Request


class KVStore(ABC):
    """Blocks as raw bytes ([block_bytes] uint8 tensors), content-addressed by block hash."""

    events = None  # engine/kv_events.KVEventLog the engine sets; a store records its tiers' moves there

    @abstractmethod
    def put(self, block_hash: bytes, data: torch.Tensor, priority: int = 0) -> None:
        """`priority`: of the block's last user (lower = more important); a store may use it to decide
        how far down the block may go, or to drop it."""

    @abstractmethod
    def get(self, block_hash: bytes) -> torch.Tensor | None: ...

    def load_into(self, block_hash: bytes, dst: torch.Tensor) -> bool:
        """Copy the block into dst ([block_bytes] uint8, any device); False if missing. Stores override it
        to copy straight from their (pinned) memory instead of through a temporary."""
        data = self.get(block_hash)
        if data is None:
            return False
        dst.copy_(data)
        return True


@dataclass
class OffloadStats:
    offloaded_blocks: int = 0
    loaded_blocks: int = 0


class KVOffloader:
    def __init__(self, store: KVStore, pool: torch.Tensor, hbm_lookup=None):
        """hbm_lookup(block_hash) -> block id or None: blocks still cached in this pool past the prefix hit
        (the prefix hit stops at the first miss) are copied from there rather than recomputed."""
        self.store = store
        self.pool = pool  # [num_blocks, *block_shape]
        self.hbm_lookup = hbm_lookup
        self.stats = OffloadStats()

    def _raw(self, block_id: int) -> torch.Tensor:
        return self.pool[block_id].reshape(-1).view(torch.uint8)  # [block_bytes]

    def on_evict(self, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Before an evicted block's slot is reused: keep its KV in the store."""
        self.store.put(block_hash, self._raw(block_id), priority)  # the store copies it (GPU -> pinned host: one DMA)
        self.stats.offloaded_blocks += 1

    def load(self, request: Request, first: int, block_ids: list[int], max_blocks: int) -> int:
        """Fill block_ids[first:] from the store for as many consecutive blocks as it holds (at most
        max_blocks); returns how many were loaded."""
        loaded = 0
        for i in range(first, min(first + max_blocks, len(request.block_hashes), len(block_ids))):
            block_hash = request.block_hashes[i]
            src = self.hbm_lookup(block_hash) if self.hbm_lookup is not None else None
            dst = self._raw(block_ids[i])
            if src is not None:
                dst.copy_(self._raw(src))
            elif not self.store.load_into(block_hash, dst):
                break
            loaded += 1
        self.stats.loaded_blocks += loaded
        return loaded
