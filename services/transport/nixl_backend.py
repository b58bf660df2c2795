"""KV transport over NIXL (UCX): the puller issues one READ of per-block descriptors straight from the
owner's registered pool into its own, then tells the owner by a NIXL notification that it may free them.

The whole pool is registered once as one region; each block is one descriptor (block-major layout), so a
transfer of n blocks is one request of n descriptors. Works for DRAM and GPU pools alike. Coded pools (a KV age
policy's) are registered as more regions; one descriptor list covers them all, indexed by the engine's block
id, on both sides.
"""

import base64
import contextlib
import threading
import time
import uuid

import numpy as np
import torch

from services.transport import cuda_ipc
from services.transport.base import KVHandle, KVTransport, TransferError

_RELEASE = b"ridgeline-release:"


def _block_descs(base: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """[num_blocks, 3] (address, length, device id): one descriptor per block."""
    addrs = base + np.arange(num_blocks, dtype=np.int64) * block_bytes
    return np.stack([addrs, np.full(num_blocks, block_bytes), np.full(num_blocks, device_id)], axis=1)


def _regions_descs(regions: list[tuple[int, int, int]], device_id: int) -> np.ndarray:
    """Descriptors of every block of regions [(address, num_blocks, block_bytes)], in block id order."""
    return np.concatenate([_block_descs(base, n, size, device_id) for base, n, size in regions])


class NixlTransport(KVTransport):
    name = "nixl"
    holds_source_blocks = True

    def __init__(
        self,
        agent_name: str | None = None,
        busy_progress: bool = False,
        poll_s: float = 0.001,
        use_cuda_ipc: bool = True,
    ):
        """`busy_progress`: NIXL's own progress thread, which spins a core without pause (lowest latency,
        for GPU servers with cores to spare). Default: a thread that drives UCX progress every `poll_s`
        (the owner side of a UCX TCP read needs progress to serve it) for a few % of a core.
        `use_cuda_ipc`: between GPU pools on one host, copy through CUDA IPC instead of a UCX read."""
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.agent_name = agent_name or f"ridgeline-{uuid.uuid4().hex[:12]}"
        # STRICT: the agent locks itself; pulls run on worker threads beside the progress thread
        config = nixl_agent_config(
            enable_prog_thread=busy_progress,
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.agent = nixl_agent(self.agent_name, config)
        self._peers: dict[str, object] = {}  # remote agent name -> its prepared block descriptor list
        self._peers_lock = threading.Lock()
        self.use_cuda_ipc = use_cuda_ipc
        self._ipc_pools: dict[str, torch.Tensor | None] = {}  # remote agent -> its mapped pool (None: no IPC)
        self.pulls_by_path = {"nixl": 0, "cuda_ipc": 0}
        self._released: list[str] = []
        self._stop = threading.Event()
        self._progress = None
        if not busy_progress:
            self._progress = threading.Thread(
                target=self._progress_loop, args=(poll_s,), daemon=True, name="ridgeline-nixl-progress"
            )
            self._progress.start()

    def _progress_loop(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self._collect_notifs()

    def _collect_notifs(self) -> None:
        notifs = self.agent.get_new_notifs()  # also progresses the UCX workers
        for messages in notifs.values():
            self._released += [m[len(_RELEASE) :].decode() for m in messages if m.startswith(_RELEASE)]

    def register(self, pool: torch.Tensor) -> None:
        super().register(pool)
        self.mem_type = "VRAM" if pool.is_cuda else "DRAM"
        self.device_id = (pool.device.index or 0) if pool.is_cuda else 0
        self._reg = self.agent.register_memory(pool)
        self._region_regs: list = []  # coded regions' registrations
        self._staging_handles: dict[int, tuple] = {}  # staging buffer address -> (registration, dlist)
        self._local = None
        self._prep_local()
        self._ipc_export = cuda_ipc.export_pool(pool) if pool.is_cuda and self.use_cuda_ipc else None

    def _region_list(self) -> list[tuple[int, int, int]]:
        return [(r.tensor.data_ptr(), r.tensor.shape[0], r.layout.block_bytes) for r in self.regions]

    def _prep_local(self) -> None:
        """One descriptor list over every registered region's blocks, and the metadata peers need."""
        if self._local is not None:
            self.agent.release_dlist_handle(self._local)
        descs = _regions_descs(self._region_list(), self.device_id)
        self._local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, self.mem_type)
        self._metadata = self.agent.get_agent_metadata()

    def _region_added(self, region) -> None:
        self._region_regs.append(self.agent.register_memory(region.tensor))
        self._prep_local()

    def describe(self) -> dict:
        metadata = getattr(self, "_metadata", None)
        return {
            **super().describe(),
            "agent": self.agent_name,
            "metadata": base64.b64encode(metadata).decode() if metadata else None,
        }

    def _register_staging(self, staging: torch.Tensor) -> None:
        """A staging buffer (blocks in another pool's format) as one more registered region to read into."""
        block_bytes = staging[0].numel() * staging.element_size()
        reg = self.agent.register_memory(staging)
        descs = _block_descs(staging.data_ptr(), staging.shape[0], block_bytes, self.device_id)
        self._staging_handles[staging.data_ptr()] = (
            reg,
            self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, self.mem_type),
        )

    def _unregister_staging(self, staging: torch.Tensor) -> None:
        reg, dlist = self._staging_handles.pop(staging.data_ptr())
        self.agent.release_dlist_handle(dlist)
        self.agent.deregister_memory(reg)

    def _export(self, block_ids: list[int]) -> dict:
        return {
            "agent": self.agent_name,
            "metadata": self._metadata,
            "regions": self._region_list(),
            "device_id": self.device_id,
            "mem_type": self.mem_type,
            "cuda_ipc": self._ipc_export,
        }

    def path_for(self, source: dict) -> str:
        """`cuda_ipc` for a GPU pool on this host that this process could map, else `nixl`."""
        name = source["agent"]
        with self._peers_lock:
            if name not in self._ipc_pools:
                self._ipc_pools[name] = self._map_ipc(source)
        return "nixl" if self._ipc_pools[name] is None else "cuda_ipc"

    def _map_ipc(self, source: dict) -> torch.Tensor | None:
        """The owner's pool mapped into this process, or None where IPC does not apply or fails."""
        export = source.get("cuda_ipc")
        if not (self.use_cuda_ipc and self.pool.is_cuda and export and export["host"] == cuda_ipc.host_id()):
            return None
        try:
            return cuda_ipc.open_pool(export)
        except RuntimeError:  # another container, no P2P, or a GPU this process cannot see
            return None

    def _peer(self, source: dict):
        name = source["agent"]
        with self._peers_lock:
            return self._peers.get(name) or self._add_peer(name, source)

    def _add_peer(self, name: str, source: dict):
        added = self.agent.add_remote_agent(source["metadata"])
        if (added.decode() if isinstance(added, bytes) else added) != name:
            raise TransferError(f"NIXL metadata does not belong to agent {name!r}")
        descs = _regions_descs(source["regions"], source["device_id"])  # the owner's blocks, by block id
        self._peers[name] = self.agent.prep_xfer_dlist(name, descs, source["mem_type"])
        return self._peers[name]

    def _read(
        self, handle: KVHandle, dest: torch.Tensor, into_block_ids: list[int], timeout_s: float
    ) -> None:
        path = self.path_for(handle.source)
        if any(handle.block_formats or []):  # IPC maps the owner's base pool only
            path = "nixl"
        self.pulls_by_path[path] += 1
        mapped = self._ipc_pools.get(handle.source["agent"])
        if path == "cuda_ipc" and mapped is not None:
            cuda_ipc.copy_blocks(mapped, handle.block_ids, dest, into_block_ids)  # the owner's base pool
            return
        region = next((r for r in self.regions if r.tensor is dest), None)
        if region is not None:  # our descriptor list is indexed by block id
            local, into_block_ids = self._local, [region.first_id + b for b in into_block_ids]
        else:
            local = self._staging_handles[dest.data_ptr()][1]
        try:
            remote = self._peer(handle.source)
            xfer = self.agent.make_prepped_xfer("READ", local, into_block_ids, remote, handle.block_ids)
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - NIXL raises its own status errors
            self._forget(handle.source["agent"])
            raise TransferError(
                f"NIXL could not set up the read from {handle.source['agent']}: {e}", retryable=False
            ) from e
        try:
            state = self.agent.transfer(xfer)
            deadline = time.monotonic() + timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(
                        f"NIXL read of {len(into_block_ids)} blocks timed out after {timeout_s}s",
                        retryable=False,
                    )
                time.sleep(0.0002)
                state = self.agent.check_xfer_state(xfer)
            if state != "DONE":
                raise TransferError(
                    f"NIXL read from {handle.source['agent']} ended in state {state}", retryable=False
                )
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TransferError(
                f"NIXL read from {handle.source['agent']} failed: {e}", retryable=False
            ) from e
        finally:
            self.agent.release_xfer_handle(xfer)

    def _forget(self, name: str) -> None:
        """Drop a peer that failed (a dead owner's agent name never comes back)."""
        with self._peers_lock:
            if self._peers.pop(name, None) is not None:
                with contextlib.suppress(Exception):  # already gone
                    self.agent.remove_remote_agent(name)
            self._ipc_pools.pop(name, None)

    def release(self, handle: KVHandle) -> None:
        try:
            self._peer(handle.source)
            self.agent.send_notif(handle.source["agent"], _RELEASE + handle.handle_id.encode())
        except Exception:  # noqa: BLE001, S110 - a dead owner frees nothing; its lease table died with it
            pass

    def take_released(self) -> list[str]:
        if self._progress is None:
            self._collect_notifs()
        released, self._released = self._released, []
        return released

    def close(self) -> None:
        self._stop.set()
        if self._progress is not None:
            self._progress.join(timeout=5)
        for peer in list(self._peers):
            self.agent.remove_remote_agent(peer)
        self._peers.clear()
        staging = getattr(self, "_staging", None)
        if staging is not None:
            self._unregister_staging(staging)
            self._staging = None
        if getattr(self, "_reg", None) is not None:
            for reg in [self._reg, *self._region_regs]:
                self.agent.deregister_memory(reg)
            self._reg, self._region_regs = None, []
