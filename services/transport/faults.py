"""Fault injection for tests: a transport whose first N pulls land with one word flipped."""

import torch

from services.transport.base import KVHandle, KVTransport


class CorruptingTransport(KVTransport):
    def __init__(self, inner: KVTransport, corrupt_pulls: int):
        self.inner, self.remaining = inner, corrupt_pulls
        self.name, self.holds_source_blocks = inner.name, inner.holds_source_blocks
        self.pool, self.layout = inner.pool, inner.layout

    def _export(self, block_ids: list[int]) -> dict:
        return self.inner._export(block_ids)

    def _read(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
        self.inner._read(handle, into_block_ids, timeout_s)
        if self.remaining > 0:
            self.remaining -= 1
            block = self.pool[into_block_ids[-1]].view(-1)
            block[0] = block[0] + torch.ones((), dtype=block.dtype)  # a torn write

    def release(self, handle: KVHandle) -> None:
        self.inner.release(handle)

    def take_released(self) -> list[str]:
        return self.inner.take_released()

    def close(self) -> None:
        self.inner.close()
