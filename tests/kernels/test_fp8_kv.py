"""An FP8 (e4m3) KV cache with one scale per (K/V, KV head): written by kv_write and the fused rotary write,
read as it is by the decode and prefill kernels, against the dequantizing reference (interpreter on CPU)."""

import pytest
import torch
from paged_inputs import make_problem, poisoned_like

from kernels.attention_ref import dequantize_kv, kv_write_ref, paged_attention_ref, quantize_kv
from kernels.decode_attention import decode_attention
from kernels.kv_write import kv_write
from kernels.prefill_attention import prefill_attention
from kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FP8 = torch.float8_e4m3fn


def _fp8_problem(seq_lens, query_lens, heads, kv_heads, dtype, head_dim=32, block_size=8):
    p = make_problem(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, DEVICE, seed=3)
    cache = p.kv_cache.float() * torch.tensor([1.0, 3.0], device=DEVICE)[None, :, None, None, None]
    scales = cache.abs().amax(dim=(0, 2, 4)) / 448  # [2, kv_heads]: K's and V's range per head
    fp8 = torch.stack([quantize_kv(cache[:, i], scales[i], FP8) for i in (0, 1)], dim=1)
    return p, fp8, scales.contiguous()


def _close(out, want, dtype):
    assert not out.isnan().any()
    err = (out.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_len, num_splits", [(1, 1), (1, 3), (3, 2)])
def test_decode_reads_fp8_pages_as_they_are(dtype, query_len, num_splits):
    seq_lens = [37, 9, 64]
    p, fp8, scales = _fp8_problem(seq_lens, [query_len] * 3, 8, 2, dtype)
    out = decode_attention(
        p.q,
        fp8,
        p.block_tables,
        p.seq_lens,
        0.2,
        num_splits,
        out=poisoned_like(p.q),
        query_len=query_len,
        kv_scales=scales,
    )
    want = paged_attention_ref(
        p.q, fp8, p.block_tables, p.seq_lens_list, p.query_start_list, 0.2, None, scales
    )
    _close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_reads_fp8_pages_as_they_are(dtype):
    seq_lens, query_lens = [37, 50, 9], [37, 13, 1]
    p, fp8, scales = _fp8_problem(seq_lens, query_lens, 8, 2, dtype)
    out = prefill_attention(
        p.q,
        fp8,
        p.block_tables,
        p.seq_lens,
        p.query_start_loc,
        37,
        0.2,
        out=poisoned_like(p.q),
        block_m=16,
        block_n=16,
        kv_scales=scales,
    )
    want = paged_attention_ref(
        p.q, fp8, p.block_tables, p.seq_lens_list, p.query_start_list, 0.2, None, scales
    )
    _close(out, want, dtype)
    # the scales matter: K's and V's ranges differ by 3x here
    plain = paged_attention_ref(p.q, fp8.to(dtype), p.block_tables, p.seq_lens_list, p.query_start_list, 0.2)
    assert (plain.float() - want.float()).norm() / want.float().norm() > 0.1


@pytest.mark.parametrize("fused", [False, True])
def test_writes_store_values_over_their_heads_scale(fused):
    """Values on the e4m3 grid times power-of-two scales divide exactly, so torch and the kernel must store
    the same bytes whatever their rounding (Triton 3.6's CPU interpreter converts fp32 to e4m3 with ties
    away from zero and loses the carry when rounding up to a power of two; the GPU rounds to nearest even)."""
    T, heads, kv_heads, D, bs = 6, 4, 2, 16, 4
    scales = torch.tensor([[0.25, 8.0], [0.5, 0.125]], device=DEVICE)  # [K, V] x heads; head 1's K is wide
    k, v = (
        torch.randn(T, kv_heads, D, device=DEVICE).mul(40).clamp(-448, 448).to(FP8).float()
        * scales[i][None, :, None]
        for i in (0, 1)
    )
    q = torch.randn(T, heads, D, device=DEVICE)
    slots = torch.tensor([0, 5, -1, 7, 2, 9], device=DEVICE)
    cache, want_cache = (torch.zeros(3, 2, bs, kv_heads, D, device=DEVICE, dtype=FP8) for _ in range(2))
    if fused:  # rotation would move values off the grid: a zero angle (cos 1, sin 0) keeps them on it
        cos, sin = torch.ones(T, D, device=DEVICE), torch.zeros(T, D, device=DEVICE)
        want_q = rope_kv_write_ref(q, k, v, cos, sin, want_cache, slots, scales)
        _close(rope_kv_write(q, k, v, cos, sin, cache, slots, scales), want_q, torch.float32)
    else:
        kv_write_ref(k, v, want_cache, slots, scales)
        kv_write(k, v, cache, slots, scales)
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))
    stored = dequantize_kv(cache, scales, torch.float32)
    written = stored[torch.tensor([0, 1, 1, 0, 2]), 1, torch.tensor([0, 1, 3, 2, 1])]  # V at slots 0,5,7,2,9
    assert torch.equal(written, v[[0, 1, 3, 4, 5]])


def test_fp8_caches_need_their_scales():
    p, fp8, scales = _fp8_problem([9], [9], 4, 2, torch.float32)
    args = (p.q, fp8, p.block_tables, p.seq_lens, p.query_start_loc, 9, 1.0)
    with pytest.raises(ValueError, match="an FP8 cache needs \\[2, 2\\] fp32 scales"):
        prefill_attention(*args)
    with pytest.raises(ValueError, match="an FP8 cache needs"):
        decode_attention(p.q, fp8, p.block_tables, p.seq_lens, 1.0, 1, query_len=9, kv_scales=scales[:1])
    with pytest.raises(ValueError, match="only for an FP8 cache"):
        prefill_attention(p.q, p.kv_cache, *args[2:], kv_scales=scales)
