"""Triton paged attention: split-KV decode kernel for decode-only steps, varlen kernel otherwise."""

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.kv_write import kv_write
from kernels.prefill_attention import prefill_attention


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self):
        self.num_sms = (
            torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 1
        )

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:
        if meta.max_query_len == 1:
            meta.num_kv_splits = num_kv_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len, self.num_sms)

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata) -> None:
        kv_write(k, v, kv_cache, meta.slot_mapping)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        if meta.max_query_len == 1:
            return decode_attention(
                q, kv_cache, meta.block_tables, meta.seq_lens, scale, meta.num_kv_splits, sliding_window
            )
        return prefill_attention(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            scale,
            sliding_window,
        )
