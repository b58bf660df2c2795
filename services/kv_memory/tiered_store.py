"""DRAM over SSD as one KVStore: puts land in DRAM; what DRAM evicts is written to SSD by a background
thread (never on the engine's step); reads try DRAM, then SSD, promoting SSD hits to DRAM.

Used in-process by a worker (the engine's offloader calls put/lookup/load) and by the per-node
KVMemoryService (services/kv_memory/service.py), which adds acquire/reserve/commit so remote readers and
writers move the bytes themselves while the slots are pinned.
"""

import logging
import queue
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.kv.offload import KVStore
from services.kv_memory.dram_tier import DramFull, DramTier
from services.kv_memory.ssd_tier import SsdTier, open_claimed
from services.kv_memory.tier_policy import TierPolicy
from services.transport.block_copy import copy_blocks

logger = logging.getLogger(__name__)

_PROMOTED = 2**31 - 1  # priority of a block promoted from SSD (its user's priority is not kept there)
_PROMOTE_BATCH = 64  # blocks read from SSD per round
_SSD_READERS = 8  # parallel SSD reads (pread and crc32 release the GIL)
_MIN_BANDWIDTH_SAMPLE_BLOCKS = 8  # reads at least this large update a tier's bandwidth estimate
_MAX_PENDING = 512  # blocks waiting for the SSD writer; beyond it DRAM evictions are dropped (SSD too slow)


