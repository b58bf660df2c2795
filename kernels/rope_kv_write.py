"""Rotary embedding and KV write in one launch: q rotated in place, rotated k and v stored at their slots.

The decode step's small kernels cost about as much as their launches; fusing the two per-token passes after
the QKV projection removes one launch a layer. k is not written back: attention reads it from the pool.
The arithmetic is kernels/rotary.py's (NeoX half rotation in the activations' dtype).
"""

import torch
import triton
import triton.language as tl

from kernels.attention_ref import kv_write_ref
from kernels.kv_write import check_kv_scales, quantize_fp8
from kernels.rotary import check_cos_sin, rotary_ref

__all__ = ["rope_kv_write", "rope_kv_write_ref"]


def rope_kv_write_ref(q, k, v, cos, sin, kv_cache, slot_mapping, kv_scales=None) -> torch.Tensor:
    """-> rotated q (a new tensor); rotated k and v written to kv_cache at slot_mapping (negative: skip)."""
    q, k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    kv_write_ref(k, v, kv_cache, slot_mapping, kv_scales)
    return q


@triton.jit
def _rotate(x1, x2, cos, sin):
    c, s = cos.to(x1.dtype), sin.to(x1.dtype)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rope_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    cache_ptr,
    slot_ptr,
    scales_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ct,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    QH: tl.constexpr,
    KH: tl.constexpr,
    HALF: tl.constexpr,
    QH_PAD: tl.constexpr,
    KH_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    SCALED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    j_ok = j < HALF
    cos = tl.load(cos_ptr + t * stride_ct + j, mask=j_ok, other=0.0)
    sin = tl.load(sin_ptr + t * stride_ct + j, mask=j_ok, other=0.0)

    hq = tl.arange(0, QH_PAD)[:, None]
    q_mask = (hq < QH) & j_ok
    q1_ptr = q_ptr + t * stride_qt + hq * stride_qh + j
    q1, q2 = _rotate(tl.load(q1_ptr, mask=q_mask), tl.load(q1_ptr + HALF, mask=q_mask), cos, sin)
    tl.store(q1_ptr, q1, mask=q_mask)
    tl.store(q1_ptr + HALF, q2, mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # padding rows (CUDA graphs, verify padding) write no K/V
        hk = tl.arange(0, KH_PAD)[:, None]
        k_mask = (hk < KH) & j_ok
        k1_ptr = k_ptr + t * stride_kt + hk * stride_kh + j
        k1, k2 = _rotate(tl.load(k1_ptr, mask=k_mask), tl.load(k1_ptr + HALF, mask=k_mask), cos, sin)
        dst = (
            cache_ptr
            + (slot // BLOCK_SIZE) * stride_cb
            + (slot % BLOCK_SIZE) * stride_cs
            + hk * stride_ch
            + j
        )
        v1_ptr = v_ptr + t * stride_vt + hk * stride_vh + j
        v1, v2 = tl.load(v1_ptr, mask=k_mask), tl.load(v1_ptr + HALF, mask=k_mask)
        if SCALED:  # an FP8 cache: each KV head's values over its scale
            k_scale = tl.load(scales_ptr + hk, mask=hk < KH, other=1.0)
            v_scale = tl.load(scales_ptr + KH + hk, mask=hk < KH, other=1.0)
            k1, k2 = quantize_fp8(k1, k_scale), quantize_fp8(k2, k_scale)
            v1, v2 = quantize_fp8(v1, v_scale), quantize_fp8(v2, v_scale)
        tl.store(dst, k1.to(cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dst + HALF, k2.to(cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dst + stride_ckv, v1.to(cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(dst + stride_ckv + HALF, v2.to(cache_ptr.dtype.element_ty), mask=k_mask)


def rope_kv_write(q, k, v, cos, sin, kv_cache, slot_mapping, kv_scales=None) -> torch.Tensor:
    """q [T, Hq, D], k, v [T, Hkv, D] (strided views of the QKV output are fine), cos/sin [T, D] fp32,
    kv_cache [blocks, 2, block_size, Hkv, D] (a layer's view), slot_mapping [T] -> q, rotated in place.
    kv_scales [2, Hkv] fp32 for an FP8 cache."""
    T, QH, D = q.shape
    KH = k.shape[1]
    if k.shape != (T, KH, D) or v.shape != k.shape or D % 2:
        raise ValueError(
            f"k, v: shapes {tuple(k.shape)}, {tuple(v.shape)}; expected [{T}, kv_heads, {D}], D even"
        )
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or tuple(kv_cache.shape[3:]) != (KH, D):
        raise ValueError(
            f"kv_cache: shape {tuple(kv_cache.shape)}, expected [blocks, 2, block_size, {KH}, {D}]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes: q {q.dtype}, k {k.dtype}, v {v.dtype} must match")
    check_kv_scales(kv_cache, q.dtype, kv_scales)
    check_cos_sin(cos, sin, T, D)
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, kv_cache)):
        raise ValueError("q, k, v, cos, sin, kv_cache: head_dim must be contiguous")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping: expected [{T}] int32/int64, got {tuple(slot_mapping.shape)}")
    if T:
        _rope_kv_write_kernel[(T,)](
            q,
            k,
            v,
            cos,
            sin,
            kv_cache,
            slot_mapping,
            kv_scales if kv_scales is not None else cos,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos.stride(0),
            kv_cache.stride(0),
            kv_cache.stride(1),
            kv_cache.stride(2),
            kv_cache.stride(3),
            BLOCK_SIZE=kv_cache.shape[2],
            QH=QH,
            KH=KH,
            HALF=D // 2,
            QH_PAD=triton.next_power_of_2(QH),
            KH_PAD=triton.next_power_of_2(KH),
            HALF_PAD=triton.next_power_of_2(D // 2),
            SCALED=kv_scales is not None,
        )
    return q
