"""Paged prefill/decode attention and KV write against the torch reference (interpreter on CPU)."""

import pytest
import torch
from paged_inputs import make_problem, poisoned_like

from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.kv_write import kv_write, kv_write_ref
from kernels.prefill_attention import paged_attention_ref, prefill_attention

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 tl.dot is wrong in Triton 3.9's CPU interpreter, so CPU checks fp32 and fp16; the GPU adds bf16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # fp32 dots run exact (ieee)


def _check(out, want, dtype):
    assert not out.isnan().any(), "some output was never written"
    err = (out.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def _reference(p, scale, window=None):
    return paged_attention_ref(
        p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens_list, p.query_start_list, scale, window
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
@pytest.mark.parametrize("k_rows", [False, True])  # K loaded [D, N], or [N, D] and transposed
def test_prefill_attention_with_cached_prefixes(dtype, num_heads, num_kv_heads, k_rows):
    # (context after the step, new queries): a fresh prompt, a chunk on a cached prefix, a one-token decode,
    # a context that is not a multiple of the block size
    seq_lens, query_lens = [37, 50, 9, 1, 23], [37, 13, 1, 1, 5]
    p = make_problem(seq_lens, query_lens, num_heads, num_kv_heads, 32, 8, dtype, DEVICE)
    scale = 32**-0.5
    out = prefill_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        p.query_start_loc,
        max(query_lens),
        scale,
        out=poisoned_like(p.q),
        block_m=16,  # several query tiles a sequence, heaviest first
        block_n=16,
        k_rows=k_rows,
    )
    _check(out, _reference(p, scale), dtype)


@pytest.mark.parametrize("head_dim", [48, 64])  # 48 pads to 64 inside the kernel
@pytest.mark.parametrize("k_rows", [False, True])
def test_prefill_attention_sliding_window_and_odd_head_dim(head_dim, k_rows):
    seq_lens, query_lens = [45, 30], [45, 7]
    p = make_problem(seq_lens, query_lens, 4, 2, head_dim, 16, torch.float32, DEVICE)
    scale = head_dim**-0.5
    out = prefill_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        p.query_start_loc,
        45,
        scale,
        sliding_window=10,
        out=poisoned_like(p.q),
        k_rows=k_rows,
    )
    _check(out, _reference(p, scale, 10), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 12])
