"""Mixture-of-experts: softmax top-k routing and a grouped expert matmul over tokens sorted by expert.

Tokens' (token, slot) pairs are sorted by expert and each expert's run padded to BLOCK_M rows, so every
program of the grouped matmul multiplies one tile of rows by one expert's weights: one launch per GEMM
for all experts, with no host synchronisation (sizes use the upper bound T*k + E*(BLOCK_M-1)).
Expert weights may be FP8 (e4m3) with one scale per (expert, output channel): converted in registers,
scaled before the routing weight.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul
from kernels.prefill_attention import dot_precision

__all__ = ["fused_moe", "fused_moe_ref", "moe_align", "topk_softmax", "topk_softmax_ref"]


def topk_softmax_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """router_logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _expert_weight(
    w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype
) -> torch.Tensor:
    if scale is None:
        return w[expert]
    return (w[expert].float() * scale[expert].float()[:, None]).to(dtype)  # FP8: dequantized


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate | up), w2 [E, H, I] -> [T, H]: a loop over the experts hit. With
    scales ([E, 2I], [E, H] fp32) the weights are e4m3."""
    weights, ids = topk_softmax_ref(router_logits, top_k, renormalize)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        token_idx, slot = torch.where(ids == expert)
        gate, up = F.linear(x[token_idx], _expert_weight(w13, w13_scale, expert, x.dtype)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, _expert_weight(w2, w2_scale, expert, x.dtype))  # [t, H]
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    return out


@triton.jit
def _topk_softmax_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    stride_l,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    total = 0.0
    for j in tl.static_range(TOP_K):  # k rounds of argmax; ties go to the lower expert id, as torch.topk
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, E_PAD), 0)
        tl.store(weights_ptr + t * TOP_K + j, best)
        tl.store(ids_ptr + t * TOP_K + j, idx.to(tl.int64))
        total += best
        p = tl.where(e == idx, -1.0, p)
    if RENORMALIZE:
        for j in tl.static_range(TOP_K):
            w = tl.load(weights_ptr + t * TOP_K + j)
            tl.store(weights_ptr + t * TOP_K + j, w / total)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: got {top_k}, allowed 1..{E}")
    if router_logits.stride(1) != 1:
        raise ValueError("router_logits: experts dimension must be contiguous")
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=router_logits.device)
    if T:
        _topk_softmax_kernel[(T,)](
            router_logits,
            weights,
            ids,
            router_logits.stride(0),
            E=E,
            E_PAD=triton.next_power_of_2(E),
            TOP_K=top_k,
            RENORMALIZE=renormalize,
        )
    return weights, ids


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int):
    """ids [T, k] -> (sorted_rows [P] int32: flat (token*k + slot) per padded row, T*k = padding;
    tile_expert [P // block_m] int32: each tile's expert, -1 past the end)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    capacity = n + num_experts * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    order = torch.argsort(flat, stable=True)  # rows grouped by expert
    # scatter_add, not bincount: bincount reads the maximum back to the host, which graph capture forbids
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    rank = torch.arange(n, device=ids.device) - start[sorted_experts]
    sorted_rows = torch.full((capacity,), n, dtype=torch.int32, device=ids.device)
    sorted_rows[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    tile_start = torch.arange(0, capacity, block_m, device=ids.device)
    tile_expert = torch.searchsorted(torch.cumsum(padded, 0), tile_start, right=True).to(torch.int32)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return sorted_rows, tile_expert


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    sorted_rows_ptr,
    tile_expert_ptr,
    row_weights_ptr,
    num_rows,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    stride_se,
    A_ROW_DIV: tl.constexpr,
    MUL_WEIGHTS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # flat (token, slot) ids
    row_ok = rows < num_rows
    a_rows = (rows // A_ROW_DIV).to(tl.int64)  # the first GEMM reads token rows, the second slot rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w = tl.load(w_base + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [K, N]
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_SCALE:  # FP8 weights: one scale per (expert, output channel)
        acc = acc * tl.load(scale_ptr + expert.to(tl.int64) * stride_se + n, mask=n_ok, other=0.0)[None, :]
    if MUL_WEIGHTS:
        acc = acc * tl.load(row_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_om + n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


def _grouped_matmul(a, w, scale, sorted_rows, tile_expert, num_rows, a_row_div, row_weights, block_m):
    E, N, K = w.shape
    out = torch.empty((num_rows, N), dtype=a.dtype, device=a.device)
    block_n, block_k = 64, 64 if K >= 64 else max(16, triton.next_power_of_2(K))
    grid = (tile_expert.numel(), triton.cdiv(N, block_n))
    _grouped_matmul_kernel[grid](
        a,
        w,
        scale if scale is not None else a,
        out,
        sorted_rows,
        tile_expert,
        row_weights if row_weights is not None else a,
        num_rows,
        N,
        K,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        scale.stride(0) if scale is not None else 0,
        A_ROW_DIV=a_row_div,
        MUL_WEIGHTS=row_weights is not None,
        HAS_SCALE=scale is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION=dot_precision(a.dtype),
    )
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """Same contract as fused_moe_ref: x [T, H], w13 [E, 2I, H], w2 [E, H, I], router_logits [T, E]; with
    scales [E, 2I] and [E, H] fp32, w13 and w2 are e4m3."""
    T, H = x.shape
    E, two_i, H2 = w13.shape
    if H2 != H or w2.shape != (E, H, two_i // 2) or router_logits.shape != (T, E):
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
            f"router_logits {tuple(router_logits.shape)} do not agree"
        )
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("x, w13, w2: last dim must be contiguous")
    if (w13_scale is None) != (w2_scale is None) or (
        w13_scale is not None
        and (
            w13_scale.shape != (E, two_i)
            or w2_scale is None
            or w2_scale.shape != (E, H)
            or w13_scale.stride(1) != 1
        )
    ):
        raise ValueError(
            f"w13_scale, w2_scale: expected both or neither, [{E}, {two_i}] and [{E}, {H}] contiguous"
        )
    if T == 0:
        return torch.zeros_like(x)
    weights, ids = topk_softmax(router_logits, top_k, renormalize)
    sorted_rows, tile_expert = moe_align(ids, E, block_m)
    n = T * top_k
    h = _grouped_matmul(x, w13, w13_scale, sorted_rows, tile_expert, n, top_k, None, block_m)  # [T*k, 2I]
    h = silu_and_mul(h)  # [T*k, I]
    y = _grouped_matmul(
        h, w2, w2_scale, sorted_rows, tile_expert, n, 1, weights.to(x.dtype).reshape(-1), block_m
    )
    return y.view(T, top_k, H).sum(dim=1)
