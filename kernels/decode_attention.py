"""Paged decode attention: one query token per sequence, split-KV (flash-decoding) for long contexts.

Program (sequence, KV head, split) packs the GROUP query heads of that KV head as the rows of one matrix,
so each K/V byte is read once per group; splits divide the context so that short batches still fill
the chip. A second kernel merges the splits by their log-sum-exp. Row i of q belongs to sequence i.
"""

import torch
import triton
import triton.language as tl

from kernels.attention_ref import paged_attention_ref
from kernels.prefill_attention import LOG2E, check_paged_inputs, dot_precision

__all__ = ["decode_attention", "num_kv_splits", "paged_attention_ref"]


@triton.jit
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
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
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if sliding_window > 0:
        lo = tl.maximum(seq_len - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + g
    g_ok = g < GROUP
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [G, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        page = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=0)
        base = page.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(cache_ptr + base[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [G, N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            cache_ptr + stride_ckv + base[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # this split had no keys
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:  # one split: this is the answer
        o_off = seq * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        row = (seq * NUM_HEADS + head) * num_splits + split  # part_out [B, H, S, D_PAD], part_lse [B, H, S]
        tl.store(part_out_ptr + row[:, None] * D_PAD + d[None, :], out, mask=g_ok[:, None])
        tl.store(part_lse_ptr + row, lse, mask=g_ok)


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
) -> torch.Tensor:
    """q [B, heads, D], one query per sequence -> out [B, heads, D].

    block_tables [B, max_blocks] int32, seq_lens [B] int32 (context including this token).
    """
    B, H, D = q.shape
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, B)
    if num_splits < 1:
        raise ValueError(f"num_splits: got {num_splits}, allowed >= 1")
    kv_heads = kv_cache.shape[3]
    group = H // kv_heads
    d_pad = triton.next_power_of_2(D)
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    direct = num_splits == 1
    part_out = out if direct else torch.empty((B, H, num_splits, d_pad), dtype=torch.float32, device=q.device)
    part_lse = out if direct else torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, kv_heads, num_splits)](
        q,
        kv_cache,
        part_out,
        part_lse,
        out,
        block_tables,
        seq_lens,
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
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype),
        DIRECT=direct,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if direct:
        return out
    _decode_merge_kernel[(B, H)](
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
