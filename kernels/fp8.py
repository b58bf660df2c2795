"""FP8 (e4m3) quantization for linear layers: per-output-channel weight scales, per-token activation scales.

A quantized weight is w_q [N, K] float8_e4m3fn with scale [N] fp32, w ~= w_q * scale[:, None]. The torch
reference (dequantize, then matmul in fp32) is the oracle of the GPU paths: W8A8 on the FP8 tensor cores
(`torch._scaled_mm`, row-wise scales) for prefill, and the skinny GEMM reading FP8 weights for decode.
"""

import torch

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "fp8_linear_ref",
    "fp8_linear_w8a8",
    "quantize_per_channel",
    "quantize_per_token",
    "supports_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w_q [N, K] e4m3, scale [N] fp32): each output channel scaled to the format's range."""
    if w.dim() != 2:
        raise ValueError(f"w: expected [out, in], got {tuple(w.shape)}")
    q, scale = _rowwise(w)
    return q, scale.squeeze(1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scale [M, 1] fp32): dynamic, one scale a token."""
    return _rowwise(x)


def fp8_linear_ref(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ dequantized w [N, K]^T (+ bias) in fp32 -> x's dtype. Activations stay unquantized
    (weight-only), as the decode kernel computes."""
    w = w_q.float() * w_scale.float()[:, None]
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_linear_w8a8(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 on the FP8 tensor cores: x quantized per token, one scaled matmul -> x's dtype (bf16/fp16)."""
    x_q, x_scale = quantize_per_token(x)
    return torch._scaled_mm(
        x_q,
        w_q.t(),
        scale_a=x_scale,
        scale_b=w_scale.float()[None, :],
        bias=bias,
        out_dtype=x.dtype,
    )


def supports_fp8(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and 9.0 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
