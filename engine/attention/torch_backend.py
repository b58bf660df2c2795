"""Pure-torch paged attention: gather a sequence's pages, then SDPA. The CPU path and the test oracle."""

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata) -> None:
        block_ids = meta.slot_mapping // meta.block_size  # [T]
        offsets = meta.slot_mapping % meta.block_size  # [T]
        kv_cache[block_ids, 0, offsets] = k
        kv_cache[block_ids, 1, offsets] = v

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        out = torch.empty_like(q)
        num_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
        group = num_heads // num_kv_heads
        bs = meta.block_size
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
            seq_len = meta.seq_lens_cpu[i]
            num_blocks = -(-seq_len // bs)
            pages = kv_cache[meta.block_tables[i, :num_blocks].long()]  # [n, 2, bs, Hkv, D]
            k = pages[:, 0].reshape(-1, num_kv_heads, q.shape[2])[:seq_len]  # [L, Hkv, D]
            v = pages[:, 1].reshape(-1, num_kv_heads, q.shape[2])[:seq_len]
            q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]  # [n, 1]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, L]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),  # [H, n, D]
                k.transpose(0, 1).repeat_interleave(group, dim=0),  # [H, L, D]
                v.transpose(0, 1).repeat_interleave(group, dim=0),
                attn_mask=mask, scale=scale)
            out[start:end] = o.transpose(0, 1)
        return out