class TieredKVStore(KVStore):
    def __init__(self, dram: DramTier, ssd: SsdTier | None = None, policy: TierPolicy | None = None):
        self.dram, self.ssd = dram, ssd
        self.policy = policy or TierPolicy()
        self.stats = {
            "dram_hits": 0,
            "ssd_hits": 0,
            "misses": 0,
            "demoted": 0,
            "dropped": 0,
            "stored_blocks": 0,
            "loaded_blocks": 0,
            "loads": 0,
            "load_seconds": 0.0,
        }
        # bytes/s each tier delivered to readers so far (moving averages; None until measured)
        self.bandwidth: dict[str, float | None] = {"dram": None, "ssd": None}
        self._priority: dict[bytes, int] = {}  # of blocks in DRAM: decides whether they may go to SSD
        # evicted from DRAM, not yet on SSD (still readable): the bytes (a view of a DRAM slot being demoted)
        self._pending: dict[bytes, tuple[torch.Tensor, int | None]] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # side streams for loads into GPU pools
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._committer: threading.Thread | None = None
        dram.demote = self._may_demote if ssd is not None else None
        if ssd is not None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True, name="ridgeline-ssd-writer")
            self._writer.start()

    # -- occupancy ---------------------------------------------------------------------------------

    def served_blocks(self) -> dict[str, int]:
        return {"dram": self.stats["dram_hits"], "ssd": self.stats["ssd_hits"]}

    def demoted_blocks(self) -> int:
        return self.stats["demoted"]

    def occupancy(self) -> dict:
        """Blocks held and capacity per tier."""
        out = {
            "dram_blocks": len(self.dram),
            "dram_capacity_blocks": self.dram.capacity_blocks,
            "dram_pinned_blocks": self.dram.num_pinned,
            "block_bytes": self.dram.block_bytes,
        }
        if self.ssd is not None:
            out |= {
                "ssd_blocks": len(self.ssd),
                "ssd_capacity_blocks": self.ssd.capacity_blocks,
                "ssd_corrupt_blocks": self.ssd.corrupt_blocks,
            }
        return out

    # -- writes ------------------------------------------------------------------------------------

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
            if not present and block_hash in self.dram:
                self._event("stored", "dram", block_hash)
                self._priority[block_hash] = priority
                self.stats["stored_blocks"] += 1
        self._demote(evicted)

    def _may_demote(self, block_hash: bytes) -> bool:
        """Called by the DRAM tier for each block it evicts (its lock held): write it to SSD in place?"""
        return (
            self.policy.allows(self._priority.get(block_hash, 0), "ssd") and len(self._pending) < _MAX_PENDING
        )

    def _demote(self, evicted: list[tuple]) -> None:
        """Blocks DRAM evicted go to SSD (written from their slot) if allowed there, else they are dropped."""
        demote = []
        with self._lock:
            for old_hash, old_data, slot in evicted:
                self._event("removed", "dram", old_hash)
                old_priority = self._priority.pop(old_hash, 0)
                if old_hash in self._pending:  # promoted and evicted again before it reached SSD
                    if slot is not None:
                        self.dram.release_demoted(slot)
                elif (
                    old_data is not None
                    and self.ssd is not None
                    and (slot is not None or self.policy.allows(old_priority, "ssd"))
                ):
                    self._pending[old_hash] = (old_data, slot)
                    demote.append(old_hash)
                else:
                    self.stats["dropped"] += 1
                    if slot is not None:
                        self.dram.release_demoted(slot)
        for old_hash in demote:
            self._queue.put(old_hash)

    def reserve(self, block_hashes: list[bytes], priorities: list[int]) -> tuple[list[tuple[int, int]], int]:
        """(index, slot) for each block to be written by someone else (absent, and allowed in DRAM by its
        priority), each slot pinned until `commit` or `abort`; and how many blocks were considered (the
        rest wait until DRAM has unpinned slots again: commit these first)."""
        out: list[tuple[int, int]] = []
        for i, (block_hash, priority) in enumerate(zip(block_hashes, priorities, strict=True)):
            if not self.policy.allows(priority, "dram"):
                self.stats["dropped"] += 1
                continue
            try:
                slot, evicted = self.dram.reserve(block_hash)
            except DramFull:
                return out, i
            self._demote(evicted)
            if slot is not None:
                out.append((i, slot))
        return out, len(block_hashes)

    def offload(
        self,
        block_hashes: list[bytes],
        priorities: list[int],
        pool: torch.Tensor,
        block_ids: list[int],
        stream: torch.cuda.Stream | None = None,
    ) -> list[bool]:
        """Copy blocks of an engine pool into reserved DRAM slots in one batch; from a GPU the copies stay
        in flight on `stream` and a committer thread makes the slots findable once they landed."""
        plan, _ = self.reserve(block_hashes, priorities)
        taken = [block_hash in self.dram for block_hash in block_hashes]  # already held: nothing to copy
        if not plan:
            return taken
        slots = [slot for _, slot in plan]
        copy_blocks(
            pool, [block_ids[i] for i, _ in plan], self.dram.pool, slots, stream, wait=not pool.is_cuda
        )
        commits = [(block_hashes[i], slot, priorities[i]) for i, slot in plan]
        for i, _ in plan:
            taken[i] = True
        if pool.is_cuda:
            event = torch.cuda.Event()
            event.record(stream or torch.cuda.current_stream(pool.device))
            self._committer_queue().put((event, commits))
        else:
            for block_hash, slot, priority in commits:
                self.commit(block_hash, slot, priority)
        return taken

    def _committer_queue(self) -> queue.SimpleQueue:
        if self._committer is None:
            self._commits: queue.SimpleQueue = queue.SimpleQueue()
            self._committer = threading.Thread(
                target=self._commit_loop, daemon=True, name="ridgeline-kv-commit"
            )
            self._committer.start()
        return self._commits

    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            event, commits = item
            event.synchronize()  # the copies down landed: the slots hold the blocks
            for block_hash, slot, priority in commits:
                self.commit(block_hash, slot, priority)

    def commit(self, block_hash: bytes, slot: int, priority: int, checksum: int | None = None) -> None:
        if self.dram.commit(block_hash, slot, checksum):
            with self._lock:
                self._priority[block_hash] = priority
                self._event("stored", "dram", block_hash)
                self.stats["stored_blocks"] += 1

    def abort(self, slot: int) -> None:
        self.dram.abort(slot)

    # -- reads -------------------------------------------------------------------------------------

    def lookup(self, block_hashes: list[bytes]) -> int:
        n = 0
        for block_hash in block_hashes:
            if not (block_hash in self.dram or self._below(block_hash)):
                break
            n += 1
        return n

    def acquire(self, block_hashes: list[bytes]) -> list[int]:
        """Pin the DRAM slots of the leading run of blocks held in any tier, promoting lower-tier hits
        into DRAM (SSD reads in parallel); the run also ends where DRAM has no unpinned slot left. Read
        the slots, then `release`."""
        slots: list[int] = []
        n = len(block_hashes)
        for _ in range(n + 1):  # each round pins at least one block or ends the run
            if len(slots) >= n:
                break
            got = self.dram.acquire(block_hashes[len(slots) :])
            self.stats["dram_hits"] += len(got)
            slots += got
            start = len(slots)
            end = start
            while (
                end < n
                and end - start < _PROMOTE_BATCH
                and block_hashes[end] not in self.dram
                and self._below(block_hashes[end])
            ):
                end += 1
            if end == start:
                if start < n:
                    self.stats["misses"] += 1
                break
            promoted = self._promote(block_hashes[start:end])
            slots += promoted
            stopped = start + len(promoted)
            if len(promoted) < end - start and block_hashes[stopped] not in self.dram:
                break  # damaged, or DRAM fully pinned (a block another reader promoted continues the run)
        return slots

    def _below(self, block_hash: bytes) -> bool:
        with self._lock:
            if block_hash in self._pending:
                return True
        return self.ssd is not None and block_hash in self.ssd

    def _observe(self, tier: str, num_bytes: int, seconds: float) -> None:
        """A read of num_bytes took seconds; small reads (latency-bound) say little about bandwidth."""
        if num_bytes >= _MIN_BANDWIDTH_SAMPLE_BLOCKS * self.dram.block_bytes and seconds > 0:
            old = self.bandwidth[tier]
            rate = num_bytes / seconds
            self.bandwidth[tier] = rate if old is None else 0.7 * old + 0.3 * rate

    def load_costs(self, block_hashes: list[bytes]) -> list[float | None]:
        """Seconds to bring each block to the reader: a DRAM copy, plus an SSD read for blocks below."""
        dram, ssd = self.bandwidth["dram"], self.bandwidth["ssd"]
        per_dram = None if dram is None else self.dram.block_bytes / dram
        per_ssd = None if ssd is None or per_dram is None else self.dram.block_bytes / ssd + per_dram
        out: list[float | None] = []
        for block_hash in block_hashes:
            with self._lock:
                in_memory = block_hash in self._pending
            out.append(per_dram if in_memory or block_hash in self.dram else per_ssd)
        return out

    def _promote(self, block_hashes: list[bytes]) -> list[int]:
        """Bring blocks from the pending demotions or SSD into DRAM (SSD reads run in parallel, straight
        into the reserved slots); returns the pinned slots of the leading run that arrived intact."""
        reserved: list[tuple[bytes, int]] = []
        for block_hash in block_hashes:
            try:
                slot, evicted = self.dram.reserve(block_hash)
            except DramFull:
                break
            self._demote(evicted)
            if slot is None:  # promoted meanwhile by another reader: the run continues in DRAM next round
                break
            reserved.append((block_hash, slot))
        start = time.perf_counter()
        ok = list(self._readers().map(lambda item: self._read_into_slot(*item), reserved))
        self._observe("ssd", sum(ok) * self.dram.block_bytes, time.perf_counter() - start)
        out: list[int] = []
        leading = True  # still in the run the caller gets pinned
        for (block_hash, slot), good in zip(reserved, ok, strict=True):
            if not good:
                self.dram.abort(slot)
                if leading:
                    self.stats["misses"] += 1
                leading = False
                continue
            if self.dram.commit(
                block_hash, slot, zlib.crc32(self.dram.pool[slot].numpy().data), keep_pinned=leading
            ):
                with self._lock:
                    self._priority[block_hash] = (
                        _PROMOTED  # it came from below, so the policy allows it there
                    )
                    self._event("stored", "dram", block_hash)
                self.stats["ssd_hits"] += 1
                if leading:
                    out.append(slot)
            else:
                leading = False  # raced with another promotion: the run continues in DRAM next round
        return out

    def _read_into_slot(self, block_hash: bytes, slot: int) -> bool:
        return self._read_below(block_hash, self.dram.pool[slot])

    def _read_below(self, block_hash: bytes, out: torch.Tensor) -> bool:
        """Copy a block from the pending demotions or SSD into `out` ([block_bytes] uint8 on the host);
        False if missing or damaged."""
        with self._lock:
            pending = self._pending.get(block_hash)
            if pending is not None:  # under the lock: the writer frees the source slot only after it
                out.copy_(pending[0])
                return True
        return self.ssd is not None and self.ssd.read_into(block_hash, out.numpy())

    def _readers(self) -> ThreadPoolExecutor:
        if self._read_pool is None:
            self._read_pool = ThreadPoolExecutor(
                max_workers=_SSD_READERS, thread_name_prefix="ridgeline-ssd-read"
            )
        return self._read_pool

    def release(self, slots: list[int]) -> None:
        self.dram.unpin(slots)

    def load(self, block_hashes: list[bytes], pool: torch.Tensor, block_ids: list[int]) -> int:
        """Batched copies of the leading held blocks into pool[block_ids] (async DMAs on a side stream for
        a GPU pool, waited for here: callers run this off the engine's step)."""
        start = time.perf_counter()
        n, done = min(len(block_hashes), len(block_ids)), 0
        stream = None
        if pool.is_cuda:
            stream = self._streams.get(pool.device) or self._streams.setdefault(
                pool.device, torch.cuda.Stream(pool.device)
            )
        while done < n:
            slots = self.acquire(block_hashes[done:n])
            if slots:
                copy_start = time.perf_counter()
                try:
                    copy_blocks(self.dram.pool, slots, pool, block_ids[done : done + len(slots)], stream)
                finally:
                    self.release(slots)
                self._observe("dram", len(slots) * self.dram.block_bytes, time.perf_counter() - copy_start)
                done += len(slots)
                continue
            data = torch.empty(self.dram.block_bytes, dtype=torch.uint8)  # DRAM is all pinned: read past it
            if not self._read_below(block_hashes[done], data):
                break
            self.stats["ssd_hits"] += 1
            copy_blocks(data.view(1, -1), [0], pool, [block_ids[done]], stream)
            done += 1
        self.stats["loads"] += 1
        self.stats["loaded_blocks"] += done
        self.stats["load_seconds"] += time.perf_counter() - start
        return done

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        slots = self.acquire([block_hash])
        if not slots:
            return None
        try:
            return self.dram.pool[slots[0]].clone()
        finally:
            self.release(slots)

    # -- SSD demotion ------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        ssd = self.ssd
        assert ssd is not None  # started with an SSD tier only
        while (block_hash := self._queue.get()) is not None:
            with self._lock:
                data, slot = self._pending.get(block_hash, (None, None))
            if data is not None:
                try:
                    gone = ssd.put(block_hash, data.numpy().data)  # straight from the demoted slot
                except OSError as e:  # disk full or failing: the block is dropped, the writer goes on
                    logger.warning("SSD tier write failed, block dropped: %r", e)
                    self.stats["dropped"] += 1
                else:
                    self.stats["demoted"] += 1
                    with self._lock:
                        self._event("stored", "ssd", block_hash)
                        if gone is not None:
                            self._event("removed", "ssd", gone)
            with self._lock:
                self._pending.pop(block_hash, None)
                if slot is not None:  # freed under the lock: a promotion may be copying from it
                    self.dram.release_demoted(slot)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every offload so far is findable and every demotion is on SSD (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if (
                    not self._pending
                    and (self._committer is None or self._commits.empty())
                    and not self.dram.num_reserved
                ):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SSD writer did not drain in {timeout_s} s")
            time.sleep(0.005)

    def close(self) -> None:
        if self._committer is not None:
            self._commits.put(None)
            self._committer.join(timeout=30)
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
        if self.ssd is not None:
            self.ssd.close()
        self.dram.close()


def build_store(
    block_bytes: int,
    dram_blocks: int,
    ssd_dir: str | None = None,
    ssd_blocks: int = 0,
    policy: TierPolicy | None = None,
    ssd_claim: str | None = None,
    **dram_options,
) -> TieredKVStore:
    """The tiers below HBM: DRAM, and SSD when a directory is given (ssd_claim: the first free slot
    ssd_dir/<ssd_claim>-N, so a restarted replica finds its blocks again; else ssd_dir itself)."""
    if ssd_dir is not None and ssd_blocks < 1:
        raise ValueError(f"kv_ssd_blocks: got {ssd_blocks}, allowed >= 1 with kv_ssd_dir")
    ssd = None
    if ssd_dir is not None:
        ssd = (
            open_claimed(ssd_dir, ssd_claim, ssd_blocks, block_bytes)
            if ssd_claim is not None
            else SsdTier(ssd_dir, ssd_blocks, block_bytes)
        )
    return TieredKVStore(DramTier(dram_blocks, block_bytes, **dram_options), ssd, policy)
