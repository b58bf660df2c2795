"""Paged KV block allocation with reference counts and chained-hash prefix caching."""

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.kv.events import KVEventLog
from engine.kv.free_block_queue import FreeBlockQueue
from engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its KV computed


class BlockListener(Protocol):
    def on_cached(self, block_id: int, block_hash: bytes, priority: int) -> None: ...

    def on_evict(self, block_id: int, block_hash: bytes, priority: int) -> None: ...

    def on_cached_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int) -> None: ...

    def on_evict_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int) -> None: ...


class _Unheard:
    """Nobody listens: blocks are cached and reused in HBM alone."""

    def on_cached(self, block_id: int, block_hash: bytes, priority: int) -> None:
        """No tier below."""

    def on_evict(self, block_id: int, block_hash: bytes, priority: int) -> None:
        """No tier below."""

    def on_cached_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int) -> None:
        """No tier below."""

    def on_evict_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int) -> None:
        """No tier below."""


class BlockManager:
    """Owns the block ids of one KV pool.

    Contract: every block is either referenced by running requests (ref_cnt > 0) or sits in the free queue,
    least recently freed first. A free block keeps its hash and stays findable for prefix hits until it is
    handed out again (LRU reuse). Only full, computed blocks are hashed; a block is shared read-only.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        events: KVEventLog | None = None,
        listener: BlockListener | None = None,
        coded_pools: Sequence[int] = (),
    ):
        """events: where stored / removed hashes are recorded (bounded; a worker drains it); listener: told
        when a block is cached or about to be reused (a KV offloader copies it down); coded_pools: the sizes
        of a KV age policy's low-bit pools, highest precision first; their ids follow the 16-bit pool's in
        that order."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks: got {num_blocks}, allowed >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.coded_starts = list(itertools.accumulate([num_blocks, *coded_pools]))  # pool k: [k], [k + 1]
        self.num_coded_blocks = self.coded_starts[-1] - num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(self.coded_starts[-1])]
        self.free_queue = FreeBlockQueue(range(num_blocks))
        # coded blocks: a block aged from a cached one keeps its hash, findable (coded_cached) for requests
        # whose policy holds that position at those bits or fewer, until the coded block is reused
        starts = self.coded_starts
        self.free_coded = [FreeBlockQueue(range(a, b)) for a, b in zip(starts, starts[1:], strict=False)]
        self.coded_cached: list[dict[bytes, Block]] = [{} for _ in coded_pools]
        self.cached: dict[bytes, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the block table, kept in step with req_blocks
        self.req_num_cached_blocks: dict[str, int] = {}
        # per request and coded pool: the first block index age() has not decided yet
        self.req_aged: dict[str, list[int]] = {}
        self.events = events or KVEventLog()
        self.listener = listener or _Unheard()
        # frees held blocks that are only a cache (the document cache's) when requests need them; False when
        # nothing is left to free
        self.reclaim: Callable[[], bool] = lambda: False

    def cached_block_id(self, block_hash: bytes) -> int | None:
        """The block that holds this hash in the prefix cache, if any."""
        block = self.cached.get(block_hash)
        return None if block is None else block.block_id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_used_coded_blocks(self) -> int:
        return sum(self.used_coded_blocks(k) for k in range(len(self.free_coded)))

    def used_coded_blocks(self, pool: int) -> int:
        return self.coded_starts[pool + 1] - self.coded_starts[pool] - len(self.free_coded[pool])

    def pool_of(self, block_id: int) -> int:
        """-1: the 16-bit pool; k: coded pool k."""
        return bisect.bisect_right(self.coded_starts, block_id) - 1 if block_id >= self.num_blocks else -1

    def age(self, request: Request, targets: Sequence[range]) -> list[tuple[int, int]]:
        """Move the request's blocks into the coded pools: targets[k] holds the block indices the age policy
        keeps in pool k or a lower-precision one. A block moves at most once a call, to the lowest pool that
        wants it; its table entry becomes the coded id and the block it leaves is released (its hash and
        content stay findable for prefix hits until it is reused). -> [(old id, new id)] for the caller to
        re-encode before any later step runs. Each block is decided once a pool: one other requests share
        stays where it is; when a pool is full the rest wait for a later step."""
        blocks = self.req_blocks.get(request.request_id, [])
        ids = self.req_block_ids.get(request.request_id, [])
        decided = self.req_aged.setdefault(request.request_id, [0] * len(targets))
        moves = []
        for k in reversed(range(len(targets))):
            for i in range(max(targets[k].start, decided[k]), min(targets[k].stop, len(blocks))):
                block = blocks[i]
                decided[k] = i + 1
                if self.pool_of(block.block_id) >= k or block.ref_cnt != 1:
                    continue
                if not self.free_coded[k]:
                    decided[k] = i
                    break
                new = self._pop_coded(k)
                if block.block_hash is not None and block.block_hash not in self.coded_cached[k]:
                    new.block_hash = block.block_hash
                    self.coded_cached[k][block.block_hash] = new
                    self.listener.on_cached_coded(k, new.block_id, block.block_hash, request.priority)
                blocks[i], ids[i] = new, new.block_id
                moves.append((block.block_id, new.block_id))
                block.ref_cnt = 0
                self._push_free(block, request.priority)
        return moves

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (do not modify)."""
        return self.req_block_ids.get(request_id, [])

    def get_computed_blocks(
        self, request: Request, coded_ok: Sequence[range] = ()
    ) -> tuple[list[Block], int]:
        """Longest run of cached full blocks at the start of the request, and the tokens they cover. A block
        index in coded_ok[k] (those the request's age policy holds in coded pool k or lower) may be a copy in
        pool k or a higher-precision one when its 16-bit original is gone.

        At least the last token is always recomputed: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_tokens = request.num_tokens - 1
        hits: list[Block] = []
        for i, block_hash in enumerate(request.block_hashes):
            if (i + 1) * self.block_size > max_hit_tokens:
                break
            block = self.cached.get(block_hash)
            allowed = [k for k, ok in enumerate(coded_ok) if i in ok]  # pools 0 .. the lowest allowed
            for k in range(max(allowed, default=-1) + 1):
                if block is None:
                    block = self.coded_cached[k].get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = ()
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed (and hit) tokens.

        Returns False, changing nothing, when the free blocks do not suffice.
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        ids = self.req_block_ids.setdefault(request.request_id, [])
        num_computed = request.scheduled_tokens + len(computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(computed_blocks)
        # hits that sit in the free queue stop being free once touched
        if not self._room_for(num_new_blocks + self._free_hits(computed_blocks)):
            if not blocks:
                del self.req_blocks[request.request_id], self.req_block_ids[request.request_id]
            return False
        for block in computed_blocks:
            self._take(block)
        blocks.extend(computed_blocks)
        if computed_blocks:
            self.req_num_cached_blocks[request.request_id] = len(blocks)
        for _ in range(max(num_new_blocks, 0)):
            blocks.append(self._pop_free())
        ids.extend(b.block_id for b in blocks[len(ids) :])
        return True

    def fitting_tokens(self, request: Request, computed_blocks: Sequence[Block] = ()) -> int:
        """How many new tokens allocate_slots could take now (the free blocks and the last one's room)."""
        held = len(self.req_blocks.get(request.request_id, ())) + len(computed_blocks)
        num_computed = request.scheduled_tokens + len(computed_blocks) * self.block_size
        return (
            held + self.num_free_blocks - self._free_hits(computed_blocks)
        ) * self.block_size - num_computed

    def _room_for(self, num_blocks: int) -> bool:
        """Whether num_blocks 16-bit blocks are free, once cache-only blocks (reclaim) gave theirs back."""
        while num_blocks > self.num_free_blocks:
            if not self.reclaim():
                return False
        return True

    def _free_hits(self, hits: Sequence[Block]) -> int:
        """16-bit hits that sit in the free queue: they stop being free once taken."""
        return sum(1 for b in hits if b.ref_cnt == 0 and b.block_id < self.num_blocks)

    def _free_queue_of(self, block_id: int) -> FreeBlockQueue:
        pool = self.pool_of(block_id)
        return self.free_queue if pool < 0 else self.free_coded[pool]

    def _take(self, block: Block) -> None:
        if block.ref_cnt == 0:
            self._free_queue_of(block.block_id).remove(block.block_id)
        block.ref_cnt += 1

    def _push_free(self, block: Block, priority: int) -> None:
        self._free_queue_of(block.block_id).push(block.block_id, block.block_hash is not None, priority)

    def allocate_blocks(
        self, request_id: str, num_blocks: int, hits: Sequence[Block] = (), coded: Sequence[int] = ()
    ) -> list[int] | None:
        """Blocks for a request that does not exist yet, whose KV arrives from another worker: the cached
        `hits` first (shared, already holding the right KV), then fresh blocks for the rest; block i from coded
        pool coded[i] where that is >= 0 (KV arriving coded) and the pool has a free block left, else 16-bit
        (the KV is decoded into it). None, changing nothing, when too few blocks are free."""
        if request_id in self.req_blocks:
            raise ValueError(f"request_id: {request_id!r} already holds blocks")
        pools = [coded[i] if i < len(coded) else -1 for i in range(len(hits), num_blocks)]
        if any(not -1 <= k < len(self.free_coded) for k in pools):
            raise ValueError(f"coded: pool indices allowed -1..{len(self.free_coded) - 1}, got {list(coded)}")
        left = [len(q) for q in self.free_coded]
        for i, k in enumerate(pools):  # a full coded pool: those blocks take 16-bit ones
            if k >= 0 and left[k]:
                left[k] -= 1
            elif k >= 0:
                pools[i] = -1
        if not self._room_for(pools.count(-1) + self._free_hits(hits)):
            return None
        for block in hits:
            self._take(block)
        blocks = list(hits) + [self._pop_free() if k < 0 else self._pop_coded(k) for k in pools]
        self.req_blocks[request_id] = blocks
        self.req_block_ids[request_id] = [b.block_id for b in blocks]
        self.req_num_cached_blocks[request_id] = len(hits)
        return list(self.req_block_ids[request_id])

    def cached_prefix(self, block_hashes: list[bytes]) -> list[Block]:
        """The longest run of cached blocks matching these hashes from the start."""
        hits = []
        for block_hash in block_hashes if self.enable_prefix_caching else ():
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _pop_coded(self, pool: int) -> Block:
        block_id, priority = self.free_coded[pool].pop()
        block = self.blocks[block_id]
        if block.block_hash is not None:  # its codes are about to be overwritten
            if self.coded_cached[pool].get(block.block_hash) is block:
                del self.coded_cached[pool][block.block_hash]
                self.listener.on_evict_coded(pool, block_id, block.block_hash, priority or 0)
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def take_coded(self, pool: int) -> int | None:
        """A free block of coded pool `pool` for KV loaded from a tier (held until adopt_coded or
        release_coded), or None when none is free."""
        return self._pop_coded(pool).block_id if self.free_coded[pool] else None

    def adopt_coded(self, request: Request, loaded: Sequence[tuple[int, int]]) -> None:
        """Coded blocks from take_coded that now hold the request's KV at block indices i: (i, coded id) each
        replaces the fresh 16-bit block there (given back), and is cached under the block's hash."""
        blocks, ids = self.req_blocks[request.request_id], self.req_block_ids[request.request_id]
        for i, coded_id in loaded:
            old, new, pool = blocks[i], self.blocks[coded_id], self.pool_of(coded_id)
            assert old.ref_cnt == 1 and old.block_hash is None, "a coded load replaces fresh blocks only"
            blocks[i], ids[i] = new, coded_id
            old.ref_cnt = 0
            self._push_free(old, request.priority)
            block_hash = request.block_hashes[i]
            if block_hash not in self.coded_cached[pool]:
                new.block_hash = block_hash
                self.coded_cached[pool][block_hash] = new
                # its tier holds it already: the write-through copies nothing, and a later eviction puts nothing
                self.listener.on_cached_coded(pool, coded_id, block_hash, request.priority)

    def release_coded(self, coded_ids: Sequence[int]) -> None:
        """Coded blocks from take_coded that were not adopted."""
        for coded_id in coded_ids:
            block = self.blocks[coded_id]
            block.ref_cnt = 0
            self._push_free(block, 0)

    def _pop_free(self) -> Block:
        block_id, priority = self.free_queue.pop()
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its content is about to be overwritten
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                self.events.record("removed", "hbm", block.block_hash)
                self.listener.on_evict(block.block_id, block.block_hash, priority or 0)
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks under their hashes."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        start = self.req_num_cached_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            block, block_hash = blocks[i], request.block_hashes[i]
            pool = self.pool_of(block.block_id)
            if pool >= 0:  # coded already (handed over coded, loaded coded, or aged before it was hashed)
                if block.block_hash is None and block_hash not in self.coded_cached[pool]:
                    block.block_hash = block_hash
                    self.coded_cached[pool][block_hash] = block
                    self.listener.on_cached_coded(pool, block.block_id, block_hash, request.priority)
            elif block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                self.cached[block_hash] = block
                self.events.record("stored", "hbm", block_hash)
                self.listener.on_cached(block.block_id, block_hash, request.priority)
        self.req_num_cached_blocks[request.request_id] = max(start, num_full)

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks go to the front of the eviction order, and blocks of
        less important requests (larger priority value) are evicted before those of more important ones."""
        self.free_blocks(request.request_id, request.priority)

    def free_blocks(self, request_id: str, priority: int = 0) -> None:
        blocks = self.req_blocks.pop(request_id, [])
        self.req_block_ids.pop(request_id, None)
        self.req_num_cached_blocks.pop(request_id, None)
        self.req_aged.pop(request_id, None)
        for block in reversed(blocks):
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._push_free(block, priority)

    def reset_prefix_cache(self) -> None:
        for block_hash, block in self.cached.items():
            self.listener.on_evict(block.block_id, block_hash, 0)  # a copy down may still read it
            block.block_hash = None
            self.events.record("removed", "hbm", block_hash)
        self.cached.clear()
        for pool, cached in enumerate(self.coded_cached):
            for block_hash, block in cached.items():
                self.listener.on_evict_coded(pool, block.block_id, block_hash, 0)  # a copy down may read it
                block.block_hash = None
            cached.clear()
