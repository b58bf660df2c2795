"""KV transport over NIXL (UCX): the puller issues one READ of per-block descriptors straight from the
owner's registered pool into its own, then tells the owner by a NIXL notification that it may free them.

The whole pool is registered once as one region; each block is one descriptor (block-major layout), so a
transfer of n blocks is one request of n descriptors. Works for DRAM and GPU pools alike.
"""

import time
import uuid

import numpy as np
import torch

from services.transport.base import KVHandle, KVTransport, TransferError

_RELEASE = b"ridgeline-release:"


def _block_descs(base: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """[num_blocks, 3] (address, length, device id): one descriptor per block."""
    addrs = base + np.arange(num_blocks, dtype=np.int64) * block_bytes
    return np.stack([addrs, np.full(num_blocks, block_bytes), np.full(num_blocks, device_id)], axis=1)


class NixlTransport(KVTransport):
    name = "nixl"
    holds_source_blocks = True

    def __init__(self, agent_name: str | None = None):
        from nixl._api import nixl_agent, nixl_agent_config

        self.agent_name = agent_name or f"ridgeline-{uuid.uuid4().hex[:12]}"
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(backends=["UCX"]))
        self._peers: dict[str, object] = {}  # remote agent name -> its prepared block descriptor list

    def register(self, pool: torch.Tensor) -> None:
        super().register(pool)
        self.mem_type = "VRAM" if pool.is_cuda else "DRAM"
        self.device_id = (pool.device.index or 0) if pool.is_cuda else 0
        self._reg = self.agent.register_memory(pool)
        descs = _block_descs(pool.data_ptr(), pool.shape[0], self.layout.block_bytes, self.device_id)
        self._local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, self.mem_type)
        self._metadata = self.agent.get_agent_metadata()

    def _export(self, block_ids: list[int]) -> dict:
        return {"agent": self.agent_name, "metadata": self._metadata, "base": self.pool.data_ptr(),
                "num_blocks": self.pool.shape[0], "device_id": self.device_id, "mem_type": self.mem_type}

    def _peer(self, source: dict):
        name = source["agent"]
        if name not in self._peers:
            added = self.agent.add_remote_agent(source["metadata"])
            if (added.decode() if isinstance(added, bytes) else added) != name:
                raise TransferError(f"NIXL metadata does not belong to agent {name!r}")
            descs = _block_descs(source["base"], source["num_blocks"], self.layout.block_bytes,
                                 source["device_id"])
            self._peers[name] = self.agent.prep_xfer_dlist(name, descs, source["mem_type"])
        return self._peers[name]

    def _read(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
        try:
            remote = self._peer(handle.source)
            xfer = self.agent.make_prepped_xfer("READ", self._local, into_block_ids, remote, handle.block_ids)
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - NIXL raises its own status errors
            raise TransferError(f"NIXL could not set up the read from {handle.source['agent']}: {e}") from e
        try:
            state = self.agent.transfer(xfer)
            deadline = time.monotonic() + timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"NIXL read of {len(into_block_ids)} blocks timed out after {timeout_s}s")
                time.sleep(0.0002)
                state = self.agent.check_xfer_state(xfer)
            if state != "DONE":
                raise TransferError(f"NIXL read from {handle.source['agent']} ended in state {state}")
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TransferError(f"NIXL read from {handle.source['agent']} failed: {e}") from e
        finally:
            self.agent.release_xfer_handle(xfer)

    def release(self, handle: KVHandle) -> None:
        try:
            self._peer(handle.source)
            self.agent.send_notif(handle.source["agent"], _RELEASE + handle.handle_id.encode())
        except Exception:  # noqa: BLE001, S110 - a dead owner frees nothing; its lease table died with it
            pass

    def take_released(self) -> list[str]:
        released = []
        for messages in self.agent.get_new_notifs().values():
            released += [m[len(_RELEASE):].decode() for m in messages if m.startswith(_RELEASE)]
        return released

    def close(self) -> None:
        for peer in list(self._peers):
            self.agent.remove_remote_agent(peer)
        self._peers.clear()
        if getattr(self, "_reg", None) is not None:
            self.agent.deregister_memory(self._reg)
            self._reg = None
