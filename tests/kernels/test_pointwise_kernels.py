"""RMSNorm(+residual), SiLU-and-mul and RoPE kernels against their references."""

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref
from kernels.rotary import rotary_ref, rotate_qk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rand(*shape, dtype):
    return torch.randn(shape, device=DEVICE).to(dtype)


def _close(out, want, dtype):
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden", [(1, 64), (7, 100), (33, 256)])
def test_rms_norm_with_and_without_residual(dtype, tokens, hidden):
    x, r, w = (
        _rand(tokens, hidden, dtype=dtype),
        _rand(tokens, hidden, dtype=dtype),
        _rand(hidden, dtype=dtype),
    )
    _close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)
    out, res = rms_norm(x, w, 1e-6, r)
    want, want_res = rms_norm_ref(x, w, 1e-6, r)
    _close(out, want, dtype)
    _close(res, want_res, dtype)


def test_rms_norm_of_per_head_views():
    """q/k norm runs over [T, heads, head_dim] views of the qkv projection."""
    qkv = _rand(5, 3 * 64, dtype=torch.float32)
    q = qkv[:, :128].view(5, 4, 32)  # strided rows
    w = _rand(32, dtype=torch.float32)
    _close(rms_norm(q, w, 1e-6), rms_norm_ref(q, w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, inter", [(1, 16), (9, 100), (4, 1500)])
def test_silu_and_mul(dtype, tokens, inter):
    x = _rand(tokens, 2 * inter, dtype=dtype)
    _close(silu_and_mul(x), silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 16), (8, 2, 64), (6, 1, 48)])
def test_rotary_on_strided_q_and_k(dtype, num_heads, num_kv_heads, head_dim):
    T = 11
    qkv = _rand(T, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(T, num_heads, head_dim), k.view(T, num_kv_heads, head_dim)
    positions = torch.randint(0, 4096, (T,), device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    want_q, want_k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    untouched_v = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    rotate_qk(q, k, cos, sin)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], untouched_v)


def _qkv_and_rope(T, num_heads, num_kv_heads, head_dim, dtype):
    qkv = _rand(T, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (T,), device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    views = (x.view(T, -1, head_dim) for x in (q, k, v))
    return (*views, emb.cos(), emb.sin())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 4, 16), (8, 2, 64), (6, 1, 48)])
def test_fused_rope_and_kv_write_equals_the_two_passes(dtype, num_heads, num_kv_heads, head_dim):
    T, block_size, num_blocks = 9, 4, 6
    q, k, v, cos, sin = _qkv_and_rope(T, num_heads, num_kv_heads, head_dim, dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]
    slots[[2, 5]] = -1  # padding rows: q still rotated, no K/V written
    pool = _rand(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=dtype)
    want_pool = pool.clone()
    want_q = rope_kv_write_ref(q, k, v, cos, sin, want_pool, slots)
    out = rope_kv_write(q, k, v, cos, sin, pool, slots)
    assert out.data_ptr() == q.data_ptr()  # in place
    _close(q, want_q, dtype)
    _close(pool, want_pool, dtype)  # rows at skipped slots untouched on both sides


def test_fused_rope_and_kv_write_rejects_mismatches():
    q, k, v, cos, sin = _qkv_and_rope(3, 4, 2, 16, torch.float32)
    pool = torch.zeros(2, 2, 4, 2, 16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache"):
        rope_kv_write(q, k, v, cos, sin, pool[:, :, :, :1], slots)
    with pytest.raises(ValueError, match="dtypes"):
        rope_kv_write(q, k, v, cos, sin, pool.half(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv_write(q, k, v, cos, sin, pool, slots[:2])
