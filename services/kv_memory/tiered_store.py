"""DRAM over SSD as one KVStore for the engine: puts land in DRAM; what DRAM evicts is written to SSD by a
background thread (never on the engine's step); a get tries DRAM, then SSD, promoting SSD hits to DRAM."""

import queue
import threading
import time

import torch

from engine.kv_offload import KVStore
from services.kv_memory.dram_tier import DramTier
from services.kv_memory.ssd_tier import SsdTier
from services.kv_memory.tier_policy import TierPolicy

_PROMOTED = 2**31 - 1  # priority of a block promoted from SSD (its user's priority is not kept there)


class TieredKVStore(KVStore):
    def __init__(self, dram: DramTier, ssd: SsdTier | None = None, policy: TierPolicy | None = None):
        self.dram, self.ssd = dram, ssd
        self.policy = policy or TierPolicy()
        self.stats = {"dram_hits": 0, "ssd_hits": 0, "misses": 0, "demoted": 0, "dropped": 0}
        self._priority: dict[bytes, int] = {}  # of blocks in DRAM: decides whether they may go to SSD
        self._pending: dict[bytes, torch.Tensor] = {}  # evicted from DRAM, not yet on SSD (still readable)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = None
        if ssd is not None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True, name="ridgeline-ssd-writer")
            self._writer.start()

    def put(self, block_hash: bytes, data: torch.Tensor, priority: int = 0) -> None:
        if not self.policy.allows(priority, "dram"):
            self.stats["dropped"] += 1
            return
        self._place(block_hash, data, priority)

    def _event(self, kind: str, tier: str, block_hash: bytes) -> None:
        if self.events is not None:
            self.events.record(kind, tier, block_hash)

    def _place(self, block_hash: bytes, data: torch.Tensor, priority: int) -> None:
        present = block_hash in self.dram
        evicted = self.dram.put(block_hash, data)
        with self._lock:
            if not present:
                self._event("stored", "dram", block_hash)
            for old_hash, _ in evicted:
                self._event("removed", "dram", old_hash)
            self._priority[block_hash] = priority
            demote = []
            for old_hash, old_data in evicted:
                old_priority = self._priority.pop(old_hash, 0)
                if self.ssd is not None and self.policy.allows(old_priority, "ssd"):
                    self._pending[old_hash] = old_data
                    demote.append(old_hash)
                else:
                    self.stats["dropped"] += 1
        for old_hash in demote:
            self._queue.put(old_hash)

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        data = self.dram.get(block_hash)
        if data is not None:
            self.stats["dram_hits"] += 1
            return data
        with self._lock:
            data = self._pending.get(block_hash)
        if data is None and self.ssd is not None:
            raw = self.ssd.get(block_hash)  # None if missing or damaged (checksum)
            data = None if raw is None else torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if data is None:
            self.stats["misses"] += 1
            return None
        self.stats["ssd_hits"] += 1
        self._place(block_hash, data, _PROMOTED)  # promotion on hit; it came from SSD, so SSD allows it
        return data

    def load_into(self, block_hash: bytes, dst: torch.Tensor) -> bool:
        if self.dram.copy_into(block_hash, dst):
            self.stats["dram_hits"] += 1
            return True
        data = self.get(block_hash)  # pending demotion or SSD (promoted on the way)
        if data is None:
            return False
        dst.copy_(data)
        return True

    def _write_loop(self) -> None:
        while (block_hash := self._queue.get()) is not None:
            with self._lock:
                data = self._pending.get(block_hash)
            if data is not None:
                gone = self.ssd.put(block_hash, data.numpy().tobytes())
                self.stats["demoted"] += 1
                with self._lock:
                    self._event("stored", "ssd", block_hash)
                    if gone is not None:
                        self._event("removed", "ssd", gone)
            with self._lock:
                self._pending.pop(block_hash, None)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every demotion so far is on SSD (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self._pending:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SSD writer did not drain in {timeout_s} s")
            time.sleep(0.005)

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
        if self.ssd is not None:
            self.ssd.close()


def build_store(block_bytes: int, dram_blocks: int, ssd_dir: str | None = None, ssd_blocks: int = 0) -> TieredKVStore:
    """The tiers a worker keeps below HBM: DRAM, and SSD when a directory is given."""
    if ssd_dir is not None and ssd_blocks < 1:
        raise ValueError(f"kv_ssd_blocks: got {ssd_blocks}, allowed >= 1 with kv_ssd_dir")
    ssd = SsdTier(ssd_dir, ssd_blocks, block_bytes) if ssd_dir is not None else None
    return TieredKVStore(DramTier(dram_blocks, block_bytes), ssd)
