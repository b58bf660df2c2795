"""KVMemoryService: one per node (a detached Ray actor, restarted by Ray if it dies), holding the DRAM and
SSD tiers every worker on the node shares. A block one replica evicted can be loaded by another; a
restarted service (or worker) finds what the SSD tier held.

The bytes never travel through Ray calls. Writers (`ingest`) hand over a KV handle on their staging pool
and the service pulls it through the KV transport (or copies it from the writer's shared-memory staging
file on the same host); readers (`acquire`) get a handle on pinned DRAM slots and pull them themselves,
or copy them straight from the service's shared-memory pool when on the same host. Pinned slots stay
pinned until the reader releases them or the lease runs out.
"""

import contextlib
import glob
import hashlib
import os
import threading
import zlib
from typing import Any

import torch

from engine.kv.events import KVEventLog
from services.kv_memory import shm
from services.kv_memory.tier_policy import TierPolicy
from services.kv_memory.tiered_store import build_store
from services.messages.kv_memory import KVMemoryInfo, SharedMemoryPool
from services.transport import KVHandle, KVLayout, TransferError
from services.transport.block_copy import copy_blocks
from services.transport.cuda_ipc import host_id
from services.transport.factory import make_transport
from services.transport.leases import LeaseTable

NAMESPACE = "ridgeline"


def layout_key(layout: KVLayout) -> str:
    return hashlib.blake2b(repr(layout).encode(), digest_size=6).hexdigest()


def service_name(node_id: str, layout: KVLayout) -> str:
    """One service per node and block layout (workers of one model share it)."""
    return f"kv-memory-{node_id[:16]}-{layout_key(layout)}"


