"""RMSNorm with the residual add fused: one read of x (and residual), one write of each output."""

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "rms_norm_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """HF's arithmetic: normalise in fp32, cast back, then scale. With residual: (norm(x + r), x + r)."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    y = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w * (x32 * inv).to(x.dtype)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [..., N] (last dim contiguous), weight [N]; returns norm(x), or (norm(x + r), x + r)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected ({N},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual: {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        raise ValueError("x: the normalised dimension must be contiguous")
    r2 = residual.reshape(-1, N) if residual is not None else x2
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            res_out,
            eps,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            N=N,
            BLOCK=triton.next_power_of_2(N),
            HAS_RESIDUAL=residual is not None,
            num_warps=4 if N <= 2048 else 8,
        )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))
