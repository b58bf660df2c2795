"""Worker subclasses for fault tests, named by `PoolConfig.worker_cls` (Ray workers import this module from
tests/services, which the ray_serve fixture puts on their PYTHONPATH)."""

import torch

from services.decode import DecodeWorker
from services.transport.base import KVHandle, KVTransport


class BreakableDecodeWorker(DecodeWorker):
    """A decode worker whose engine step can be made to fail, as a device fault or a kernel bug would."""

    async def break_engine(self) -> str:
        """From the next step on, the engine raises; returns this replica's name."""

        def broken_step():
            raise RuntimeError("injected engine fault")

        self.engine.step = broken_step
        return self.name


class CorruptingTransport(KVTransport):
    """A transport whose first N pulls land with one word flipped, as a torn write would leave them
    (after the read, before the checksum: what verification must catch)."""

    def __init__(self, inner: KVTransport, corrupt_pulls: int):
        self.inner, self.remaining = inner, corrupt_pulls
        self.name, self.holds_source_blocks = inner.name, inner.holds_source_blocks
        self.pool, self.layout, self.kv_scales = inner.pool, inner.layout, inner.kv_scales
        self.regions = inner.regions  # the pool's, and any coded pools registered on the inner transport

    def _export(self, block_ids: list[int]) -> dict:
        return self.inner._export(block_ids)

    def _read(
        self, handle: KVHandle, dest: torch.Tensor, into_block_ids: list[int], timeout_s: float
    ) -> None:
        self.inner._read(handle, dest, into_block_ids, timeout_s)
        if self.remaining > 0:
            self.remaining -= 1
            block = dest[into_block_ids[-1]].view(-1)
            block[0] = block[0] + torch.ones((), dtype=block.dtype)

    def release(self, handle: KVHandle) -> None:
        self.inner.release(handle)

    def take_released(self) -> list[str]:
        return self.inner.take_released()

    def close(self) -> None:
        self.inner.close()


class CorruptingDecodeWorker(DecodeWorker):
    """A decode worker whose first KV pull lands corrupted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.transport = CorruptingTransport(self.transport, 1)
