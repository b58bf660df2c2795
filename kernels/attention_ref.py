"""Pure-torch paged attention and KV write: the oracle for the Triton kernels and the CPU path.

Pool layer view: kv_cache [num_blocks, 2, block_size, kv_heads, head_dim] (index 0 = K, 1 = V).
Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its context holds seq_lens[i] tokens
(the queries are the last ones) in blocks block_tables[i, :].

An FP8 (e4m3) cache stores K / k_scale and V / v_scale, one fp32 scale per KV head (`kv_scales` [2, kv_heads]:
row 0 for K, row 1 for V); readers multiply back.
"""

import torch
import torch.nn.functional as F


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., kv_heads, head_dim] / scale [kv_heads] -> e4m3 (saturating at the format's range)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale.float()[:, None]).clamp(-limit, limit).to(dtype)


def dequantize_kv(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The values of a cache, or of pages gathered from one ([..., 2, block_size, kv_heads, head_dim]), in
    `dtype` (a copy: the reference's way, never the kernels')."""
    if kv_scales is None:
        return kv_cache
    return (kv_cache.float() * kv_scales.float()[:, None, :, None]).to(dtype)


def kv_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """k, v [T, kv_heads, head_dim] -> kv_cache at flat slots (block * block_size + offset); slot < 0 skips.
    With kv_scales the cache is FP8."""
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k, v = k[keep], v[keep]
    if kv_scales is not None:
        k, v = quantize_kv(k, kv_scales[0], kv_cache.dtype), quantize_kv(v, kv_scales[1], kv_cache.dtype)
    kv_cache[blocks, 0, offsets] = k
    kv_cache[blocks, 1, offsets] = v


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    sliding_window: int | None = None,
    kv_scales: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> out [T, heads, head_dim]; causal within each sequence. With kv_scales
    [2, kv_heads] the cache is FP8. query_positions [T]: each query's position in its sequence (ascending
    within one; default: the sequence's last tokens), every key at or before it attended."""
    out = torch.empty_like(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        num_blocks = -(-seq_len // block_size)
        pages = dequantize_kv(
            kv_cache[block_tables[i, :num_blocks].long()], kv_scales, q.dtype
        )  # [n, 2, bs, Hkv, D]
        k = pages[:, 0].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [L, Hkv, D]
        v = pages[:, 1].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        if query_positions is not None:
            q_pos = query_positions[start:end].long()[:, None]
        else:
            q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, L]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # [H, n, D]
            k.transpose(0, 1).repeat_interleave(group, dim=0),  # [H, L, D]
            v.transpose(0, 1).repeat_interleave(group, dim=0),
            attn_mask=mask,
            scale=scale,
        )
        out[start:end] = o.transpose(0, 1)
    return out
