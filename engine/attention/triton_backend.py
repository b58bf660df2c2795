"""Triton paged attention: the split-KV decode kernel when every sequence computes the same few tokens
(decode, verification of k drafts), the varlen kernel otherwise.

With low-bit blocks (a KV age policy), decode and verify steps run the mixed-format kernel
(kernels/coded_attention.py), which reads codes as they are, whether or not a block is coded yet (so one
captured graph serves every step). Other steps (prefill chunks, decodes packed with them) run the varlen
kernel, or its mixed-format twin once any block is coded; no dequantized copy is made.
"""

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from kernels.coded_attention import coded_decode_attention, coded_prefill_attention
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.kv_write import kv_write
from kernels.prefill_attention import prefill_attention
from kernels.rope_kv_write import rope_kv_write

MAX_DECODE_QUERY_LEN = 16  # more new tokens per sequence: the varlen kernel's query tiles pay off


def decode_query_len(meta: AttentionMetadata) -> int:
    """The new tokens per sequence when the decode kernel takes the step, else 0."""
    q = meta.uniform_query_len
    return q if 1 <= q <= MAX_DECODE_QUERY_LEN else 0


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self):
        self.num_sms = (
            torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 1
        )

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:
        if decode_query_len(meta):
            meta.num_kv_splits = num_kv_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len, self.num_sms)

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata, kv_scales=None) -> None:
        kv_write(k, v, kv_cache, meta.slot_mapping, kv_scales)

    def rope_and_write_kv(self, q, k, v, cos, sin, kv_cache, meta: AttentionMetadata, kv_scales=None):
        return rope_kv_write(q, k, v, cos, sin, kv_cache, meta.slot_mapping, kv_scales)  # one launch, not two

    def attend(
        self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window, kv_scales=None, coded=None
    ):
        query_len = 0 if meta.query_positions is not None else decode_query_len(meta)
        block_tables = meta.block_tables
        if coded is not None and (query_len or meta.has_coded):
            pools = (
                q,
                kv_cache,
                coded.codes,
                coded.norms,
                coded.signs,
                coded.bits,
                block_tables,
                meta.seq_lens,
            )
            if query_len:
                return coded_decode_attention(
                    *pools, scale, meta.num_kv_splits, query_len=query_len, low=coded.low, kv_scales=kv_scales
                )
            # other steps over coded blocks: the varlen coded kernel
            return coded_prefill_attention(
                *pools, meta.query_start_loc, meta.max_query_len, scale, low=coded.low, kv_scales=kv_scales
            )
        if query_len:
            return decode_attention(
                q,
                kv_cache,
                block_tables,
                meta.seq_lens,
                scale,
                meta.num_kv_splits,
                sliding_window,
                query_len=query_len,
                kv_scales=kv_scales,
            )
        return prefill_attention(
            q,
            kv_cache,
            block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            scale,
            sliding_window,
            kv_scales=kv_scales,
            query_positions=meta.query_positions,
        )
