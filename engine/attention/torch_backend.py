"""Pure-torch paged attention (the kernels' reference): the CPU path.

Decode-only steps gather every sequence's pages once and run one batched SDPA with a length mask; other
steps use the per-sequence reference.
"""

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata
from kernels.attention_ref import dequantize_kv, kv_write_ref, paged_attention_ref


def batched_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, heads, D], one query per sequence -> [B, heads, D]. An FP8 cache's pages are dequantized as
    they are gathered (kv_scales [2, kv_heads])."""
    B, H, D = q.shape
    num_kv_heads, bs = kv_cache.shape[3], meta.block_size
    L = meta.max_seq_len
    num_blocks = -(-L // bs)
    pages = kv_cache[meta.block_tables[:, :num_blocks].long()]  # [B, n, 2, bs, Hkv, D]; padding ids are valid
    pages = dequantize_kv(pages, kv_scales, q.dtype)
    k = pages[:, :, 0].reshape(B, num_blocks * bs, num_kv_heads, D)[:, :L].transpose(1, 2)  # [B, Hkv, L, D]
    v = pages[:, :, 1].reshape(B, num_blocks * bs, num_kv_heads, D)[:, :L].transpose(1, 2)
    pos = torch.arange(L, device=q.device)[None, :]  # [1, L]
    lens = meta.seq_lens.long()[:, None]  # [B, 1]
    mask = pos < lens
    if sliding_window:
        mask &= pos >= lens - sliding_window
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=num_kv_heads != H
    )  # [B, H, 1, D]
    return out[:, :, 0]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata, kv_scales=None) -> None:
        kv_write_ref(k, v, kv_cache, meta.slot_mapping, kv_scales)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window, kv_scales=None):
        if meta.max_query_len == 1 and meta.num_seqs > 1:
            return batched_decode(q, kv_cache, meta, scale, sliding_window, kv_scales)
        return paged_attention_ref(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens_cpu,
            meta.query_start_loc_cpu,
            scale,
            sliding_window,
            kv_scales,
        )