class KVMemoryService:
    def __init__(
        self,
        name: str,
        block_shape: tuple[int, ...],
        dtype: str,
        dram_blocks: int,
        ssd_dir: str | None = None,
        ssd_blocks: int = 0,
        kv_transport: str = "auto",
        use_shm: bool = True,
        lease_ttl_s: float = 30.0,
        policy: dict | None = None,
    ):
        """`policy`: {priority: lowest tier} (services/kv_memory/tier_policy.py)."""
        self.name, self.incarnation = name, os.urandom(6).hex()
        self.layout = KVLayout(tuple(block_shape), dtype)
        block_bytes = self.layout.block_bytes
        shm_path = None
        for stale in glob.glob(os.path.join(shm.SHM_DIR, f"ridgeline-{name}-*")):  # a killed incarnation's
            with contextlib.suppress(OSError):
                os.unlink(stale)
        shm.sweep_dead_staging()  # and killed workers' staging files
        if use_shm and shm.fits(dram_blocks * block_bytes):
            shm_path = os.path.join(shm.SHM_DIR, f"ridgeline-{name}-{self.incarnation}")
        self.store = build_store(
            block_bytes,
            dram_blocks,
            ssd_dir,
            ssd_blocks,
            TierPolicy({int(k): v for k, v in (policy or {}).items()}),
            block_shape=self.layout.block_shape,
            dtype=getattr(torch, dtype),
            shm_path=shm_path,
        )
        self.events = KVEventLog()
        self.store.events = self.events
        self.transport = make_transport(kv_transport)
        self.transport.register(self.store.dram.typed)
        self.shm = (
            None
            if shm_path is None
            else SharedMemoryPool(shm_path, host_id(), dram_blocks, block_bytes, self.incarnation)
        )
        self.counters: dict[str, Any] = {
            "acquires": 0,
            "acquired_blocks": 0,
            "bytes_out": 0,
            "releases": 0,
            "leases_reclaimed": 0,
            "ingests": 0,
            "ingested_blocks": 0,
            "bytes_in": 0,
            "ingest_failures": 0,
            "ingest_by_path": {"shm": 0, "transport": 0},
        }
        self._leases = LeaseTable(lease_ttl_s)
        self._pinned: dict[str, list[int]] = {}  # handle id -> DRAM slots it pins
        self._lock = threading.Lock()
        self._staging_maps: dict[str, torch.Tensor] = {}  # writers' shared-memory staging pools
        self._stop = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_loop, daemon=True, name="ridgeline-kv-memory-reaper"
        )
        self._reaper.start()

    def info(self) -> KVMemoryInfo:
        return KVMemoryInfo(
            name=self.name,
            incarnation=self.incarnation,
            pid=os.getpid(),
            layout=self.layout,
            transport=self.transport.name,
            shm=self.shm,
            policy=dict(self.store.policy.lowest_tier),
        )

    # -- reads -------------------------------------------------------------------------------------

    def acquire(self, block_hashes: list[bytes]) -> KVHandle | None:
        """A handle on the leading run of these blocks (pinned in DRAM), or None if the first is missing.
        `handle.source["held"]`: how long the run is in all tiers (the rest can be acquired once these
        are released)."""
        slots = self.store.acquire(block_hashes)
        if not slots:
            return None
        dram = self.store.dram
        checksums = []
        for slot in slots:  # stored blocks are checksummed once; a pinned slot cannot change meanwhile
            checksum = dram.checksums[slot]
            if checksum is None:
                checksum = dram.checksums[slot] = zlib.crc32(dram.pool[slot].numpy().data)
            checksums.append(checksum)
        try:
            handle = self.transport.handle(slots, 0, checksums=checksums)
        except Exception:
            self.store.release(slots)
            raise
        handle.source["shm"] = self.shm
        # the whole run held in any tier: DRAM may have had room to pin only part of it
        handle.source["held"] = len(slots) + self.store.lookup(block_hashes[len(slots) :])
        with self._lock:
            if self.transport.holds_source_blocks or self.shm is not None:
                self._pinned[handle.handle_id] = slots
                self._leases.grant(handle.handle_id, "acquire")
            else:  # the handle holds a copy: the slots are free to move
                self.store.release(slots)
            self.counters["acquires"] += 1
            self.counters["acquired_blocks"] += len(slots)
            self.counters["bytes_out"] += len(slots) * self.layout.block_bytes
        return handle

    def release(self, handle_id: str) -> bool:
        """The reader is done with an acquired handle (copied through shared memory, or gave up)."""
        with self._lock:
            slots = self._pinned.pop(handle_id, None)
            self._leases.end(handle_id)
            if slots is not None:
                self.counters["releases"] += 1
        if slots is not None:
            self.store.release(slots)
        return slots is not None

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.05):
            for handle_id in self.transport.take_released():  # NIXL notifications from readers
                self.release(handle_id)
            with self._lock:
                expired = self._leases.expired()
                gone = [self._pinned.pop(lease.handle_id, None) for lease in expired]
                self.counters["leases_reclaimed"] += sum(1 for slots in gone if slots is not None)
            for slots in gone:
                if slots is not None:
                    self.store.release(slots)

    # -- writes ------------------------------------------------------------------------------------

    def ingest(
        self,
        block_hashes: list[bytes],
        priorities: list[int],
        handle: KVHandle,
        staging: SharedMemoryPool | None = None,
    ) -> int:
        """Take in a writer's blocks (handle.block_ids[i] holds block_hashes[i]); returns how many were
        stored. Blocks already held, or whose class may not live in DRAM, are skipped. `staging`: the
        writer's shared-memory staging pool — copied directly when on this host."""
        stored, start = 0, 0
        while start < len(block_hashes):  # in rounds: a batch may be larger than DRAM's free slots
            plan, upto = self.store.reserve(block_hashes[start:], priorities[start:])
            plan = [(start + i, slot) for i, slot in plan]
            if not plan and upto == 0:  # every DRAM slot is pinned by readers: drop the rest
                self.store.stats["dropped"] += len(block_hashes) - start
                break
            if plan and not self._fill(plan, block_hashes, priorities, handle, staging):
                self.counters["ingest_failures"] += 1
                break
            stored += len(plan)
            start += upto
        self.counters["ingests"] += 1
        self.counters["ingested_blocks"] += stored
        self.counters["bytes_in"] += stored * self.layout.block_bytes
        return stored

    def _fill(
        self,
        plan: list[tuple[int, int]],
        block_hashes: list[bytes],
        priorities: list[int],
        handle: KVHandle,
        staging: SharedMemoryPool | None,
    ) -> bool:
        """Move the planned blocks into their reserved slots and commit them; on failure free the slots."""
        indices, slots = [i for i, _ in plan], [slot for _, slot in plan]
        try:
            src = self._staging_pool(staging)
            if src is not None:
                copy_blocks(src, [handle.block_ids[i] for i in indices], self.store.dram.pool, slots)
                for i, slot in plan:  # the writer may have reused its staging slot if it gave up on us
                    if zlib.crc32(self.store.dram.pool[slot].numpy().data) != handle.checksums[i]:
                        raise TransferError(f"staged block {i} changed while it was copied")
                self.counters["ingest_by_path"]["shm"] += 1
            else:
                self.transport.pull(handle.select(indices), slots)
                self.counters["ingest_by_path"]["transport"] += 1
        except (TransferError, RuntimeError, OSError):
            for slot in slots:
                self.store.abort(slot)
            return False
        for i, slot in plan:
            self.store.commit(block_hashes[i], slot, priorities[i], handle.checksums[i])
        return True

    def _staging_pool(self, staging: SharedMemoryPool | None) -> torch.Tensor | None:
        if staging is None or staging.host != host_id() or self.shm is None:
            return None
        path = staging.path
        with self._lock:
            pool = self._staging_maps.get(path)
        if pool is None:
            try:
                pool = shm.open_pool(path, staging.capacity_blocks, staging.block_bytes)
            except (OSError, RuntimeError):
                return None
            with self._lock:
                self._staging_maps[path] = pool
        return pool

    def forget_staging(self, path: str) -> None:
        """A writer went away: drop the mapping of its staging file."""
        with self._lock:
            self._staging_maps.pop(path, None)

    # -- state -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            counters = {
                **self.counters,
                "ingest_by_path": dict(self.counters["ingest_by_path"]),
                "leased_handles": len(self._pinned),
            }
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            **counters,
            **self.store.occupancy(),
            **{f"tier_{k}": v for k, v in self.store.stats.items()},
        }

    def kv_events(self) -> list:
        """Blocks stored/removed per tier since the last call (for the router's index)."""
        return self.events.drain()

    def flush(self, timeout_s: float = 30.0) -> None:
        self.store.flush(timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)
        self.transport.close()
        self.store.close()

    def __del__(self):
        if (
            not getattr(self, "_stop", threading.Event()).is_set()
            and getattr(self, "store", None) is not None
        ):
            with contextlib.suppress(Exception):
                self.close()


