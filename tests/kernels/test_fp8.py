"""FP8 (e4m3) weight quantization and the paths that read it: the dequantizing reference (the oracle), the
skinny GEMM with per-channel scales (interpreted on the CPU), W8A8 on the GPU's FP8 tensor cores."""

import pytest
import torch
import torch.nn.functional as F

from kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_linear_ref,
    fp8_linear_w8a8,
    quantize_per_channel,
    quantize_per_token,
    supports_fp8,
)
from kernels.skinny_gemm import SkinnyConfig, skinny_gemm

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _weights(n=96, k=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 0, n)[:, None]  # rows of very different size
    w[5] = 0.0  # an all-zero channel keeps a finite scale
    return w.to(DEVICE)


def test_per_channel_quantization_uses_each_rows_range():
    w = _weights()
    w_q, scale = quantize_per_channel(w)
    assert w_q.dtype == FP8_DTYPE and scale.shape == (w.shape[0],) and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (w_q[5].float() == 0).all()
    # every non-zero row reaches the top of the format's range
    top = w_q.float().abs().amax(dim=1)
    assert torch.allclose(top[torch.arange(len(top)) != 5], torch.tensor(FP8_MAX, device=DEVICE))
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of itself, relative to its row's scale
    err = (w_q.float() * scale[:, None] - w).abs()
    assert (err <= w.abs() / 16 + scale[:, None] * 2**-9 + 1e-12).all()


def test_per_token_quantization():
    x = torch.randn(7, 64, device=DEVICE) * 10
    x_q, scale = quantize_per_token(x)
    assert scale.shape == (7, 1)
    rel = (x_q.float() * scale - x).norm() / x.norm()
    assert rel < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("m, split_k", [(1, 1), (5, 3), (40, 2)])
def test_skinny_gemm_reads_fp8_weights_like_the_reference(dtype, m, split_k):
    w_q, scale = quantize_per_channel(_weights())
    x = torch.randn(m, w_q.shape[1], device=DEVICE).to(dtype)
    bias = torch.randn(w_q.shape[0], device=DEVICE).to(dtype)
    cfg = SkinnyConfig(block_n=32, block_k=32, split_k=split_k, num_stages=2)
    out = skinny_gemm(x, w_q, bias, cfg, w_scale=scale)
    want = fp8_linear_ref(x, w_q, scale, bias)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert (out.float() - want.float()).norm() / want.float().norm() < tol


def test_reference_is_close_to_the_16_bit_matmul():
    w = _weights()
    w_q, scale = quantize_per_channel(w)
    x = torch.randn(9, w.shape[1], device=DEVICE)
    want = F.linear(x, w)
    assert (fp8_linear_ref(x, w_q, scale) - want).norm() / want.norm() < 0.05


def test_fp8_scale_checks():
    w_q, scale = quantize_per_channel(_weights())
    x = torch.randn(2, w_q.shape[1], device=DEVICE)
    cfg = SkinnyConfig(block_n=32, block_k=32, split_k=1)
    with pytest.raises(ValueError, match="w_scale"):
        skinny_gemm(x, w_q, None, cfg, w_scale=scale.half())
    with pytest.raises(ValueError, match="w_scale"):
        skinny_gemm(x, w_q.float(), None, cfg, w_scale=scale)
    with pytest.raises(ValueError, match="expected \\[out, in\\]"):
        quantize_per_channel(torch.zeros(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and supports_fp8(torch.device("cuda"))), reason="needs FP8 tensor cores")
def test_w8a8_on_the_tensor_cores_matches_the_reference():
    w_q, scale = quantize_per_channel(_weights(n=256, k=512))
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    out = fp8_linear_w8a8(x, w_q, scale)
    want = fp8_linear_ref(x, w_q, scale)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).norm() / want.float().norm() < 0.06  # activations quantized too
