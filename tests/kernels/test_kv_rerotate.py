"""RoPE re-rotation copy: the Triton kernel (interpreted on the CPU) against the torch reference."""

import pytest
import torch

from kernels.kv_rerotate import rerotate_copy, rerotate_copy_ref


def _case(dtype, heads=3, head_dim=32, layers=2, bs=4, n=9):
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(12, layers, 2, bs, heads, head_dim, generator=g).to(dtype)
    src = torch.randperm(20, generator=g)[:n] + 4
    dst = torch.randperm(16, generator=g)[:n] + 28
    angles = torch.rand(n, head_dim // 2, generator=g) * 40.0
    emb = torch.cat((angles, angles), dim=-1)
    return pool, src, dst, emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_reference(dtype):
    pool, src, dst, cos, sin = _case(dtype)
    want = pool.clone()
    rerotate_copy_ref(want, src, dst, cos, sin)
    rerotate_copy(pool, src, dst, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(pool.float(), want.float(), atol=tol, rtol=tol)
    assert not torch.equal(pool[dst // 4, :, 0, dst % 4], pool[src // 4, :, 0, src % 4])  # keys turned


def test_e4m3_pool_turns_keys_in_their_values():
    """Quarter turns keep values on the e4m3 grid and power-of-two scales divide exactly, so both must store
    the same bytes whatever their rounding (Triton 3.6's CPU interpreter rounds fp32 to e4m3 otherwise than
    the GPU: tests/kernels/test_fp8_kv.py)."""
    pool, src, dst, _, _ = _case(torch.float32)
    quarter = torch.randint(0, 4, (len(src), 16), generator=torch.Generator().manual_seed(2))
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[quarter].repeat(1, 2)
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[quarter].repeat(1, 2)
    scales = 2.0 ** torch.randint(-6, -2, (2, 2, 3)).float()
    e4m3 = (pool * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
    want = e4m3.clone()
    rerotate_copy_ref(want, src, dst, cos, sin, scales)
    rerotate_copy(e4m3, src, dst, cos, sin, scales)
    assert torch.equal(e4m3.view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(e4m3[dst // 4, :, 0, dst % 4].float(), e4m3[src // 4, :, 0, src % 4].float())


def test_bad_arguments_are_clear_errors():
    pool, src, dst, cos, sin = _case(torch.float32)
    with pytest.raises(ValueError, match="cos, sin"):
        rerotate_copy(pool, src, dst[:3], cos, sin)
    with pytest.raises(ValueError, match="kv_scales: only for an e4m3 pool"):
        rerotate_copy(pool, src, dst, cos, sin, torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match="kv_scales: an e4m3 pool needs"):
        rerotate_copy(pool.to(torch.float8_e4m3fn), src, dst, cos, sin)
