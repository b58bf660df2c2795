"""KV transport through the Ray object store: handle() copies the blocks into an object, pull() reads it.
The fallback where NIXL is missing; the owner frees its blocks at once (the object holds the copy), and the
object goes away when the last reference to the handle does (Ray's reference counting is the lease)."""

import warnings

import numpy as np
import ray
import torch

from services.transport.base import KVHandle, KVTransport, TransferError


class RayTransport(KVTransport):
    name = "ray"
    holds_source_blocks = False

    def _export(self, block_ids: list[int]) -> dict:
        blocks = self.pool[torch.tensor(block_ids, device=self.pool.device)].cpu()  # [n, *block_shape]
        return {"ref": ray.put(blocks.contiguous().view(torch.uint8).numpy())}

    def _read(
        self, handle: KVHandle, dest: torch.Tensor, into_block_ids: list[int], timeout_s: float
    ) -> None:
        try:
            data: np.ndarray = ray.get(handle.source["ref"], timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - owner died, object lost, timeout: all mean no KV
            raise TransferError(
                f"Ray object for handle {handle.handle_id} unavailable: {e!r}", retryable=False
            ) from e
        rows = (
            data.reshape(-1, handle.layout.block_bytes)
            if data.size % handle.layout.block_bytes == 0
            else None
        )
        positions = handle.exported_positions()  # a tail or selection reads part of the object
        if rows is None or (positions and max(positions) >= rows.shape[0]):
            raise TransferError(f"length mismatch: {data.nbytes} bytes received for blocks {positions}")
        contiguous = (
            positions == list(range(positions[0], positions[0] + len(positions))) if positions else True
        )
        data = (
            rows[positions[0] : positions[0] + len(positions)]
            if positions and contiguous
            else rows[positions]
        )
        if data.nbytes != handle.num_bytes:
            raise TransferError(f"length mismatch: {data.nbytes} bytes received, {handle.num_bytes} expected")
        with warnings.catch_warnings():  # the object store's buffer is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(data))
        blocks = raw.view(dest.dtype).view(-1, *dest.shape[1:])
        dest[torch.tensor(into_block_ids, device=dest.device)] = blocks.to(dest.device)

    def release(self, handle: KVHandle) -> None:
        handle.source.pop("ref", None)  # drop our reference; the object store frees it when all are gone