def test_prefill_attention_at_given_query_positions(dtype, window):
    """Queries at scattered positions of their sequences (a document's recomputed tokens): each attends to
    every key up to its own position, against the reference and against a full causal pass's rows."""
    seq_lens = [70, 41]
    positions = [[0, 3, 4, 5, 17, 40, 41, 42, 63, 69], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 30, 40]]
    p = make_problem(seq_lens, [len(x) for x in positions], 8, 2, 32, 8, dtype, DEVICE)
    pos = torch.tensor([x for row in positions for x in row], dtype=torch.int32, device=DEVICE)
    scale = 32**-0.5
    out = prefill_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        p.query_start_loc,
        12,
        scale,
        window,
        out=poisoned_like(p.q),
        block_m=16,
        block_n=16,
        query_positions=pos,
    )
    want = paged_attention_ref(
        p.q.float(),
        p.kv_cache.float(),
        p.block_tables,
        p.seq_lens_list,
        p.query_start_list,
        scale,
        window,
        query_positions=pos,
    )
    _check(out, want, dtype)
    # the reference at positions equals a causal pass over the whole sequence, read at those rows
    i, row = 1, positions[1]
    q_full = torch.zeros(seq_lens[i], 8, 32, dtype=dtype, device=DEVICE)
    q_full[row] = p.q[p.query_start_list[i] : p.query_start_list[i + 1]]
    full = paged_attention_ref(
        q_full.float(),
        p.kv_cache.float(),
        p.block_tables[i : i + 1],
        [seq_lens[i]],
        [0, seq_lens[i]],
        scale,
        window,
    )
    torch.testing.assert_close(want[p.query_start_list[i] :], full[row], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="query_positions"):
        prefill_attention(
            p.q,
            p.kv_cache,
            p.block_tables,
            p.seq_lens,
            p.query_start_loc,
            12,
            scale,
            query_positions=pos.long(),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention(dtype, num_heads, num_kv_heads, num_splits):
    seq_lens = [1, 17, 64, 100]
    p = make_problem(seq_lens, [1] * 4, num_heads, num_kv_heads, 32, 16, dtype, DEVICE)
    scale = 32**-0.5
    out = decode_attention(
        p.q, p.kv_cache, p.block_tables, p.seq_lens, scale, num_splits, out=poisoned_like(p.q), block_n=16
    )
    _check(out, _reference(p, scale), dtype)


def test_decode_attention_sliding_window_with_more_splits_than_keys():
    p = make_problem([5, 70], [1, 1], 4, 2, 32, 16, torch.float32, DEVICE)
    out = decode_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        0.2,
        8,
        sliding_window=20,
        out=poisoned_like(p.q),
        block_n=16,
    )
    _check(out, _reference(p, 0.2, 20), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_len, num_splits, window", [(2, 1, None), (9, 4, None), (5, 3, 12)])
def test_decode_attention_verifies_several_tokens_per_sequence(dtype, query_len, num_splits, window):
    """1 + k tokens a sequence (speculative verification), causal among themselves; with more splits than
    a row has keys in the last one (rows that see nothing in a split), and a sliding window."""
    seq_lens = [query_len, 17, 64, 100]
    p = make_problem(seq_lens, [query_len] * 4, 8, 2, 32, 16, dtype, DEVICE)
    scale = 32**-0.5
    out = decode_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        scale,
        num_splits,
        sliding_window=window,
        out=poisoned_like(p.q),
        block_n=16,
        query_len=query_len,
    )
    _check(out, _reference(p, scale, window), dtype)


def test_num_kv_splits_fills_the_chip_but_keeps_splits_long():
    assert num_kv_splits(1, 8, 32768, num_sms=132, waves=2) == 33  # 8 programs -> ~264 wanted
    assert num_kv_splits(1, 8, 256, num_sms=132) == 1  # too short to split
    assert num_kv_splits(1, 8, 2048, num_sms=132) == 8  # capped: no split shorter than 4 x 64 keys
    assert num_kv_splits(128, 8, 8192, num_sms=132) == 1  # 1024 programs already fill it


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_puts_rows_at_their_slots(dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    pool = torch.randn((6, 2, 2, 4, 3, 16), generator=gen).to(DEVICE, dtype)  # [blocks, layers, 2, bs, H, D]
    cache, want = pool[:, 1], pool[:, 1].clone()
    qkv = torch.randn((5, 10, 16), generator=gen).to(DEVICE, dtype)  # strided k and v, as split from qkv
    k, v = qkv[:, 4:7], qkv[:, 7:10]
    slots = torch.tensor([0, 7, 13, -1, 22], device=DEVICE)  # -1: a padding row, skipped
    kv_write(k, v, cache, slots)
    kv_write_ref(k, v, want, slots)
    assert torch.equal(cache, want)
    untouched = pool.clone()
    kv_write(k, v, pool[:, 1], slots)
    assert torch.equal(pool[:, 0], untouched[:, 0])  # the other layer of the same blocks is left alone


def test_wrappers_reject_bad_shapes():
    p = make_problem([8], [8], 4, 2, 16, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="heads"):
        prefill_attention(p.q[:, :3], p.kv_cache, p.block_tables, p.seq_lens, p.query_start_loc, 8, 1.0)
    with pytest.raises(ValueError, match="block_tables: expected int32"):
        decode_attention(p.q[:1], p.kv_cache, p.block_tables.long(), p.seq_lens, 1.0, 1)
    with pytest.raises(ValueError, match="kv_cache"):
        kv_write(
            p.q[:, :2], p.q[:, :2], p.kv_cache[..., :8], torch.zeros(8, dtype=torch.int64, device=DEVICE)
        )
