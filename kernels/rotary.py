"""Rotary embedding (NeoX half rotation) applied to q and k in place, in one launch."""

import torch
import triton
import triton.language as tl

__all__ = ["rotary_ref", "rotate_qk"]


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D] fp32 (two equal halves). HF's arithmetic, in x's dtype."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    QH: tl.constexpr,
    KH: tl.constexpr,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    cos = tl.load(cos_ptr + t * stride_ct + j, mask=j_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + j, mask=j_ok, other=0.0)[None, :]
    h = tl.arange(0, H_PAD)[:, None]
    for which in tl.static_range(2):
        ptr = q_ptr + t * stride_qt if which == 0 else k_ptr + t * stride_kt
        stride_h = stride_qh if which == 0 else stride_kh
        num_heads = QH if which == 0 else KH
        mask = (h < num_heads) & j_ok[None, :]
        x1_ptr = ptr + h * stride_h + j[None, :]
        x1 = tl.load(x1_ptr, mask=mask, other=0.0)
        x2 = tl.load(x1_ptr + HALF, mask=mask, other=0.0)
        c, s = cos.to(x1.dtype), sin.to(x1.dtype)
        tl.store(x1_ptr, x1 * c - x2 * s, mask=mask)
        tl.store(x1_ptr + HALF, x2 * c + x1 * s, mask=mask)


def check_cos_sin(cos: torch.Tensor, sin: torch.Tensor, T: int, D: int) -> None:
    if (
        cos.shape != (T, D)
        or sin.shape != (T, D)
        or cos.dtype != torch.float32
        or cos.stride() != sin.stride()
    ):
        raise ValueError(f"cos/sin: expected [{T}, {D}] fp32 with equal strides")


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, Hq, D], k [T, Hkv, D] (strided views are fine), cos/sin [T, D] fp32 -> rotated in place."""
    T, QH, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or D % 2:
        raise ValueError(f"k: shape {tuple(k.shape)} must be [{T}, kv_heads, {D}] with even head_dim")
    check_cos_sin(cos, sin, T, D)
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1:
        raise ValueError("q, k, cos, sin: head_dim must be contiguous")
    if T:
        _rotary_kernel[(T,)](
            q,
            k,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            QH=QH,
            KH=k.shape[1],
            HALF=D // 2,
            H_PAD=triton.next_power_of_2(max(QH, k.shape[1])),
            HALF_PAD=triton.next_power_of_2(D // 2),
        )
    return q, k
