"""KV blocks converted between formats as they land: a pulled block in the sender's format (16-bit, or e4m3
with the sender's scales) -> a block of the local pool in its format, in one launch.

Blocks are [num_layers, 2, block_size, kv_heads, head_dim]; scales [num_layers, 2, kv_heads] fp32 (K / V per
layer and head; an e4m3 value times its scale is the value). A value is read back in fp32 (times the
source's scale), then divided by the destination's scale and saturated to e4m3, or cast to the destination's
dtype: the same arithmetic as kernels/kv_write.py, so a 16-bit block converted to e4m3 is bit for bit what
the destination's own KV write would have stored.
"""

import torch
import triton
import triton.language as tl

from kernels.kv_write import quantize_fp8

FP8 = torch.float8_e4m3fn


def check_scales(blocks: torch.Tensor, scales: torch.Tensor | None, name: str) -> None:
    num_layers, _, _, heads, _ = blocks.shape[1:]
    if (blocks.dtype == FP8) != (scales is not None):
        raise ValueError(f"{name}: an e4m3 block needs scales, a 16-bit one takes none")
    if scales is not None and (
        scales.shape != (num_layers, 2, heads) or scales.dtype != torch.float32 or not scales.is_contiguous()
    ):
        raise ValueError(f"{name}: need contiguous fp32 [{num_layers}, 2, {heads}], got {scales.shape}")


def convert_kv_blocks_ref(
    src: torch.Tensor,
    src_scales: torch.Tensor | None,
    pool: torch.Tensor,
    block_ids: torch.Tensor,
    pool_scales: torch.Tensor | None,
) -> None:
    """src [n, L, 2, bs, H, D] -> pool[block_ids] (the reference, and the CPU path)."""
    x = src.float()
    if src_scales is not None:
        x = x * src_scales.to(x.device)[:, :, None, :, None]
    if pool_scales is not None:
        x = (x / pool_scales.to(x.device)[:, :, None, :, None]).clamp(-448.0, 448.0)
    pool[block_ids.to(pool.device).long()] = x.to(pool.dtype).to(pool.device)


@triton.jit
def _convert_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,
    src_scales_ptr,
    dst_scales_ptr,
    SLAB: tl.constexpr,  # block_size * heads * head_dim: one (layer, K/V) of a block, contiguous
    ROWS: tl.constexpr,  # layers * 2
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SRC_SCALED: tl.constexpr,
    DST_SCALED: tl.constexpr,
):
    i, row = tl.program_id(0), tl.program_id(1)  # source block, (layer, K/V)
    dst_block = tl.load(ids_ptr + i).to(tl.int64)
    src = src_ptr + (i.to(tl.int64) * ROWS + row) * SLAB
    dst = dst_ptr + (dst_block * ROWS + row) * SLAB
    for start in range(0, SLAB, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < SLAB
        head = (offs // HEAD_DIM) % HEADS
        x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        if SRC_SCALED:
            x = x * tl.load(src_scales_ptr + row * HEADS + head, mask=mask, other=1.0)
        if DST_SCALED:
            x = quantize_fp8(x, tl.load(dst_scales_ptr + row * HEADS + head, mask=mask, other=1.0))
        tl.store(dst + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def convert_kv_blocks(
    src: torch.Tensor,
    src_scales: torch.Tensor | None,
    pool: torch.Tensor,
    block_ids: torch.Tensor,
    pool_scales: torch.Tensor | None,
) -> None:
    """src [n, L, 2, bs, H, D] (contiguous, on the pool's device) -> pool blocks block_ids [n]; scales for
    e4m3 sides ([L, 2, H] fp32, on the pool's device), None for 16-bit ones."""
    check_scales(src, src_scales, "src_scales")
    check_scales(pool, pool_scales, "pool_scales")
    if src.shape[1:] != pool.shape[1:] or len(block_ids) != src.shape[0]:
        raise ValueError(
            f"blocks: {tuple(src.shape)} into a pool of {tuple(pool.shape)} at {len(block_ids)} block ids"
        )
    if not (src.is_contiguous() and pool.is_contiguous()):
        raise ValueError("src, pool: must be contiguous (block-major)")
    num_layers, _, block_size, heads, head_dim = pool.shape[1:]
    slab = block_size * heads * head_dim
    _convert_kernel[(src.shape[0], num_layers * 2)](
        src,
        pool,
        block_ids.to(device=pool.device, dtype=torch.int64),
        src_scales if src_scales is not None else pool,
        pool_scales if pool_scales is not None else pool,
        SLAB=slab,
        ROWS=num_layers * 2,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK=min(triton.next_power_of_2(slab), 4096),
        SRC_SCALED=src_scales is not None,
        DST_SCALED=pool_scales is not None,
    )
