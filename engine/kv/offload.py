"""The engine's seam to KV tiers below HBM: cached blocks are copied down to a `KVStore`, and a prompt's
blocks found there (after the HBM hits) are loaded instead of recomputed.

Offload is write-through and asynchronous: after each step, the blocks that step completed are handed to
an offload thread, which has the store copy them down on a side stream (the GPU's copy engine, after the
step's compute, overlapping the next steps) — the store's bookkeeping never runs on the engine's step. So
evicting such a block later costs nothing: the engine only orders the overwrite after that copy on the
GPU. A block the store did not take (staging full) is put synchronously when evicted. On a CPU pool the
copies are plain memcpy on the engine thread.

Loads are asynchronous: at admission the scheduler asks the store how many of the prompt's next blocks
it holds (`lookup`, cheap), and a loader thread copies them into the request's fresh blocks (`load`, one
batched call) while the engine keeps stepping other requests; the request runs once its load is done.

A load is worth it only while it is faster than computing: the offloader measures this engine's prefill
rate, the store estimates each block's load time from the bandwidth its tiers delivered so far, and only
the prefix of the held run that saves time is loaded (on an H200, a disk at 1 GB/s loses to recomputing a
Llama-8B prompt, which produces KV at ~5 GB/s).

The store is anything implementing this interface (services/kv_memory gives DRAM and SSD tiers in-process
and a per-node service); the engine never imports it. A block that comes back damaged is simply not
loaded: the store checks its checksums and reports fewer blocks, and the scheduler computes the rest.

Coded blocks (a KV age policy's pools) have stores of their own, one a coded pool (a store keeps one block
size). A coded block that holds a cached block's hash goes down as it is, codes and norms. A prompt's run of
blocks continues from a coded store where the 16-bit tiers stop, at blocks its policy holds at those bits
or fewer: the loader fills fresh coded blocks, and the scheduler puts the ones that arrived into the
request's block table in place of its fresh 16-bit blocks (`Loaded`).
"""

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv.events import KVEventLog
from engine.request import Request

logger = logging.getLogger(__name__)

_MIN_PREFILL_SAMPLE = 64  # prompt tokens in a step for its time to say what a block costs to compute
_PROBE_EVERY = 16  # of the loads judged not worth it, every 16th is done anyway: estimates stay current


class KVStore(ABC):
    """Blocks as raw bytes ([block_bytes] uint8 tensors), content-addressed by block hash."""

    events: KVEventLog | None = None  # the engine's log: a store records its tiers' moves there
    stats: dict[str, Any]  # the store's own counters (hits, loads, drops), for metrics and /stats

    @abstractmethod
    def put(self, block_hash: bytes, data: torch.Tensor, priority: int = 0) -> None:
        """Keep a copy of data (it is overwritten after put returns). `priority`: of the block's last user
        (lower = more important); a store may use it to decide how far down the block may go, or to drop it."""

    @abstractmethod
    def lookup(self, block_hashes: list[bytes]) -> int:
        """How many of the leading blocks the store holds (a hint: `load` may deliver fewer)."""

    @abstractmethod
    def load(self, block_hashes: list[bytes], pool: torch.Tensor, block_ids: list[int]) -> int:
        """Fill pool[block_ids[i]] with block i for the leading run of blocks the store can deliver
        intact; returns how many. Runs on the offloader's loader thread, not the engine's."""

    def offload(
        self,
        block_hashes: list[bytes],
        priorities: list[int],
        pool: torch.Tensor,
        block_ids: list[int],
        stream: "torch.cuda.Stream | None" = None,
    ) -> list[bool]:
        """Start copying pool[block_ids[i]] into the store; returns which blocks it took (or already
        holds). With a GPU pool the copies may stay in flight on `stream`: the store must not serve the
        bytes before they landed, and the engine orders any overwrite of the blocks after them."""
        for block_hash, priority, block_id in zip(block_hashes, priorities, block_ids, strict=True):
            self.put(block_hash, pool[block_id].reshape(-1).view(torch.uint8), priority)
        return [True] * len(block_ids)

    def load_costs(self, block_hashes: list[bytes]) -> list[float | None]:
        """Estimated seconds to load each block (None: unknown yet, then it is loaded)."""
        return [None] * len(block_hashes)

    def occupancy(self) -> dict[str, int]:
        """Blocks held and capacity per tier ({tier}_blocks, {tier}_capacity_blocks), where known."""
        return {}

    def served_blocks(self) -> dict[str, int]:
        """Blocks this store has delivered to the engine so far, by the tier they came from."""
        return {}

    def demoted_blocks(self) -> int:
        """Blocks this store has moved from DRAM down to SSD so far."""
        return 0

    def close(self) -> None:
        return None


