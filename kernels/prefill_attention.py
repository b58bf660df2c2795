"""Varlen causal attention over the paged pool: prefill, chunked prefill on a cached prefix, mixed batches.

One program owns BLOCK_Q query tokens of one sequence times the GROUP query heads that share one KV head,
packed as BLOCK_M = BLOCK_Q * GROUP_PAD rows of one matrix, so each K/V tile is read once per group.
Programs find their sequence by binary search over query_start_loc (no host-side tile map).
An FP8 (e4m3) cache is read as it is: tiles converted in registers, K's scale folded into the softmax
scale and V's applied to the output, accumulation in fp32; no dequantized copy.
"""

import torch
import triton
import triton.language as tl

from kernels.attention_ref import paged_attention_ref
from kernels.kv_write import check_kv_scales

__all__ = ["prefill_attention", "paged_attention_ref"]

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply exactly (no tf32), so an fp32 model gives the CPU path's numbers."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose tiles cover `tile`; sequence i's tiles start at query_start_loc[i] // BLOCK_Q + i."""
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _query_tile(query_start_loc_ptr, num_seqs, BLOCK_Q: tl.constexpr):
    """This program's query tile, the last tiles first (the causal tiles with the most keys start in the first
    wave, so the short ones fill the tail: longest-processing-time-first). -> (sequence, its first query row,
    its query count, the tile's index within it); the tile is empty when index * BLOCK_Q >= count."""
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    return seq, q_begin, q_len, tile - (q_begin // BLOCK_Q + seq)


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    cache_ptr,
    block_tables_ptr,
    seq,
    kv_head,
    start,
    stop,
    hi,
    scale_log2,
    sliding_window,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
    K_ROWS: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Online softmax over key tiles [start, stop). Unmasked tiles lie wholly below every row's diagonal."""
    d = tl.arange(0, D_PAD)
    for start_n in range(start, stop, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        if MASKED:
            page = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=0)
        else:
            page = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE)
        base = page.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [N]
        if K_ROWS:
            k_ptrs = cache_ptr + base[:, None] + d[None, :]  # [N, D], transposed in shared memory
            k_mask = n_ok[:, None] & (d[None, :] < HEAD_DIM)
        else:
            k_ptrs = cache_ptr + base[None, :] + d[:, None]  # [D, N]
            k_mask = n_ok[None, :] & (d[:, None] < HEAD_DIM)
        v_ptrs = cache_ptr + stride_ckv + base[:, None] + d[None, :]  # [N, D]
        if MASKED or HEAD_DIM != D_PAD:
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if SCALED:  # e4m3 tiles in the queries' dtype; the scales are applied outside the loop
            k, v = k.to(q.dtype), v.to(q.dtype)
        if K_ROWS:
            k = tl.trans(k)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [M, N], log2 domain
        if MASKED:
            allowed = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
            if sliding_window > 0:
                allowed = allowed & (n[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_safe = m_new  # every score of an unmasked tile is finite
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scales_ptr,
    positions_ptr,
    scale_log2,
    num_seqs,
    sliding_window,
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
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    K_ROWS: tl.constexpr,
    SCALED: tl.constexpr,
    POSITIONS: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    kv_head = tl.program_id(0)  # heads on the fast axis
    seq, q_begin, q_len, local = _query_tile(query_start_loc_ptr, num_seqs, BLOCK_Q)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    if SCALED:
        scale_log2 = scale_log2 * tl.load(scales_ptr + kv_head)  # K's scale

    rows = tl.arange(0, BLOCK_M)
    q_tok = local * BLOCK_Q + rows // GROUP_PAD  # query index within the sequence
    g = rows % GROUP_PAD
    head = kv_head * GROUP + g
    row_ok = (q_tok < q_len) & (g < GROUP)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_off = (q_begin + q_tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
    if POSITIONS:  # queries at given positions (ascending): a document's recomputed tokens
        q_pos = tl.load(positions_ptr + q_begin + q_tok, mask=q_tok < q_len, other=0)
        q_pos = tl.where(q_tok < q_len, q_pos, seq_len - 1)
        q_first = tl.load(positions_ptr + q_begin + local * BLOCK_Q)
        last = tl.minimum(local * BLOCK_Q + BLOCK_Q, q_len) - 1
        hi = tl.minimum(seq_len, tl.load(positions_ptr + q_begin + last) + 1)
    else:
        q_pos = ctx_len + q_tok  # absolute positions
        q_first = ctx_len + local * BLOCK_Q
        hi = tl.minimum(seq_len, q_first + BLOCK_Q)  # causal: nothing past the tile's last query
    lo = 0
    mid = 0  # [lo, mid): tiles every row sees whole; [mid, hi): the diagonal (or a window) needs masks
    if sliding_window > 0:
        lo = tl.maximum(q_first - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        mid = lo
    else:
        mid = (q_first + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, l_i, m_i = _attend_tiles(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        cache_ptr,
        block_tables_ptr,
        seq,
        kv_head,
        lo,
        mid,
        hi,
        scale_log2,
        sliding_window,
        stride_cb,
        stride_ckv,
        stride_cs,
        stride_ch,
        stride_bt,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
        BLOCK_N,
        PRECISION,
        False,
        K_ROWS,
        SCALED,
    )
    acc, l_i, m_i = _attend_tiles(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        cache_ptr,
        block_tables_ptr,
        seq,
        kv_head,
        mid,
        hi,
        hi,
        scale_log2,
        sliding_window,
        stride_cb,
        stride_ckv,
        stride_cs,
        stride_ch,
        stride_bt,
        BLOCK_SIZE,
        HEAD_DIM,
        D_PAD,
        BLOCK_N,
        PRECISION,
        True,
        K_ROWS,
        SCALED,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SCALED:
        out = out * tl.load(scales_ptr + tl.num_programs(0) + kv_head)  # V's scale (row 1: kv_heads on)
    o_off = (q_begin + q_tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def check_paged_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_seqs: int,
    kv_scales: torch.Tensor | None = None,
) -> None:
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(
            f"q: expected [tokens, heads, head_dim] with contiguous head_dim, got {tuple(q.shape)}"
        )
    if (
        kv_cache.dim() != 5
        or kv_cache.shape[1] != 2
        or kv_cache.shape[4] != q.shape[2]
        or kv_cache.stride(4) != 1
    ):
        raise ValueError(
            f"kv_cache: shape {tuple(kv_cache.shape)}, expected [blocks, 2, block_size, "
            f"kv_heads, {q.shape[2]}] with contiguous head_dim"
        )
    if q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"heads: {q.shape[1]} query heads is not a multiple of {kv_cache.shape[3]} KV heads")
    check_kv_scales(kv_cache, q.dtype, kv_scales)
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs or block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables: expected [>= {num_seqs}, max_blocks] row-major, got {tuple(block_tables.shape)}"
        )
    if seq_lens.shape[0] < num_seqs:
        raise ValueError(f"seq_lens: expected >= {num_seqs} entries, got {seq_lens.shape[0]}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected int32, got {t.dtype}")


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_rows: bool = False,
    kv_scales: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, heads, D] (queries are each sequence's last tokens) -> out [T, heads, D].

    block_tables [B, max_blocks] int32, seq_lens [B] int32 (context after this step),
    query_start_loc [B + 1] int32. kv_scales [2, kv_heads] fp32 for an FP8 (e4m3) cache. query_positions
    [T] int32: the queries' positions instead (ascending within a sequence, each below its seq_len).
    """
    num_seqs = query_start_loc.shape[0] - 1
    check_paged_inputs(q, kv_cache, block_tables, seq_lens, num_seqs, kv_scales)
    if query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc: expected int32, got {query_start_loc.dtype}")
    T, H, D = q.shape
    if query_positions is not None and (
        query_positions.shape != (T,) or query_positions.dtype != torch.int32
    ):
        raise ValueError(f"query_positions: expected [{T}] int32, got {tuple(query_positions.shape)}")
    group = H // kv_cache.shape[3]
    group_pad = max(triton.next_power_of_2(group), 1)
    # at least 16 rows for the matrix units; fewer query tokens per tile when the queries are short
    rows = max(16, min(block_m, triton.next_power_of_2(max(max_query_len, 1)) * group_pad))
    block_q = max(rows // group_pad, 1)
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    grid = (kv_cache.shape[3], T // block_q + num_seqs)
    if grid[1] > 65535:  # CUDA's limit on a grid's second dimension
        raise ValueError(f"q: {T} query tokens need {grid[1]} tiles of {block_q}, at most 65535 a launch")
    _prefill_attention_kernel[grid](
        q,
        kv_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        kv_scales if kv_scales is not None else seq_lens,
        query_positions if query_positions is not None else seq_lens,
        scale * LOG2E,
        num_seqs,
        sliding_window or 0,
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
        D_PAD=triton.next_power_of_2(D),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype),
        K_ROWS=k_rows,
        SCALED=kv_scales is not None,
        POSITIONS=query_positions is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
