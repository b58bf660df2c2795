"""The skinny decode GEMM against torch's linear (interpreter on CPU; bf16 on the GPU)."""

import pytest
import torch
import torch.nn.functional as F

from kernels.skinny_gemm import MAX_SKINNY_M, SkinnyConfig, candidate_configs, skinny_gemm

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("split_k", [1, 3])  # 3 slices of a K that does not divide evenly
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_gemm_matches_linear(dtype, m, split_k, with_bias):
    torch.manual_seed(0)
    n, k = 100, 200  # neither a multiple of the blocks: masked edges on both
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = torch.randn(n, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = skinny_gemm(x, w, bias, SkinnyConfig(block_n=32, block_k=32, split_k=split_k, num_stages=2))
    want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert out.dtype == dtype and out.shape == (m, n)
    err = (out.float() - want).norm() / want.norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def test_split_sums_are_deterministic():
    torch.manual_seed(1)
    x, w = torch.randn(4, 256, device=DEVICE), torch.randn(64, 256, device=DEVICE)
    cfg = SkinnyConfig(block_n=32, block_k=32, split_k=4, num_stages=2)
    assert torch.equal(skinny_gemm(x, w, None, cfg), skinny_gemm(x, w, None, cfg))


def test_skinny_gemm_rejects_bad_inputs():
    cfg = SkinnyConfig(block_n=32, block_k=32, split_k=1)
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="at most 64"):
        skinny_gemm(torch.zeros(MAX_SKINNY_M + 1, 16), w, None, cfg)
    with pytest.raises(ValueError, match="shapes"):
        skinny_gemm(torch.zeros(2, 15), w, None, cfg)
    with pytest.raises(ValueError, match="dtypes"):
        skinny_gemm(torch.zeros(2, 16, dtype=torch.float16), w, None, cfg)
    with pytest.raises(ValueError, match="contiguous"):
        skinny_gemm(torch.zeros(16, 2).t(), w, None, cfg)


def test_candidate_configs_fill_the_chip_without_slicing_k_too_thin():
    # Llama-3-8B's o_proj at decode: 4096 columns, 4096 deep, on a 132-SM chip
    for cfg in candidate_configs(1, 4096, 4096, 132):
        tiles = -(-4096 // cfg.block_n)
        assert tiles * cfg.split_k >= 2 * 132 or 4096 // (cfg.split_k * 2) < 4 * cfg.block_k
        assert 4096 // cfg.split_k >= 2 * cfg.block_k
    # a wide gate_up needs no split
    assert all(c.split_k == 1 for c in candidate_configs(8, 28672, 4096, 132) if c.block_n <= 64)