@dataclass
class OffloadStats:
    offloaded_blocks: int = 0
    loaded_blocks: int = 0
    loads: int = 0
    loaded_coded_blocks: int = 0  # of loaded_blocks, those that came back coded
    load_failures: int = 0
    skipped_slower_than_compute: int = 0  # held blocks computed because loading them would take longer
    probes: int = 0  # loads done although judged slower, to measure the tiers again


class _Offload:
    """One step's blocks on their way down: the offload thread fills in what the store took."""

    def __init__(self, block_ids: list[int], hashes: list[bytes], priorities: list[int], ready):
        self.block_ids, self.hashes, self.priorities, self.ready = block_ids, hashes, priorities, ready
        self.launched = threading.Event()
        self.taken: list[bool] = [False] * len(block_ids)
        self.copied: torch.cuda.Event | None = None  # CUDA event after the copies

    def took(self, block_id: int) -> bool:
        if not self.launched.wait(60):  # never overwrite a block a late copy could still read
            raise RuntimeError("KV write-through was not launched within 60 s")
        return self.taken[self.block_ids.index(block_id)]


@dataclass
class _Load:
    request: Request
    first: int  # the request's block index the load starts at
    end: int  # one past the last block planned (from HBM copies or the stores)
    store_index: list[int]  # the request's block indices that come from the store, in order
    block_ids: list[int]  # their destination blocks
    waits: list  # GPU events: copies down of blocks that the destinations reused, to finish first
    coded: list[tuple[int, int, int]]  # after them, from coded stores: (block index, coded pool, coded id)


@dataclass
class Loaded:
    """A finished load: `blocks` of the request's blocks from its first planned one hold KV now; `coded`:
    those among them that arrived in coded blocks, (block index, coded block id), to put in its table;
    `unused`: coded blocks taken for the load that did not arrive, to give back."""

    request: Request
    blocks: int
    coded: list[tuple[int, int]]
    unused: list[int]


