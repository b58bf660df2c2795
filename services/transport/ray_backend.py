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
        regions = [self.region_of(b) for b in block_ids]
        if not any(regions):
            blocks = self.pool[torch.tensor(block_ids, device=self.pool.device)].cpu()  # [n, *block_shape]
            return {"ref": ray.put(blocks.contiguous().view(torch.uint8).numpy())}
        rows = []  # coded blocks among them: each block's bytes in order, with their sizes
        for b, r in zip(block_ids, regions, strict=True):
            region = self.regions[r]
            rows.append(region.tensor[b - region.first_id].reshape(-1).view(torch.uint8).cpu())
        data = torch.cat(rows).numpy()
        return {"ref": ray.put(data), "sizes": [len(row) for row in rows]}

    def _read(
        self, handle: KVHandle, dest: torch.Tensor, into_block_ids: list[int], timeout_s: float
    ) -> None:
        try:
            data: np.ndarray = ray.get(handle.source["ref"], timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - owner died, object lost, timeout: all mean no KV
            raise TransferError(
                f"Ray object for handle {handle.handle_id} unavailable: {e!r}", retryable=False
            ) from e
        data = data.reshape(-1)  # bytes
        sizes = handle.source.get("sizes")
        if sizes is None:  # all base blocks: equal rows
            size = handle.layout.block_bytes
            sizes = [size] * (data.size // size) if data.size % size == 0 else []
        if sum(sizes) != data.size:
            raise TransferError(
                f"length mismatch: {data.nbytes} bytes received, rows of {sum(sizes)} expected"
            )
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        positions = handle.exported_positions()  # a tail or selection reads part of the object
        if positions and max(positions) >= len(sizes):
            raise TransferError(
                f"length mismatch: {len(sizes)} blocks received, blocks {positions} asked for"
            )
        want = dest[0].numel() * dest.element_size()
        if any(sizes[p] != want for p in positions):
            raise TransferError(f"length mismatch: blocks of {want} bytes expected at {positions}")
        if positions == list(range(positions[0], positions[0] + len(positions))) if positions else True:
            picked = data[starts[positions[0]] : starts[positions[-1] + 1]] if positions else data[:0]
        else:
            picked = np.concatenate([data[starts[p] : starts[p + 1]] for p in positions])
        with warnings.catch_warnings():  # the object store's buffer is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(picked))
        blocks = raw.view(dest.dtype).view(-1, *dest.shape[1:])
        dest[torch.tensor(into_block_ids, device=dest.device)] = blocks.to(dest.device)

    def release(self, handle: KVHandle) -> None:
        handle.source.pop("ref", None)  # drop our reference; the object store frees it when all are gone
