"""Paged decode attention: QLEN query tokens per sequence (1 for decode, 1 + k to verify k drafts),
split-KV (flash-decoding) for long contexts.

Program (sequence, KV head, split) packs the QLEN x GROUP queries of that KV head (its query heads at
each of the sequence's new tokens) as the rows of one matrix, so each K/V byte is read once per
sequence and group; splits divide the context so that short batches still fill the chip. A second kernel
merges the splits by their log-sum-exp. Rows i * QLEN .. i * QLEN + QLEN - 1 of q belong to sequence i,
its last QLEN positions, each attending causally up to its own. An FP8 cache is read as it is (see
kernels/prefill_attention.py).
"""

import torch
import triton
import triton.language as tl

from kernels.attention_ref import paged_attention_ref
from kernels.prefill_attention import LOG2E, check_paged_inputs, dot_precision

__all__ = ["decode_attention", "num_kv_splits", "paged_attention_ref"]


@triton.jit
def _tile(ptrs, mask, dtype, SCALED: tl.constexpr):
    """A K or V tile of the pool; an FP8 one converted to the queries' dtype in registers."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SCALED:
        x = x.to(dtype)
    return x


@triton.jit
def _head_scales(scales_ptr, kv_head, num_kv_heads, SCALED: tl.constexpr):
    """(K's, V's) scale of an FP8 cache's KV head ([2, kv_heads] fp32); 1, 1 for a 16-bit cache."""
    if SCALED:
        return tl.load(scales_ptr + kv_head), tl.load(scales_ptr + num_kv_heads + kv_head)
    return 1.0, 1.0


@triton.jit
def _store_part(part_out_ptr, part_lse_ptr, row, out, m_i, l_i, d, r_ok, D_PAD: tl.constexpr):
    """One split's output and log-sum-exp, for the merge kernel."""
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(part_out_ptr + row[:, None] * D_PAD + d[None, :], out, mask=r_ok[:, None])
    tl.store(part_lse_ptr + row, lse, mask=r_ok)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scales_ptr,
    scale_log2,
    sliding_window,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    QLEN: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
    SCALED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    k_scale, v_scale = _head_scales(scales_ptr, kv_head, tl.num_programs(1), SCALED)
    scale_log2 = scale_log2 * k_scale
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if sliding_window > 0:
        lo = tl.maximum(seq_len - (QLEN - 1) - sliding_window, 0)  # the first new token's window
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    r = tl.arange(0, ROWS_PAD)  # row r: query token r // GROUP of the sequence, head r % GROUP of the group
    head = kv_head * GROUP + r % GROUP
    r_ok = r < QLEN * GROUP
    token = seq * QLEN + r // GROUP  # its row in q and out
    pos = seq_len - QLEN + r // GROUP  # its position: it sees keys 0..pos (and no older than the window)
    window = tl.where(sliding_window > 0, sliding_window, seq_len + 1)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [R, D]
    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        page = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=0)
        base = page.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = _tile(cache_ptr + base[None, :] + d[:, None], n_ok[None, :] & d_ok[:, None], q.dtype, SCALED)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [R, N]
        visible = n_ok[None, :]
        if QLEN > 1:  # causal among the new tokens, each its own window
            visible = visible & (n[None, :] <= pos[:, None]) & (n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key here yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(
            cache_ptr + stride_ckv + base[:, None] + d[None, :],
            n_ok[:, None] & d_ok[None, :],
            q.dtype,
            SCALED,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # this split had no keys
    out = acc / tl.where(empty, 1.0, l_i)[:, None] * v_scale
    if DIRECT:  # one split: this is the answer
        o_off = token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    else:
        row = (token * NUM_HEADS + head) * num_splits + split  # part_out [T, H, S, D_PAD], part_lse [T, H, S]
        _store_part(part_out_ptr, part_lse_ptr, row, out, m_i, l_i, d, r_ok, D_PAD)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    row = (seq * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + row + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [S]
    d = tl.arange(0, D_PAD)
    parts = tl.load(part_out_ptr + (row + s)[:, None] * D_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


def num_kv_splits(
    batch: int,
    kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    block_n: int = 64,
    max_splits: int = 128,
    waves: int = 4,
) -> int:
    """Enough splits for `waves` programs per multiprocessor (memory parallelism), never a split shorter
    than four key tiles."""
    programs = max(batch * kv_heads, 1)
    want = -(-waves * num_sms // programs)
    longest = max(-(-max_seq_len // (4 * block_n)), 1)
    return max(1, min(want, longest, max_splits))


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    query_len: int = 1,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B * query_len, heads, D], each sequence's last query_len tokens -> out [B * query_len, heads, D].

    block_tables [B, max_blocks] int32, seq_lens [B] int32 (context including these tokens). kv_scales
    [2, kv_heads] fp32 for an FP8 (e4m3) cache.
    """
    T, H, D = q.shape
    if query_len < 1 or T % query_len:
        raise ValueError(f"query_len: got {query_len}, allowed >= 1 and dividing q's {T} rows")
    B = T // query_len
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, B, kv_scales)
    if num_splits < 1:
        raise ValueError(f"num_splits: got {num_splits}, allowed >= 1")
    kv_heads = kv_cache.shape[3]
    group = H // kv_heads
    d_pad = triton.next_power_of_2(D)
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    direct = num_splits == 1
    part_out = out if direct else torch.empty((T, H, num_splits, d_pad), dtype=torch.float32, device=q.device)
    part_lse = out if direct else torch.empty((T, H, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, kv_heads, num_splits)](
        q,
        kv_cache,
        part_out,
        part_lse,
        out,
        block_tables,
        seq_lens,
        kv_scales if kv_scales is not None else seq_lens,
        scale * LOG2E,
        sliding_window or 0,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[2],
        HEAD_DIM=D,
        D_PAD=d_pad,
        NUM_HEADS=H,
        GROUP=group,
        QLEN=query_len,
        ROWS_PAD=max(16, triton.next_power_of_2(query_len * group)),
        BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype),
        DIRECT=direct,
        SCALED=kv_scales is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if direct:
        return out
    _decode_merge_kernel[(T, H)](
        part_out,
        part_lse,
        out,
        num_splits,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=H,
        HEAD_DIM=D,
        D_PAD=d_pad,
        SPLITS_PAD=max(triton.next_power_of_2(num_splits), 2),
    )
    return out
