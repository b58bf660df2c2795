"""Decode attention over a context whose KV blocks are in two formats: the pool's 16-bit blocks and rotated
low-bit blocks (kernels/turboquant.py), read as they are, in one split-KV pass.

A block table entry below `num_base_blocks` names a 16-bit block ([N0, 2, bs, Hkv, D] layer view); one at or
above names coded block id - num_base_blocks: packed codes [N1, 2, bs, Hkv, D * bits / 8] uint8 and row norms
[N1, 2, bs, Hkv] fp32. For a coded block the scores are (R q) . (|k| c[codes]) with the query rotated once per
head before the kernel, and the values accumulate in the rotated basis; codes become centroids in registers
and nothing is dequantized to memory. Each program keeps two fp32 accumulators under one online softmax
(16-bit values, rotated values); the splits merge by log-sum-exp, and the rotated part is turned back
(R^T, one [D, D] product a head) after the merge.

Program (sequence, KV head, split): the QLEN x GROUP queries of that KV head (each of the sequence's new tokens,
causal among themselves: decode, or verifying drafts) as the rows of one matrix, TILE_N tokens a step (several
blocks, each of either format; a format's work is skipped in a tile that has none of its blocks).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.decode_attention import _decode_merge_kernel, _head_scales
from kernels.prefill_attention import LOG2E, _query_tile, dot_precision
from kernels.turboquant import decode_ref, device_codebook, hadamard, odd_polynomial, rotate_queries

TILE_N = 32  # tokens a step: several blocks, each 16-bit or coded (64 spills registers on an H100)
DEQUANT = 1  # how codes become centroids: 0 a table gathered, 1 a polynomial in registers (_coded_rows)


@triton.jit
def _coded_rows(
    codes_ptr, norms_ptr, centroids_ptr, col, ncol, ok, d, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
    DEQUANT: tl.constexpr,
):  # fmt: skip
    """Coded rows, one a column (col: offset of its token's first code byte, ncol: of its norm; ok: a coded
    column) -> (centroids c[code] [N, D], rotated basis; norms |x| [N] fp32), zero where not ok. The norms stay
    apart: they scale the scores and the probabilities, [N] values instead of [N, D]. 4 and 2 bits: the row's
    bytes load as they lie and split into codes (nibbles, or bit pairs) in registers; 3 bits (codes straddle
    bytes): a byte or two a coordinate. DEQUANT 0: centroids_ptr is the table, gathered; 1: it holds the
    codebook's odd polynomial (turboquant.odd_polynomial), evaluated in registers."""
    if BITS == 3:
        bit = d * 3
        ptr = codes_ptr + col[:, None] + (bit // 8)[None, :]
        spill = ((bit % 8) + 3 > 8)[None, :] & ok[:, None]
        word = tl.load(ptr, mask=ok[:, None], other=0).to(tl.int32)
        word = word | (tl.load(ptr + 1, mask=spill, other=0).to(tl.int32) << 8)
        code = (word >> (bit % 8)[None, :]) & 7
    else:
        j = tl.arange(0, HEAD_DIM * BITS // 8)
        byte = tl.load(codes_ptr + col[:, None] + j[None, :], mask=ok[:, None], other=0).to(tl.int32)
        if BITS == 4:  # coordinates 2j, 2j + 1
            code = tl.reshape(tl.join(byte & 15, byte >> 4), [col.shape[0], HEAD_DIM])
        else:  # 2 bits: coordinates 4j + 2i + t hold bits 2 (2i + t)
            even = tl.join(byte & 3, (byte >> 4) & 3)
            odd = tl.join((byte >> 2) & 3, byte >> 6)
            code = tl.reshape(tl.join(even, odd), [col.shape[0], HEAD_DIM])
    norm = tl.load(norms_ptr + ncol, mask=ok, other=0.0)
    if DEQUANT == 0:  # one return: Triton wants the same types from every return of a function
        values = tl.load(centroids_ptr + code).to(tl.float32)
    else:
        HALF: tl.constexpr = 1 << (BITS - 1)
        u = code.to(tl.float32) * (2.0 / (2 * HALF - 1)) - 1.0
        v = u * u
        c = tl.zeros_like(u) + tl.load(centroids_ptr + HALF - 1)
        for k in tl.static_range(HALF - 1):
            c = c * v + tl.load(centroids_ptr + HALF - 2 - k)
        values = c * u
    return values, norm


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One tile's scores s [R, N] (log2 units) into the running max and sum: -> (p, alpha, m, l)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _pass_columns(plain, coded, low, allowed, PASS: tl.constexpr):
    """The columns a pass reads (1: the 16-bit ones, 2: the coded ones, 0: all); the rest are no keys."""
    if PASS == 1:
        coded, low = coded & False, low & False
        allowed = allowed & plain[None, :]
    if PASS == 2:
        plain = plain & False
        allowed = allowed & (coded | low)[None, :]
    return plain, coded, low, allowed


@triton.jit
def _accumulate_values(
    acc, acc_rot, p, dtype, plain, coded, low, any_plain, any_coded, any_low, base, col, ncol, lcol, lncol, d,
    base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr, low_centroids_ptr,
    sb1, sc1, sn1, sl1, sm1, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, LOW_BITS: tl.constexpr,
    PRECISION: tl.constexpr, DEQUANT: tl.constexpr, PASS: tl.constexpr, HAS_LOW: tl.constexpr,
):  # fmt: skip
    """A tile's probabilities p [R, N] times its values: 16-bit columns into acc, coded ones (their norms on
    p) into acc_rot, in the rotated basis."""
    if PASS != 2:  # noqa: SIM102 - a compile-time guard around a run-time test
        if any_plain:
            vb = tl.load(base_ptr + sb1 + base[:, None] + d[None, :], mask=plain[:, None], other=0.0)
            acc += tl.dot(p.to(dtype), vb.to(dtype), input_precision=PRECISION)
    if PASS != 1:  # noqa: SIM102 - a compile-time guard around a run-time test
        if any_coded:
            vc, vn = _coded_rows(
                codes_ptr + sc1,
                norms_ptr + sn1,
                centroids_ptr,
                col,
                ncol,
                coded,
                d,
                HEAD_DIM,
                BITS,
                DEQUANT,
            )
            acc_rot += tl.dot((p * vn[None, :]).to(dtype), vc.to(dtype), input_precision=PRECISION)
    if HAS_LOW:  # noqa: SIM102 - a compile-time guard around a run-time test
        if any_low:
            vl, wn = _coded_rows(
                low_codes_ptr + sl1, low_norms_ptr + sm1, low_centroids_ptr, lcol, lncol, low, d, HEAD_DIM,
                LOW_BITS, DEQUANT,
            )  # fmt: skip
            acc_rot += tl.dot((p * wn[None, :]).to(dtype), vl.to(dtype), input_precision=PRECISION)
    return acc, acc_rot


@triton.jit
def _mixed_tile(
    acc, acc_rot, m_i, l_i, q, q_rot, n, allowed, seq, kv_head, num_base_blocks, first_low, scale_log2,
    base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr, low_centroids_ptr,
    block_tables_ptr, stride_bt, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sn0, sn1, sn2, sn3,
    sl0, sl1, sl2, sl3, sm0, sm1, sm2, sm3,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, LOW_BITS: tl.constexpr,
    PRECISION: tl.constexpr, DEQUANT: tl.constexpr, PASS: tl.constexpr,
):  # fmt: skip
    """One tile of keys n [N] (`allowed` [R, N]: which rows see which keys) into the online softmax. Each
    column finds its block's entry: 16-bit (below num_base_blocks), coded at BITS, or coded at LOW_BITS (from
    first_low on; LOW_BITS 0: no such pool). Each format's columns load masked (zero outside it, so the
    scores add), and a format absent from the tile costs nothing. PASS 1: the 16-bit columns only, 2: the
    coded ones only (the other format's code is compiled out, so each pass holds fewer registers), 0: all."""
    n_ok = tl.max(allowed.to(tl.int32), 0) > 0
    d = tl.arange(0, HEAD_DIM)
    entry = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    plain = n_ok & (entry < num_base_blocks)
    coded = n_ok & (entry >= num_base_blocks) & (entry < first_low)
    low = n_ok & (entry >= first_low)
    within = n % BLOCK_SIZE
    base = entry * sb0 + within * sb2 + kv_head * sb3
    page = tl.maximum(entry - num_base_blocks, 0)
    col, ncol = page * sc0 + within * sc2 + kv_head * sc3, page * sn0 + within * sn2 + kv_head * sn3
    page = tl.maximum(entry - first_low, 0)
    lcol, lncol = page * sl0 + within * sl2 + kv_head * sl3, page * sm0 + within * sm2 + kv_head * sm3
    plain, coded, low, allowed = _pass_columns(plain, coded, low, allowed, PASS)
    any_plain = tl.max(plain.to(tl.int32), 0) > 0
    any_coded = tl.max(coded.to(tl.int32), 0) > 0
    any_low = tl.max(low.to(tl.int32), 0) > 0
    HAS_LOW: tl.constexpr = (LOW_BITS > 0) & (PASS != 1)
    # a pass skips the tiles with none of its columns (the fused kernel tests nothing: its loads pipeline)
    if any_plain | any_coded | any_low | (PASS == 0):
        s = tl.zeros(allowed.shape, tl.float32)
        if PASS != 2:  # noqa: SIM102 - a compile-time guard around a run-time test
            if any_plain:
                kb = tl.load(base_ptr + base[None, :] + d[:, None], mask=plain[None, :], other=0.0).to(
                    q.dtype
                )
                s += tl.dot(q, kb, input_precision=PRECISION)
        if PASS != 1:  # noqa: SIM102 - a compile-time guard around a run-time test
            if any_coded:
                kc, kn = _coded_rows(
                    codes_ptr, norms_ptr, centroids_ptr, col, ncol, coded, d, HEAD_DIM, BITS, DEQUANT
                )
                s += tl.dot(q_rot, tl.trans(kc.to(q_rot.dtype)), input_precision=PRECISION) * kn[None, :]
        if HAS_LOW:  # noqa: SIM102 - a compile-time guard around a run-time test
            if any_low:
                kl, ln = _coded_rows(
                    low_codes_ptr,
                    low_norms_ptr,
                    low_centroids_ptr,
                    lcol,
                    lncol,
                    low,
                    d,
                    HEAD_DIM,
                    LOW_BITS,
                    DEQUANT,
                )
                s += tl.dot(q_rot, tl.trans(kl.to(q_rot.dtype)), input_precision=PRECISION) * ln[None, :]
        s = tl.where(allowed, s * scale_log2, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        if PASS != 2:  # a pass keeps only its own accumulator live (the other stays zero)
            acc = acc * alpha[:, None]
        if PASS != 1:
            acc_rot = acc_rot * alpha[:, None]
        acc, acc_rot = _accumulate_values(
            acc, acc_rot, p, q.dtype, plain, coded, low, any_plain, any_coded, any_low, base, col, ncol, lcol,
            lncol, d, base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr,
            low_centroids_ptr, sb1, sc1, sn1, sl1, sm1, HEAD_DIM, BITS, LOW_BITS, PRECISION, DEQUANT, PASS, HAS_LOW,
        )  # fmt: skip
    return acc, acc_rot, m_i, l_i


@triton.jit
def _store_parts(part_ptr, lse_ptr, row, acc, acc_rot, m_i, l_i, d, r_ok, D_PAD: tl.constexpr):
    """This split's two normalized accumulators side by side, and its log-sum-exp, for the merge."""
    empty = l_i == 0.0
    inv = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = part_ptr + row[:, None] * (2 * D_PAD) + d[None, :]
    tl.store(part, acc * inv[:, None], mask=r_ok[:, None])
    tl.store(part + D_PAD, acc_rot * inv[:, None], mask=r_ok[:, None])
    tl.store(lse_ptr + row, lse, mask=r_ok)


@triton.jit
def _coded_decode_kernel(
    q_ptr,
    q_rot_ptr,
    base_ptr,
    codes_ptr,
    norms_ptr,
    centroids_ptr,
    low_codes_ptr,
    low_norms_ptr,
    low_centroids_ptr,
    scales_ptr,
    part_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    num_base_blocks,
    first_low,
    scale_log2,
    num_splits,
    split_offset,
    total_splits,
    stride_qt,
    stride_qh,
    sb0,
    sb1,
    sb2,
    sb3,
    sc0,
    sc1,
    sc2,
    sc3,
    sn0,
    sn1,
    sn2,
    sn3,
    sl0,
    sl1,
    sl2,
    sl3,
    sm0,
    sm1,
    sm2,
    sm3,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    QLEN: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    BITS: tl.constexpr,
    LOW_BITS: tl.constexpr,
    PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr,
    SCALED: tl.constexpr,
    PASS: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)
    r = tl.arange(0, ROWS_PAD)  # row r: new token r // GROUP of the sequence, head r % GROUP of the group
    r_ok = r < QLEN * GROUP
    head = kv_head * GROUP + r % GROUP
    token = seq * QLEN + r // GROUP  # its row in q and out
    pos = seq_len - QLEN + r // GROUP  # its position: it sees keys 0..pos
    d = tl.arange(0, HEAD_DIM)
    qmask = r_ok[:, None]
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    q_rot_off = (token[:, None] * NUM_HEADS + head[:, None]) * HEAD_DIM + d[None, :]  # contiguous [T, H, D]
    q_rot = tl.load(q_rot_ptr + q_rot_off, mask=qmask, other=0.0).to(q.dtype)
    k_scale, v_scale = _head_scales(scales_ptr, kv_head, tl.num_programs(1), SCALED)
    if SCALED:  # an FP8 16-bit side: its K scale on the queries that read it, its V scale on their sum
        q = (q.to(tl.float32) * k_scale).to(q_rot.dtype)
    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, HEAD_DIM], tl.float32)  # 16-bit blocks' values
    acc_rot = tl.zeros([ROWS_PAD, HEAD_DIM], tl.float32)  # coded blocks' values, rotated basis
    n_in = tl.arange(0, TILE_N)
    for t in range(first, last):  # a tile of TILE_N tokens; its blocks may be of either format
        n = t * TILE_N + n_in
        allowed = (n[None, :] < seq_len) & (n[None, :] <= pos[:, None]) & r_ok[:, None]
        acc, acc_rot, m_i, l_i = _mixed_tile(
            acc, acc_rot, m_i, l_i, q, q_rot, n, allowed, seq, kv_head, num_base_blocks, first_low, scale_log2,
            base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr, low_centroids_ptr,
            block_tables_ptr, stride_bt, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sn0, sn1, sn2, sn3,
            sl0, sl1, sl2, sl3, sm0, sm1, sm2, sm3,
            BLOCK_SIZE, HEAD_DIM, BITS, LOW_BITS, PRECISION, DEQUANT, PASS,
        )  # fmt: skip
    # part [T, H, total_splits, 2 * D_PAD], lse [T, H, total_splits]: a second pass writes after the first's
    row = (token * NUM_HEADS + head) * total_splits + split_offset + split
    _store_parts(part_ptr, lse_ptr, row, acc * v_scale, acc_rot, m_i, l_i, d, r_ok, HEAD_DIM)


def coded_decode_attention(
    q: torch.Tensor,
    base_cache: torch.Tensor,
    codes: torch.Tensor,
    norms: torch.Tensor,
    signs: torch.Tensor,
    bits: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    query_len: int = 1,
    low: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    tile_n: int = TILE_N,
    dequant: int = DEQUANT,
    num_warps: int = 4,
    kv_scales: torch.Tensor | None = None,
    passes: int = 1,
) -> torch.Tensor:
    """q [B * query_len, H, D] (each sequence's last query_len tokens: 1 for decode, 1 + k to verify k
    drafts) -> out [B * query_len, H, D]. base_cache [N0, 2, bs, Hkv, D] (16-bit), codes
    [N1, 2, bs, Hkv, D * bits / 8] uint8, norms [N1, 2, bs, Hkv] fp32, signs [Hkv, D] the layer's rotation;
    block table entries >= N0 name coded blocks. low = (codes, norms, bits) of a second coded pool at fewer
    bits, whose blocks' entries follow the first pool's (from N0 + N1 on). tile_n: tokens a kernel step (a
    power of two >= 32; fewer hold fewer registers); dequant, num_warps: kernel variants (benchmarks sweep
    them). kv_scales [2, Hkv] fp32: base_cache is e4m3 (an FP8 pool's recent blocks), read as it is.
    passes 2: the 16-bit blocks and the coded ones in two launches (each compiled for its format alone, so
    with fewer registers), their splits merged by log-sum-exp like any others; 1: one launch reads both."""
    T, H, D = q.shape
    if passes not in (1, 2):
        raise ValueError(f"passes: got {passes}, allowed 1 or 2")
    if query_len < 1 or T % query_len:
        raise ValueError(f"query_len: got {query_len}, allowed >= 1 and dividing q's {T} rows")
    B = T // query_len
    if tile_n < 32 or tile_n & (tile_n - 1):
        # 16 is slower, and with the nibble split it gave wrong results on an H100 at D = 128 (Triton 3.6)
        raise ValueError(f"tile_n: got {tile_n}, allowed a power of two >= 32")
    num_base, _, bs, kv_heads, _ = base_cache.shape
    check_coded_inputs(q, base_cache, codes, norms, signs, bits, block_tables, seq_lens, B, kv_scales)
    lows = _low_args(low, base_cache, codes, q, dequant)
    group = H // kv_heads
    d_pad = triton.next_power_of_2(D)
    q_rot = rotate_queries(q, signs, group).contiguous()  # [B, H, D] fp32: once per head
    centroids = _centroids(bits, q, dequant)
    total = num_splits * passes
    part = torch.empty((T, H, total, 2 * d_pad), dtype=torch.float32, device=q.device)
    lse = torch.empty((T, H, total), dtype=torch.float32, device=q.device)
    for k in range(passes if B else 0):  # pass 0: both formats; with two, 1: 16-bit, then 2: coded
        _coded_decode_kernel[(B, kv_heads, num_splits)](
            q, q_rot, base_cache, codes, norms, centroids, *lows.pointers, _scales(kv_scales, seq_lens), part,
            lse, block_tables, seq_lens,
            num_base, lows.first, scale * LOG2E, num_splits, k * num_splits, total, q.stride(0), q.stride(1),
            *base_cache.stride()[:4], *codes.stride()[:4], *norms.stride()[:4], *lows.strides,
            block_tables.stride(0), BLOCK_SIZE=bs, TILE_N=tile_n, HEAD_DIM=D, NUM_HEADS=H, GROUP=group,
            QLEN=query_len, ROWS_PAD=max(16, triton.next_power_of_2(query_len * group)), BITS=bits,
            LOW_BITS=lows.bits, PRECISION=dot_precision(q.dtype), DEQUANT=dequant, SCALED=kv_scales is not None,
            PASS=0 if passes == 1 else k + 1, num_warps=num_warps,
        )  # fmt: skip
    merged = torch.empty((T, H, 2 * d_pad), dtype=torch.float32, device=q.device)
    if B:
        _decode_merge_kernel[(T, H)](
            part, lse, merged, total, merged.stride(0), merged.stride(1),
            NUM_HEADS=H, HEAD_DIM=2 * d_pad, D_PAD=2 * d_pad,
            SPLITS_PAD=max(triton.next_power_of_2(total), 2),
        )  # fmt: skip
    per_q = signs.repeat_interleave(group, dim=0)  # [H, D]: each query head's KV head's rotation
    back = (merged[..., d_pad : d_pad + D] @ hadamard(D, q.device)) * per_q  # R^T: the rotated part returned
    return (merged[..., :D] + back).to(q.dtype)


@triton.jit
def _coded_prefill_kernel(
    q_ptr, q_rot_ptr, base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr,
    low_centroids_ptr, scales_ptr, out_ptr, out_rot_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_base_blocks, first_low, scale_log2, num_seqs, stride_qt, stride_qh,
    sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sn0, sn1, sn2, sn3, sl0, sl1, sl2, sl3, sm0, sm1, sm2, sm3, stride_bt,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr,
    LOW_BITS: tl.constexpr, PRECISION: tl.constexpr, DEQUANT: tl.constexpr, SCALED: tl.constexpr,
):  # fmt: skip
    """Program (KV head, query tile): BLOCK_Q query tokens of one sequence x its GROUP heads, over every
    key tile up to the tile's last query; writes the normalized 16-bit and rotated accumulators."""
    kv_head = tl.program_id(0)
    seq, q_begin, q_len, local = _query_tile(query_start_loc_ptr, num_seqs, BLOCK_Q)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_tok = local * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_tok < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = seq_len - q_len + q_tok
    d = tl.arange(0, HEAD_DIM)
    q_off = (q_begin + q_tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    rot_off = ((q_begin + q_tok)[:, None] * NUM_HEADS + head[:, None]) * HEAD_DIM + d[None, :]
    q_rot = tl.load(q_rot_ptr + rot_off, mask=row_ok[:, None], other=0.0).to(q.dtype)
    k_scale, v_scale = _head_scales(scales_ptr, kv_head, tl.num_programs(0), SCALED)
    if SCALED:
        q = (q.to(tl.float32) * k_scale).to(q_rot.dtype)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    acc_rot = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    hi = tl.minimum(seq_len, seq_len - q_len + local * BLOCK_Q + BLOCK_Q)  # causal: up to the last query
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        allowed = (n[None, :] <= q_pos[:, None]) & row_ok[:, None]
        acc, acc_rot, m_i, l_i = _mixed_tile(
            acc, acc_rot, m_i, l_i, q, q_rot, n, allowed, seq, kv_head, num_base_blocks, first_low, scale_log2,
            base_ptr, codes_ptr, norms_ptr, centroids_ptr, low_codes_ptr, low_norms_ptr, low_centroids_ptr,
            block_tables_ptr, stride_bt, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sn0, sn1, sn2, sn3,
            sl0, sl1, sl2, sl3, sm0, sm1, sm2, sm3,
            BLOCK_SIZE, HEAD_DIM, BITS, LOW_BITS, PRECISION, DEQUANT, 0,
        )  # fmt: skip
    inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(out_ptr + rot_off, acc * (inv * v_scale)[:, None], mask=row_ok[:, None])
    tl.store(out_rot_ptr + rot_off, acc_rot * inv[:, None], mask=row_ok[:, None])


def coded_prefill_attention(
    q: torch.Tensor,
    base_cache: torch.Tensor,
    codes: torch.Tensor,
    norms: torch.Tensor,
    signs: torch.Tensor,
    bits: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_n: int = 64,
    low: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention (prefill chunks, decodes packed with them) over 16-bit and coded blocks:
    q [T, H, D], each sequence's last query_len tokens (query_start_loc [B + 1] int32) -> out [T, H, D].
    The same tiles as coded_decode_attention; the rotated part is turned back once at the end."""
    T, H, D = q.shape
    B = query_start_loc.shape[0] - 1
    check_coded_inputs(q, base_cache, codes, norms, signs, bits, block_tables, seq_lens[:B], B, kv_scales)
    lows = _low_args(low, base_cache, codes, q, DEQUANT)
    num_base, _, bs, kv_heads, _ = base_cache.shape
    group = H // kv_heads
    group_pad = triton.next_power_of_2(group)
    rows = max(16, min(64, triton.next_power_of_2(max(max_query_len, 1)) * group_pad))
    block_q = max(rows // group_pad, 1)
    q_rot = rotate_queries(q, signs, group).contiguous()
    centroids = _centroids(bits, q, DEQUANT)
    out = torch.empty((T, H, D), dtype=torch.float32, device=q.device)
    out_rot = torch.empty_like(out)
    if T:
        _coded_prefill_kernel[(kv_heads, T // block_q + B)](
            q, q_rot, base_cache, codes, norms, centroids, *lows.pointers, _scales(kv_scales, seq_lens), out,
            out_rot, block_tables,
            seq_lens, query_start_loc, num_base, lows.first, scale * LOG2E, B, q.stride(0), q.stride(1),
            *base_cache.stride()[:4], *codes.stride()[:4], *norms.stride()[:4], *lows.strides,
            block_tables.stride(0), BLOCK_SIZE=bs, HEAD_DIM=D, NUM_HEADS=H, GROUP=group, GROUP_PAD=group_pad,
            BLOCK_Q=block_q, BLOCK_N=block_n, BITS=bits, LOW_BITS=lows.bits, PRECISION=dot_precision(q.dtype),
            DEQUANT=DEQUANT, SCALED=kv_scales is not None,
        )  # fmt: skip
    per_q = signs.repeat_interleave(group, dim=0)
    return (out + (out_rot @ hadamard(D, q.device)) * per_q).to(q.dtype)


@dataclass
class _LowArgs:
    pointers: tuple  # codes, norms, centroids of the low pool (the first pool's when there is none)
    strides: tuple  # its codes' and norms' first four strides
    first: int  # the first block table entry naming a low block
    bits: int  # 0: none


def _scales(kv_scales: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return kv_scales if kv_scales is not None else placeholder  # not read unless SCALED


def _centroids(bits: int, q: torch.Tensor, dequant: int) -> torch.Tensor:
    """What the kernel's centroids_ptr holds: the table in q's dtype (DEQUANT 0) or the odd polynomial (1)."""
    D, device = q.shape[-1], str(q.device)
    return device_codebook(bits, D, device, q.dtype)[0] if dequant == 0 else odd_polynomial(bits, D, device)


def _low_args(low, base_cache, codes, q, dequant) -> _LowArgs:
    first = base_cache.shape[0] + codes.shape[0]
    if low is None:
        norms_strides = (0, 0, 0, 0)
        return _LowArgs((codes, codes, codes), (*codes.stride()[:4], *norms_strides), 2**31 - 1, 0)
    low_codes, low_norms, low_bits = low
    D = base_cache.shape[-1]
    want = (low_codes.shape[0], *codes.shape[1:4], D * low_bits // 8)
    if low_codes.dtype != torch.uint8 or tuple(low_codes.shape) != want or low_codes.stride(-1) != 1:
        raise ValueError(f"low codes: uint8 {want}, got {low_codes.dtype} {tuple(low_codes.shape)}")
    if low_norms.dtype != torch.float32 or tuple(low_norms.shape) != want[:4]:
        raise ValueError(f"low norms: fp32 {want[:4]}, got {low_norms.dtype} {tuple(low_norms.shape)}")
    return _LowArgs(
        (low_codes, low_norms, _centroids(low_bits, q, dequant)),
        (*low_codes.stride()[:4], *low_norms.stride()[:4]),
        first,
        low_bits,
    )


def check_coded_inputs(
    q, base_cache, codes, norms, signs, bits, block_tables, seq_lens, B, kv_scales=None
) -> None:
    _, H, D = q.shape
    num_base, two, bs, kv_heads, dim = base_cache.shape
    if two != 2 or dim != D or H % kv_heads:
        raise ValueError(f"base_cache: [blocks, 2, bs, {H} / group, {D}], got {tuple(base_cache.shape)}")
    if q.stride(-1) != 1 or base_cache.stride(-1) != 1:
        raise ValueError("q, base_cache: the head dimension must be contiguous")
    if kv_scales is None and base_cache.dtype != q.dtype:
        raise ValueError(f"base_cache: a 16-bit cache in q's dtype {q.dtype}, got {base_cache.dtype}")
    if kv_scales is not None and (
        base_cache.dtype != torch.float8_e4m3fn
        or tuple(kv_scales.shape) != (2, kv_heads)
        or kv_scales.dtype != torch.float32
    ):
        raise ValueError(
            f"kv_scales: fp32 [2, {kv_heads}] with an e4m3 base_cache, got {kv_scales.dtype} "
            f"{tuple(kv_scales.shape)} and {base_cache.dtype}"
        )
    want = (codes.shape[0], 2, bs, kv_heads, D * bits // 8)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != want or codes.stride(-1) != 1:
        raise ValueError(f"codes: uint8 {want}, got {codes.dtype} {tuple(codes.shape)}")
    if norms.dtype != torch.float32 or tuple(norms.shape) != want[:4]:
        raise ValueError(f"norms: fp32 {want[:4]}, got {norms.dtype} {tuple(norms.shape)}")
    if tuple(signs.shape) != (kv_heads, D) or signs.dtype != torch.float32:
        raise ValueError(f"signs: fp32 [{kv_heads}, {D}], got {signs.dtype} {tuple(signs.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 or len(seq_lens) != B:
        raise ValueError("block_tables, seq_lens: int32, one row a sequence")


def coded_decode_attention_ref(
    q,
    base_cache,
    codes,
    norms,
    signs,
    bits,
    block_tables,
    seq_lens,
    scale,
    query_len: int = 1,
    low=None,
    kv_scales=None,
):
    """The oracle: every coded block decoded back to the original basis (decode_ref), then causal attention
    of each sequence's last query_len tokens."""
    starts = list(range(0, q.shape[0] + 1, query_len))
    return coded_prefill_attention_ref(
        q, base_cache, codes, norms, signs, bits, block_tables, seq_lens, starts, scale, low, kv_scales
    )


def coded_prefill_attention_ref(
    q,
    base_cache,
    codes,
    norms,
    signs,
    bits,
    block_tables,
    seq_lens,
    query_start_loc: list[int],
    scale,
    low=None,
    kv_scales=None,
):
    """The varlen oracle: sequence i's rows query_start_loc[i]:[i + 1] are its last tokens (an e4m3 base
    cache times kv_scales [2, Hkv])."""
    _, H, D = q.shape
    num_base, _, bs, kv_heads, _ = base_cache.shape
    out = torch.empty_like(q)
    for i, (a, b) in enumerate(zip(query_start_loc, query_start_loc[1:], strict=False)):
        L = int(seq_lens[i])
        blocks = []
        for entry in block_tables[i, : -(-L // bs)].tolist():
            first_low = num_base + codes.shape[0]
            if entry < num_base:
                block = base_cache[entry].float()
                blocks.append(block if kv_scales is None else block * kv_scales[:, None, :, None])
                continue
            if entry < first_low:  # [2, bs, Hkv, DB], [2, bs, Hkv]
                c, n, width = codes[entry - num_base], norms[entry - num_base], bits
            else:
                c, n, width = low[0][entry - first_low], low[1][entry - first_low], low[2]
            blocks.append(
                torch.stack([decode_ref(c[kv], n[kv], signs, width) for kv in (0, 1)])
            )  # [2, bs, Hkv, D]
        kv = torch.stack(blocks)  # [n, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(-1, kv_heads, D)[:L].repeat_interleave(H // kv_heads, dim=1)  # [L, H, D]
        v = kv[:, 1].reshape(-1, kv_heads, D)[:L].repeat_interleave(H // kv_heads, dim=1)
        s = torch.einsum("qhd,lhd->qhl", q[a:b].float(), k) * scale
        pos = torch.arange(L - (b - a), L, device=q.device)[:, None, None]
        s = s.masked_fill(torch.arange(L, device=q.device)[None, None, :] > pos, float("-inf"))
        out[a:b] = torch.einsum("qhl,lhd->qhd", s.softmax(-1), v).to(q.dtype)
    return out
