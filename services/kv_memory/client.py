"""A worker's KVStore backed by the node's KVMemoryService (services/kv_memory/service.py).

offload (write-through after each step) / put (at eviction, for blocks offload could not take): blocks are
copied into a local staging pool (host memory; pinned with CUDA, the copies async on the offload stream; a
shared-memory file the service maps when both are on one host), and a sender thread hands batches of
staged blocks to the service, which pulls them (KV transport) or copies them (shared memory). A full
staging pool takes nothing (counted), never blocks the step.

lookup/load: lookup asks the service which leading blocks it holds and pins them (one call); load, on the
engine's loader thread, copies them into the engine's pool — from the service's shared-memory pool on the
same host (DMA when the pool is pinned), else by a verified KV-transport pull — and releases them.
Anything going wrong (service dead or restarting, a torn transfer) means fewer blocks loaded: the engine
computes the rest; no call waits longer than `timeout_s`.
"""

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
import zlib
from typing import Any

import torch

from engine.kv.offload import KVStore
from services.kv_memory import shm
from services.messages.kv_memory import KVMemoryInfo, SharedMemoryPool
from services.transport import KVHandle, KVLayout, KVTransport, TransferError
from services.transport.block_copy import copy_blocks
from services.transport.cuda_ipc import host_id
from services.transport.factory import make_transport

logger = logging.getLogger(__name__)


SERVICE_START_TIMEOUT_S = 60.0