def connect(
    layout: KVLayout,
    dram_blocks: int,
    ssd_dir: str | None = None,
    ssd_blocks: int = 0,
    kv_transport: str = "auto",
    use_shm: bool = True,
    policy: dict | None = None,
):
    """The KV memory service of this node for this block layout, started if it is not running yet (a
    detached actor pinned to the node; Ray restarts it if it dies, and it reopens its SSD tier)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    name = service_name(node_id, layout)
    if ssd_dir is not None:
        ssd_dir = os.path.join(ssd_dir, name)
    actor = ray.remote(KVMemoryService).options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=16,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    )
    return actor.remote(
        name,
        layout.block_shape,
        layout.dtype,
        dram_blocks,
        ssd_dir,
        ssd_blocks,
        kv_transport,
        use_shm,
        policy=policy,
    )


def shutdown_services(timeout_s: float = 30.0) -> int:
    """Stop every KV memory service of this Ray cluster (they are detached: nothing else stops them)."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith("kv-memory-")
    ]
    for name in names:
        with contextlib.suppress(Exception):
            actor = ray.get_actor(name, namespace=NAMESPACE)
            with contextlib.suppress(Exception):
                ray.get(actor.close.remote(), timeout=timeout_s)  # unlinks its shared memory
            ray.kill(actor, no_restart=True)
    return len(names)
