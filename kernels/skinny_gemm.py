"""Skinny GEMM for decode: out [M, N] = x [M, K] @ w[N, K]^T (+ bias) with M <= 64, at the weight-read rate.
The weight may be FP8 (e4m3) with per-output-channel scales: converted in registers, scaled at the end.

At decode shapes the weight read is the whole cost, and cuBLAS leaves some of them well below copy
bandwidth: too few thread blocks on a narrow N, or too little in flight per block. Here one program owns
BLOCK_N output columns and one of SPLIT_K slices of K, and streams its weight rows with a pipelined loop.
With SPLIT_K > 1 the slices write fp32 partial sums and a second small kernel adds them in a fixed order,
so results do not depend on scheduling (no atomics). The caller chooses the config by measurement
(`candidate_configs`); the engine keeps cuBLAS wherever it is faster.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["SkinnyConfig", "candidate_configs", "skinny_gemm", "MAX_SKINNY_M"]

MAX_SKINNY_M = 64


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        x = tl.load(
            x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    if HAS_SCALE:  # per output channel: the partial sums of split K scale the same way
        acc *= tl.load(scale_ptr + n, mask=n_ok, other=0.0)[None, :]
    out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    N,
    stride_ps,
    stride_pm,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * stride_ps + row * stride_pm + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def split_to_fill(n: int, k: int, block_n: int, block_k: int, num_sms: int) -> int:
    """The power-of-two K split that gives twice as many programs as SMs, each slice >= 4 K blocks."""
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * num_sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def candidate_configs(m: int, n: int, k: int, num_sms: int) -> list[SkinnyConfig]:
    """A few configs worth timing for [m, k] x [n, k]^T: enough programs to fill the SMs twice over."""
    configs = []
    for block_n in (32, 64) if m <= 16 else (64, 128):
        for block_k in (128, 256):
            split = split_to_fill(n, k, block_n, block_k, num_sms)
            for stages in (3, 5):
                configs.append(SkinnyConfig(block_n, block_k, split, 4, stages))
    return configs


def skinny_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    config: SkinnyConfig,
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 64), w [N, K] row-major, bias [N] or None -> [M, N] in x's dtype. With w_scale [N]
    fp32, w is FP8 e4m3 and out = x @ (w * w_scale[:, None])^T."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shapes: x {tuple(x.shape)} and w {tuple(w.shape)} must be [M, K] and [N, K]")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w: the K dimension must be contiguous")
    if w_scale is not None:
        if w.dtype != torch.float8_e4m3fn or w_scale.shape != (w.shape[0],) or w_scale.dtype != torch.float32:
            raise ValueError(
                f"w, w_scale: expected e4m3 [N, K] and fp32 [N], got {w.dtype}, {w_scale.dtype} {tuple(w_scale.shape)}"
            )
    elif x.dtype != w.dtype:
        raise ValueError(f"dtypes: x {x.dtype} and w {w.dtype} must match")
    M, K = x.shape
    N = w.shape[0]
    if M > MAX_SKINNY_M:
        raise ValueError(f"x: {M} rows, at most {MAX_SKINNY_M} for the skinny GEMM")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_m = max(16, triton.next_power_of_2(M))
    k_per_split = triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(K, k_per_split)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(N, config.block_n), split_k)
    if split_k == 1 and bias is None:
        target, stride_os = out, 0
    else:
        target = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
        stride_os = target.stride(0)
    _skinny_gemm_kernel[grid](
        x,
        w,
        w_scale if w_scale is not None else x,
        target,
        M,
        N,
        K,
        k_per_split,
        x.stride(0),
        w.stride(0),
        target.stride(-2),
        stride_os,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        PRECISION=precision,
        HAS_SCALE=w_scale is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if target is not out:
        block = 1024
        _sum_splits_kernel[(M, triton.cdiv(N, block))](
            target,
            bias if bias is not None else target,
            out,
            N,
            target.stride(0),
            target.stride(1),
            out.stride(0),
            SPLIT_K=split_k,
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out