class KVOffloader:
    def __init__(
        self,
        store: KVStore,
        pool: torch.Tensor,
        coded: Sequence["KVOffloader | None"] = (),
        first_id: int = 0,
    ):
        """coded: an offloader per coded pool of a KV age policy, in the pools' order, over its raw blocks
        (None: that pool's blocks stay in HBM); first_id: the engine's id of pool[0] (a coded pool's)."""
        self.store = store
        self.pool = pool  # [num_blocks, *block_shape]
        self.first_id = first_id
        self.coded = list(coded)
        self.stats = OffloadStats()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: list[Loaded] = []
        self._finished_lock = threading.Lock()
        self._finished_event = threading.Event()
        self._loader: threading.Thread | None = None
        self._new: list[tuple[int, bytes, int]] = []  # cached this step: (block id, hash, priority)
        self._written: dict[
            int, tuple[bytes, _Offload | None]
        ] = {}  # block id -> (hash, its copy down or None)
        self._reuse_waits: list = []  # events of copies down whose blocks were handed out again
        self._stream = torch.cuda.Stream(pool.device) if pool.is_cuda else None
        self._offloads: queue.SimpleQueue[_Offload | None] = queue.SimpleQueue()
        self._offloader: threading.Thread | None = None
        self.prefill_tokens_per_s: float | None = None  # measured on this engine's prefill steps
        self._judged_slower = 0

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A step that computed `tokens` prompt tokens took `seconds` (only steps with many count)."""
        if tokens >= _MIN_PREFILL_SAMPLE and seconds > 0:
            rate = tokens / seconds
            old = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = rate if old is None else 0.7 * old + 0.3 * rate

    def _worth_loading(self, maybe_costs: list[float | None], block_size: int) -> int:
        """How many of the held blocks (their estimated load costs) to load: the prefix that saves the most
        time against computing them (all when costs or the prefill rate are not known yet)."""
        if self.prefill_tokens_per_s is None:
            return len(maybe_costs)
        costs = [c for c in maybe_costs if c is not None]
        if len(costs) < len(maybe_costs):
            return len(maybe_costs)
        compute = block_size / self.prefill_tokens_per_s  # seconds to compute one block
        best, best_saving, saving = 0, 0.0, 0.0
        for k, cost in enumerate(costs, start=1):
            saving += compute - cost
            if saving > best_saving:
                best, best_saving = k, saving
        if best < len(costs):
            self._judged_slower += 1
            if self._judged_slower % _PROBE_EVERY == 0:  # a slow estimate would never be measured again
                self.stats.probes += 1
                return len(costs)
        return best

    def _raw(self, block_id: int) -> torch.Tensor:
        return self.pool[block_id].reshape(-1).view(torch.uint8)  # [block_bytes]

    def on_cached(self, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        self._new.append((block_id, block_hash, priority))

    def on_cached_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """A coded block took a cached block's hash (aging): it goes down after the step that encodes it."""
        if (sub := self._coded(pool)) is not None:
            sub.on_cached(block_id - sub.first_id, block_hash, priority)

    def on_evict_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        if (sub := self._coded(pool)) is not None:
            sub.on_evict(block_id - sub.first_id, block_hash, priority)

    def _coded(self, pool: int) -> "KVOffloader | None":
        return self.coded[pool] if pool < len(self.coded) else None

    def write_through(self) -> None:
        """After a step: the blocks it completed (and the coded blocks it encoded) start their way down."""
        for sub in self.coded:
            if sub is not None:
                sub.write_through()
        if not self._new:
            return
        new, self._new = self._new, []
        ids = [block_id for block_id, _, _ in new]
        hashes = [block_hash for _, block_hash, _ in new]
        priorities = [priority for _, _, priority in new]
        if self._stream is None:  # a host pool: memcpy now, nothing to order
            taken = self.store.offload(hashes, priorities, self.pool, ids, None)
            for block_id, block_hash, ok in zip(ids, hashes, taken, strict=True):
                if ok:
                    self._written[block_id] = (block_hash, None)
            self.stats.offloaded_blocks += sum(taken)
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.pool.device))  # the step's compute wrote these blocks
        job = _Offload(ids, hashes, priorities, ready)
        for block_id, block_hash in zip(ids, hashes, strict=True):
            self._written[block_id] = (block_hash, job)
        if self._offloader is None:
            self._offloader = threading.Thread(
                target=self._offload_loop, daemon=True, name="ridgeline-kv-offload"
            )
            self._offloader.start()
        self._offloads.put(job)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every write-through so far has been handed to the store (launched)."""
        for sub in self.coded:
            if sub is not None:
                sub.drain(timeout_s)
        pending = [job for _, job in list(self._written.values()) if job is not None]
        for job in pending:
            if not job.launched.wait(timeout_s):
                raise TimeoutError(f"write-through not launched in {timeout_s} s")

    def _offload_loop(self) -> None:
        stream = self._stream
        assert stream is not None  # started for GPU pools only
        while (job := self._offloads.get()) is not None:
            try:
                stream.wait_event(job.ready)
                job.taken = self.store.offload(job.hashes, job.priorities, self.pool, job.block_ids, stream)
                job.copied = torch.cuda.Event()
                job.copied.record(stream)
                self.stats.offloaded_blocks += sum(job.taken)
            except Exception:  # noqa: BLE001 - nothing taken: evictions put the blocks themselves
                logger.exception("write-through of %d blocks failed", len(job.block_ids))
                job.taken = [False] * len(job.block_ids)
            finally:
                job.launched.set()

    def on_evict(self, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Before an evicted block's slot is reused: its KV must be in the store (or dropped by policy). A
        write-through still pending for it (a coded block cached and evicted within one step) is put now
        instead, never later from the slot's next content."""
        self._new = [entry for entry in self._new if entry[0] != block_id]
        written = self._written.pop(block_id, None)
        if written is not None and written[0] == block_hash:
            job = written[1]
            if job is None:  # copied synchronously (host pool)
                return
            if job.took(block_id) and job.copied is not None:  # GPU: the next write here waits for the copy
                torch.cuda.current_stream(self.pool.device).wait_event(job.copied)
                if job.copied not in self._reuse_waits:
                    self._reuse_waits = [e for e in self._reuse_waits if not e.query()] + [job.copied]
                return
        self.store.put(block_hash, self._raw(block_id), priority)  # not taken earlier: copy it now
        self.stats.offloaded_blocks += 1

    def start_load(
        self,
        request: Request,
        first: int,
        block_ids: list[int],
        max_blocks: int,
        block_size: int = 16,
        hbm_lookup=lambda block_hash: None,
        coded_ok: Sequence[range] = (),
        take_coded: Callable[[int], int | None] = lambda pool: None,
    ) -> int | None:
        """Plan filling the request's blocks first.. from HBM copies and the store. Returns the number of
        blocks ready now (all came from HBM or none is held anywhere), or None when a store load was
        started: its result comes from `take_finished`. hbm_lookup(block_hash) -> block id or None: blocks
        still cached in this pool past the prefix hit (which stops at the first miss) are copied from there
        rather than loaded or recomputed. Where the 16-bit store's run stops, it goes on from the coded
        stores at block indices coded_ok[k] allows (pool k or a more precise one; see
        BlockManager.get_computed_blocks), into coded blocks take_coded(pool) hands out (None: none free)."""
        hashes = request.block_hashes
        end = min(first + max_blocks, len(hashes), len(block_ids))
        sources = [hbm_lookup(hashes[i]) for i in range(first, end)]
        store_index = [first + k for k, src in enumerate(sources) if src is None]
        held = self.store.lookup([hashes[i] for i in store_index]) if store_index else 0
        plan = self._coded_plan(hashes, store_index[held:], coded_ok)
        costs = self.store.load_costs([hashes[i] for i in store_index[:held]]) if held else []
        costs += [self.coded_store(k).load_costs([hashes[i]])[0] for i, k in plan]
        worth = self._worth_loading(costs, block_size) if costs else 0
        self.stats.skipped_slower_than_compute += len(costs) - worth
        taken = []  # (block index, coded pool, coded block id)
        for i, k in plan[: max(worth - held, 0)]:
            if (coded_id := take_coded(k)) is None:
                break
            taken.append((i, k, coded_id))
        planned = min(worth, held) + len(taken)
        if planned < len(store_index):  # the plan ends at the first block nobody holds (or worth loading)
            end = store_index[planned]
        store_index = store_index[: min(worth, held)]
        for k in range(end - first):  # blocks still in this pool: device copies, ordered before any step
            if sources[k] is not None:
                self._raw(block_ids[first + k]).copy_(self._raw(sources[k]))
        if not store_index and not taken:
            self.stats.loaded_blocks += end - first
            return end - first
        self._ensure_loader()
        waits, self._reuse_waits = self._reuse_waits, []
        for sub in self.coded:  # coded blocks handed out again may still be copying down
            if sub is not None:
                waits, sub._reuse_waits = waits + sub._reuse_waits, []
        if (
            self.pool.is_cuda
        ):  # a step still in flight may write these blocks, freed under it (async scheduling)
            stepped = torch.cuda.Event()
            stepped.record(torch.cuda.current_stream(self.pool.device))
            waits.append(stepped)
        ids = [block_ids[i] for i in store_index]
        self._jobs.put(_Load(request, first, end, store_index, ids, waits, taken))
        return None

    def coded_store(self, pool: int) -> KVStore:
        sub = self.coded[pool]
        assert sub is not None  # planned only where a store exists
        return sub.store

    def _coded_plan(
        self, hashes: list[bytes], indices: list[int], coded_ok: Sequence[range]
    ) -> list[tuple[int, int]]:
        """The leading run of `indices` the coded stores hold where the policy allows: (block index, pool),
        the most precise copy first."""
        plan = []
        for i in indices:
            allowed = [k for k, ok in enumerate(coded_ok) if i in ok]
            pools = [k for k in range(max(allowed, default=-1) + 1) if self._coded(k) is not None]
            pool = next((k for k in pools if self.coded_store(k).lookup([hashes[i]])), None)
            if pool is None:
                break
            plan.append((i, pool))
        return plan

    def _ensure_loader(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_loop, daemon=True, name="ridgeline-kv-loader")
            self._loader.start()

    def _load_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            hashes = [job.request.block_hashes[i] for i in job.store_index]
            arrived = []  # coded blocks that arrived, in order
            try:
                for event in job.waits:  # a destination block may still be copying down
                    event.synchronize()
                got = self.store.load(hashes, self.pool, job.block_ids) if hashes else 0
                if got == len(hashes):
                    arrived = self._load_coded(job)
            except Exception:  # noqa: BLE001 - a failed load means recompute, never a dead engine
                logger.exception("KV load of %d blocks failed; computing them", len(hashes) + len(job.coded))
                got = 0
                self.stats.load_failures += 1
            # the loaded run ends at the first store block that did not arrive
            order = job.store_index + [i for i, _, _ in job.coded]
            done = got + len(arrived)
            loaded = (order[done] if done < len(order) else job.end) - job.first
            result = Loaded(
                job.request,
                loaded,
                [(i, c) for i, _, c in arrived],
                [c for _, _, c in job.coded[len(arrived) :]],
            )
            with self._finished_lock:
                self._finished.append(result)
                self._finished_event.set()

    def _load_coded(self, job: _Load) -> list[tuple[int, int, int]]:
        """The job's coded blocks, a run of one pool at a time, until one does not arrive."""
        arrived: list[tuple[int, int, int]] = []
        hashes = job.request.block_hashes
        run: list[tuple[int, int, int]] = []
        for n, item in enumerate(job.coded):
            run.append(item)
            if n + 1 < len(job.coded) and job.coded[n + 1][1] == item[1]:
                continue
            sub = self.coded[item[1]]
            assert sub is not None
            local = [c - sub.first_id for _, _, c in run]
            try:
                got = sub.store.load([hashes[i] for i, _, _ in run], sub.pool, local)
            except Exception:  # noqa: BLE001 - the run ends here; what arrived before it counts
                logger.exception("coded KV load of %d blocks failed; computing them", len(run))
                self.stats.load_failures += 1
                break
            arrived += run[:got]
            if got < len(run):
                break
            run = []
        return arrived

    def take_finished(self) -> list[Loaded]:
        """The loads done since the last call."""
        with self._finished_lock:
            done, self._finished = self._finished, []
            self._finished_event.clear()
        for result in done:
            self.stats.loads += 1
            self.stats.loaded_blocks += result.blocks
            self.stats.loaded_coded_blocks += len(result.coded)
        return done

    def wait(self, timeout_s: float) -> None:
        """Block until a load finishes (or timeout): the engine has nothing else to step."""
        self._finished_event.wait(timeout_s)

    def close(self) -> None:
        for sub in self.coded:
            if sub is not None:
                sub.close()
        if self._offloader is not None:
            self._offloads.put(None)
            self._offloader.join(timeout=30)
            self._offloader = None
        if self._loader is not None:
            self._jobs.put(None)
            self._loader.join(timeout=30)
            self._loader = None


class NullOffloader:
    """No tier below HBM: nothing is written down, nothing is loaded (what an engine without a KVStore has,
    so that nothing asks whether there is one)."""

    store = None

    def __init__(self):
        self.stats = OffloadStats()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Nothing to compare loading against."""

    def write_through(self) -> None:
        """Nothing to write."""

    def on_cached(self, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Nothing to keep."""

    def on_evict(self, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Nothing to keep."""

    def on_cached_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Nothing to keep."""

    def on_evict_coded(self, pool: int, block_id: int, block_hash: bytes, priority: int = 0) -> None:
        """Nothing to keep."""

    def start_load(
        self,
        request,
        first: int,
        block_ids: list[int],
        max_blocks: int,
        block_size: int = 16,
        hbm_lookup=None,
        coded_ok: Sequence[range] = (),
        take_coded=None,
    ) -> int:
        return 0  # no block of the prompt is held below HBM

    def take_finished(self) -> list[Loaded]:
        return []

    def wait(self, timeout_s: float) -> None:
        """Never called: no load is ever in flight."""

    def drain(self, timeout_s: float = 30.0) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Holds nothing."""
