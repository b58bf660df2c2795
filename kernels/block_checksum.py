"""Per-block checksum of a block-major KV pool: sum_i (i + 1) * word_i over each block's 32-bit words,
mod 2**64. One read of the blocks (no int64 copy of them, unlike the torch reference); partial sums per
tile are added in torch. Modular arithmetic is associative, so the kernel equals the reference exactly."""

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["block_checksum", "block_checksum_ref"]


def block_checksum_ref(words: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """words [num_blocks, W] int32 (the pool viewed as words), block_ids [n] -> int64 [n]."""
    w = words.index_select(0, block_ids).to(torch.int64)  # [n, W]
    weights = torch.arange(1, words.shape[1] + 1, device=words.device, dtype=torch.int64)
    return (w * weights).sum(dim=1)


@triton.jit
def _block_checksum_kernel(words_ptr, ids_ptr, partial_ptr, W, num_tiles, TILE: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    block = tl.load(ids_ptr + b).to(tl.int64)
    offs = t.to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < W
    w = tl.load(words_ptr + block * W + offs, mask=mask, other=0).to(tl.int64)
    tl.store(partial_ptr + b * num_tiles + t, tl.sum(w * (offs + 1), axis=0))


def block_checksum(words: torch.Tensor, block_ids: torch.Tensor, tile: int = 8192) -> torch.Tensor:
    """words [num_blocks, W] int32 contiguous, block_ids [n] int on the same device -> int64 [n]."""
    if words.dim() != 2 or words.dtype != torch.int32 or not words.is_contiguous():
        raise ValueError(
            f"words: need a contiguous int32 [num_blocks, W] view, got {words.dtype} {tuple(words.shape)}"
        )
    if block_ids.dim() != 1 or block_ids.device != words.device:
        raise ValueError("block_ids: need a 1-D tensor on the words' device")
    n, W = block_ids.numel(), words.shape[1]
    num_tiles = triton.cdiv(W, tile)
    partial = torch.empty((n, num_tiles), dtype=torch.int64, device=words.device)
    if n:  # Triton launches on the current device: make it the words' (a process may see several GPUs)
        with torch.cuda.device(words.device) if words.is_cuda else contextlib.nullcontext():
            _block_checksum_kernel[(n, num_tiles)](words, block_ids, partial, W, num_tiles, TILE=tile)
    return partial.sum(dim=1)