class KVMemoryClient(KVStore):
    def __init__(
        self,
        service,
        layout: KVLayout,
        pull_transport: KVTransport,
        staging_blocks: int = 64,
        kv_transport: str = "auto",
        use_shm: bool = True,
        timeout_s: float = 10.0,
        batch_blocks: int = 32,
    ):
        """`service`: a Ray actor handle of KVMemoryService. `pull_transport`: the worker's transport,
        registered on its KV pool (loads land there)."""
        import ray

        self._ray = ray
        self.service = service
        self.layout = layout
        self.use_shm = use_shm
        self.pull_transport = pull_transport
        self.timeout_s, self.batch_blocks = timeout_s, batch_blocks
        # the first call waits for the service actor to start (a process importing torch: tens of seconds
        # on a loaded node), so it gets longer than an operation does
        info: KVMemoryInfo = ray.get(service.info.remote(), timeout=max(timeout_s, SERVICE_START_TIMEOUT_S))
        if info.layout != layout:
            raise ValueError(f"kv memory service {info.name}: layout {info.layout}, worker {layout}")
        self.service_info = info
        block_bytes = layout.block_bytes
        name = f"ridgeline-stage-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging_shm: SharedMemoryPool | None = None
        staging_path = os.path.join(shm.SHM_DIR, name)
        use_shm = use_shm and info.shm is not None and info.shm.host == host_id()
        if use_shm and shm.fits(staging_blocks * block_bytes):
            raw = shm.create(staging_path, staging_blocks, block_bytes, pin=torch.cuda.is_available())
            self.staging_shm = SharedMemoryPool(staging_path, host_id(), staging_blocks, block_bytes)
        else:
            raw = torch.zeros(
                (staging_blocks, block_bytes), dtype=torch.uint8, pin_memory=torch.cuda.is_available()
            )
        self.staging = raw
        self.staging_typed = raw.view(getattr(torch, layout.dtype)).view(staging_blocks, *layout.block_shape)
        self.staging_transport: KVTransport | None = None
        if self.staging_shm is None:  # the service pulls staged blocks through the transport
            self.staging_transport = make_transport(kv_transport)
            self.staging_transport.register(self.staging_typed)
        self._service_pool: torch.Tensor | None = (
            None  # the service's shared-memory pool, mapped on first use
        )
        self._load_stream: torch.cuda.Stream | None = None
        self._service_pool_incarnation: str | None = None
        self._free_staging = list(range(staging_blocks - 1, -1, -1))
        self._staging_lock = threading.Lock()
        self._acquired: dict[tuple, list[KVHandle]] = {}  # the blocks' hashes -> handles awaiting their load
        self._acquired_lock = threading.Lock()
        self.stats: dict[str, Any] = {
            "staged": 0,
            "staging_full": 0,
            "ingested": 0,
            "ingest_failures": 0,
            "lookups": 0,
            "lookup_failures": 0,
            "loaded_blocks": 0,
            "load_failures": 0,
            "load_seconds": 0.0,
            "loads_by_path": {"shm": 0, "transport": 0},
        }
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_loop, daemon=True, name="ridgeline-kv-offload-sender"
        )
        self._sender.start()

    # -- offload -----------------------------------------------------------------------------------

    def _take_staging(self, n: int) -> list[int]:
        with self._staging_lock:
            k = min(n, len(self._free_staging))
            slots = [self._free_staging.pop() for _ in range(k)]
        self.stats["staging_full"] += n - k
        self.stats["staged"] += k
        return slots

    def put(self, block_hash: bytes, data: torch.Tensor, priority: int = 0) -> None:
        slots = self._take_staging(1)
        if slots:
            self.staging[slots[0]].copy_(
                data.reshape(-1)
            )  # GPU -> pinned host: one DMA, done when it returns
            self._queue.put((None, [(block_hash, slots[0], priority)]))

    def offload(
        self,
        block_hashes: list[bytes],
        priorities: list[int],
        pool: torch.Tensor,
        block_ids: list[int],
        stream: torch.cuda.Stream | None = None,
    ) -> list[bool]:
        slots = self._take_staging(len(block_ids))
        if not slots:
            return [False] * len(block_ids)
        k = len(slots)
        copy_blocks(pool, block_ids[:k], self.staging_typed, slots, stream, wait=not pool.is_cuda)
        event = None
        if pool.is_cuda:
            event = torch.cuda.Event()
            event.record(stream or torch.cuda.current_stream(pool.device))
        self._queue.put((event, list(zip(block_hashes[:k], slots, priorities[:k], strict=True))))
        return [True] * k + [False] * (len(block_ids) - k)

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = []
            while item is not None:
                event, staged = item
                if event is not None:
                    event.synchronize()  # the copies into staging landed
                batch += staged
                if len(batch) >= self.batch_blocks:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)
            for start in range(0, len(batch), self.batch_blocks):
                self._send(batch[start : start + self.batch_blocks])

    def _send(self, batch: list[tuple[bytes, int, int]]) -> None:
        hashes, slots, priorities = (list(x) for x in zip(*batch, strict=True))
        try:
            if self.staging_shm is not None:
                checksums = [zlib.crc32(self.staging[s].numpy().data) for s in slots]
                handle = KVHandle(uuid.uuid4().hex, "shm", slots, 0, self.layout, checksums, "crc32")
            else:
                assert self.staging_transport is not None  # staged through one or the other
                handle = self.staging_transport.handle(slots, 0)
            got = self._ray.get(
                self.service.ingest.remote(hashes, priorities, handle, self.staging_shm),
                timeout=self.timeout_s,
            )
            self.stats["ingested"] += got
        except Exception as e:  # noqa: BLE001 - a lost offload only costs a recompute later
            self.stats["ingest_failures"] += 1
            logger.warning("offload of %d blocks to the KV memory service failed: %r", len(batch), e)
        finally:
            with self._staging_lock:
                self._free_staging += slots

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every staged block was handed to the service (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._staging_lock:
                if len(self._free_staging) == self.staging.shape[0] and self._queue.empty():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"offload sender did not drain in {timeout_s} s")
            time.sleep(0.005)
        self._ray.get(self.service.flush.remote(timeout_s), timeout=timeout_s + 5)

    # -- load --------------------------------------------------------------------------------------

    def lookup(self, block_hashes: list[bytes]) -> int:
        if not block_hashes:
            return 0
        self.stats["lookups"] += 1
        try:
            handle = self._ray.get(self.service.acquire.remote(block_hashes), timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - dead or restarting service: compute instead
            self.stats["lookup_failures"] += 1
            logger.warning("KV memory service lookup failed: %r", e)
            return 0
        if handle is None:
            return 0
        held = max(len(handle.block_ids), handle.source.get("held", 0))
        with self._acquired_lock:  # load() gets exactly the held run: the key
            self._acquired.setdefault(tuple(block_hashes[:held]), []).append(handle)
        return held

    def load(self, block_hashes: list[bytes], pool: torch.Tensor, block_ids: list[int]) -> int:
        with self._acquired_lock:
            waiting = self._acquired.get(tuple(block_hashes))
            handle = waiting.pop() if waiting else None
            if waiting == []:
                del self._acquired[tuple(block_hashes)]
        start, done = time.perf_counter(), 0
        want = min(len(block_hashes), len(block_ids))
        while handle is not None:
            n = min(len(handle.block_ids), want - done)
            ok = self._copy(handle, n, pool, block_ids[done : done + n])
            self._release(handle, wait=done + n < want)  # before asking for more: free those slots
            if not ok:
                break
            done += n
            if done >= want:
                break
            try:  # the service's DRAM could pin only part of the run: ask for the rest
                handle = self._ray.get(
                    self.service.acquire.remote(block_hashes[done:want]), timeout=self.timeout_s
                )
            except Exception as e:  # noqa: BLE001
                logger.warning("KV memory service acquire failed: %r", e)
                handle = None
        self.stats["loaded_blocks"] += done
        self.stats["load_seconds"] += time.perf_counter() - start
        return done

    def _copy(self, handle: KVHandle, n: int, pool: torch.Tensor, block_ids: list[int]) -> bool:
        try:
            src = self._service_pool_for(handle)
            if src is not None:  # same host: straight from the service's (pinned) pool, DMA on a GPU
                stream = None
                if pool.is_cuda:  # a side stream: the engine's stream keeps computing meanwhile
                    self._load_stream = self._load_stream or torch.cuda.Stream(pool.device)
                    stream = self._load_stream
                copy_blocks(src, handle.block_ids[:n], pool, block_ids, stream)
                self.stats["loads_by_path"]["shm"] += 1
            else:
                self.pull_transport.pull(handle.select(range(n)), block_ids, timeout_s=self.timeout_s)
                self.stats["loads_by_path"]["transport"] += 1
            return True
        except (TransferError, RuntimeError, OSError) as e:
            self.stats["load_failures"] += 1
            logger.warning("KV load of %d blocks from the memory service failed: %r", n, e)
            return False

    def _service_pool_for(self, handle: KVHandle) -> torch.Tensor | None:
        pool: SharedMemoryPool | None = handle.source.get("shm")
        if not self.use_shm or pool is None or pool.host != host_id():
            return None
        if self._service_pool_incarnation != pool.incarnation:  # first use, or the service restarted
            self._service_pool = None
            try:
                self._service_pool = shm.open_pool(pool.path, pool.capacity_blocks, pool.block_bytes)
            except (OSError, RuntimeError):
                return None
            self._service_pool_incarnation = pool.incarnation
        return self._service_pool

    def _release(self, handle: KVHandle, wait: bool = False) -> None:
        try:
            ref = self.service.release.remote(handle.handle_id)  # the lease covers a lost call
            if wait:
                self._ray.get(ref, timeout=self.timeout_s)
        except Exception:  # noqa: BLE001, S110 - a dead service holds no pins
            pass

    def served_blocks(self) -> dict[str, int]:
        """The node's service serves from its DRAM (its SSD blocks are promoted to DRAM first)."""
        return {"dram": self.stats["loaded_blocks"]}

    def close(self) -> None:
        self._queue.put(None)
        self._sender.join(timeout=10)
        if self.staging_transport is not None:
            self.staging_transport.close()
        if self.staging_shm is not None:
            with contextlib.suppress(Exception):  # a dead service maps nothing
                self.service.forget_staging.remote(self.staging_shm.path)
            shm.remove(self.staging_shm.path, self.staging)
