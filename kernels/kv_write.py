"""KV write: new K/V rows [T, kv_heads, head_dim] into the paged pool at their slots, one launch per layer.
An FP8 pool stores them divided by their KV head's scale (kernels/attention_ref.py)."""

import torch
import triton
import triton.language as tl

from kernels.attention_ref import kv_write_ref

__all__ = ["kv_write", "kv_write_ref"]


@triton.jit
def quantize_fp8(x, scale):
    """x / scale, saturated to e4m3's range (448), in fp32: the caller casts to the cache's dtype."""
    return tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0)


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    scales_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    SCALED: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding rows (CUDA graphs) write nothing
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    dst = cache_ptr + block * stride_cb + offset * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if SCALED:
        k = quantize_fp8(k, tl.load(scales_ptr + h, mask=h < NUM_HEADS, other=1.0))
        v = quantize_fp8(v, tl.load(scales_ptr + NUM_HEADS + h, mask=h < NUM_HEADS, other=1.0))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def check_kv_scales(kv_cache: torch.Tensor, dtype: torch.dtype, kv_scales: torch.Tensor | None) -> None:
    """A cache in the activations' dtype takes no scales; an e4m3 cache needs [2, kv_heads] fp32 ones."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        heads = kv_cache.shape[3]
        if kv_scales is None or kv_scales.shape != (2, heads) or kv_scales.dtype != torch.float32:
            raise ValueError(f"kv_scales: an FP8 cache needs [2, {heads}] fp32 scales, got {kv_scales!r:.60}")
        if not kv_scales.is_contiguous():
            raise ValueError("kv_scales: must be contiguous")
    elif kv_cache.dtype != dtype:
        raise ValueError(
            f"dtypes: activations {dtype} and kv_cache {kv_cache.dtype} must match (or an FP8 cache)"
        )
    elif kv_scales is not None:
        raise ValueError(f"kv_scales: only for an FP8 cache, this one is {kv_cache.dtype}")


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """k, v [T, kv_heads, head_dim]; kv_cache [num_blocks, 2, block_size, kv_heads, head_dim] (a strided
    layer view is fine); slot_mapping [T] int32/int64, negative = skip. kv_scales [2, kv_heads] fp32 for an
    FP8 cache."""
    T, H, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k {tuple(k.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or tuple(kv_cache.shape[3:]) != (H, D):
        raise ValueError(
            f"kv_cache: shape {tuple(kv_cache.shape)}, expected [blocks, 2, block_size, {H}, {D}]"
        )
    if v.dtype != k.dtype:
        raise ValueError(f"dtypes: k {k.dtype}, v {v.dtype} must match")
    check_kv_scales(kv_cache, k.dtype, kv_scales)
    if k.stride(2) != 1 or v.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("k, v, kv_cache: head_dim must be contiguous")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping: expected [{T}] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if T == 0:
        return
    _kv_write_kernel[(T,)](
        k,
        v,
        kv_cache,
        slot_mapping,
        kv_scales if kv_scales is not None else k,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        BLOCK_SIZE=kv_cache.shape[2],
        NUM_HEADS=H,
        HEAD_DIM=D,
        H_PAD=triton.next_power_of_2(H),
        D_PAD=triton.next_power_of_2(D),
        SCALED=kv_scales is not None,
    )
