"""Pure-torch paged attention (the kernels' reference): the CPU path.

Decode-only steps gather every sequence's pages once and run one batched SDPA with a length mask; other
steps use the per-sequence reference.
"""

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata, CodedLayer
from kernels.attention_ref import dequantize_kv, kv_write_ref, paged_attention_ref
from kernels.turboquant import decode_ref


def with_decoded_blocks(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, coded: CodedLayer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's reading of low-bit blocks: the coded blocks the tables name, decoded (decode_ref) and
    appended to the 16-bit cache, and the tables pointing at them. -> (cache, tables). A copy of those blocks
    only: the CPU path and the oracle (the Triton path reads codes as they are)."""
    ids = block_tables.long()
    is_coded = ids >= coded.num_base_blocks
    used = torch.unique(ids[is_coded])
    if not len(used):
        return kv_cache, block_tables
    first_low = coded.num_base_blocks + coded.codes.shape[0]
    parts = []
    for first, codes, norms, bits in (
        (coded.num_base_blocks, coded.codes, coded.norms, coded.bits),
        (first_low, coded.low_codes, coded.low_norms, coded.low_bits),
    ):
        mine = used[(used >= first) & (used < first + (0 if codes is None else codes.shape[0]))]
        if len(mine) and codes is not None and norms is not None:
            c, n = codes[mine - first], norms[mine - first]
            u, _, bs, heads, nbytes = c.shape
            decoded = decode_ref(c.reshape(-1, heads, nbytes), n.reshape(-1, heads), coded.signs, bits)
            parts.append(decoded.reshape(u, 2, bs, heads, -1).to(kv_cache.dtype))
    cache = torch.cat([kv_cache, *parts])  # used is sorted, pools in id order: parts line up with it
    remapped = torch.where(is_coded, kv_cache.shape[0] + torch.searchsorted(used, ids), ids)
    return cache, remapped.to(block_tables.dtype)


def batched_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
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
    pages = kv_cache[block_tables[:, :num_blocks].long()]  # [B, n, 2, bs, Hkv, D]; padding ids are valid
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

    def attend(
        self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window, kv_scales=None, coded=None
    ):
        block_tables = meta.block_tables
        if coded is not None and meta.has_coded:
            if kv_scales is not None:  # an FP8 recent side: dequantized too, for this reference's one cache
                kv_cache, kv_scales = dequantize_kv(kv_cache, kv_scales, q.dtype), None
            kv_cache, block_tables = with_decoded_blocks(kv_cache, block_tables, coded)
        if meta.max_query_len == 1 and meta.num_seqs > 1 and meta.query_positions is None:
            return batched_decode(q, kv_cache, block_tables, meta, scale, sliding_window, kv_scales)
        return paged_attention_ref(
            q,
            kv_cache,
            block_tables,
            meta.seq_lens_cpu,
            meta.query_start_loc_cpu,
            scale,
            sliding_window,
            kv_scales,
            meta.query_positions,
        )
