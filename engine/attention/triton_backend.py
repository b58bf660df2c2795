"""Triton paged attention: the split-KV decode kernel when every sequence computes the same few tokens
(decode, verification of k drafts), the varlen kernel otherwise.

With low-bit blocks (a KV age policy), decode and verify steps run the mixed-format kernel
(kernels/coded_attention.py), which reads codes as they are, whether or not a block is coded yet (so one
captured graph serves every step). A mixed step (decodes packed with prefill chunks) is split once per step
(plan): its one-token sequences go to the mixed-format kernel, the others to the varlen kernel; a prefill
chunk whose own context already holds coded blocks (a prompt longer than sinks + window, chunked) reads those
blocks decoded by the reference, since prefill attention over codes is not built yet.
"""

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata, CodedLayer
from engine.attention.torch_backend import with_decoded_blocks
from kernels.coded_attention import coded_decode_attention
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.kv_write import kv_write
from kernels.prefill_attention import prefill_attention
from kernels.rope_kv_write import rope_kv_write


@dataclass
class MixedSplit:
    """A mixed step over coded blocks: its one-token rows (= sequences) and the other sequences."""

    decode_rows: torch.Tensor  # [Bd] int64: the q rows (and sequences) of one-token sequences
    decode_seqs: torch.Tensor  # [Bd] int64
    decode_splits: int
    rest_rows: torch.Tensor  # [Tr] int64: the other sequences' q rows
    rest_seqs: torch.Tensor  # [Br] int64
    rest_query_start: torch.Tensor  # [Br + 1] int32
    rest_max_query_len: int


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
        elif meta.has_coded:
            meta.mixed_split = self._split(meta, num_kv_heads)

    def _split(self, meta: AttentionMetadata, num_kv_heads: int) -> MixedSplit:
        starts = meta.query_start_loc_cpu
        lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        one = [i for i, n in enumerate(lens) if n == 1]
        rest = [i for i, n in enumerate(lens) if n != 1]
        rest_rows = [r for i in rest for r in range(starts[i], starts[i + 1])]
        rest_start = [0]
        for i in rest:
            rest_start.append(rest_start[-1] + lens[i])
        dev = meta.seq_lens.device
        longs = torch.tensor([starts[i] for i in one] + one + rest_rows + rest, dtype=torch.int64).to(dev)
        a, b, c = len(one), 2 * len(one), 2 * len(one) + len(rest_rows)
        max_seq = max((meta.seq_lens_cpu[i] for i in one), default=1)
        return MixedSplit(
            decode_rows=longs[:a],
            decode_seqs=longs[a:b],
            decode_splits=num_kv_splits(len(one), num_kv_heads, max_seq, self.num_sms),
            rest_rows=longs[b:c],
            rest_seqs=longs[c:],
            rest_query_start=torch.tensor(rest_start, dtype=torch.int32).to(dev),
            rest_max_query_len=max((lens[i] for i in rest), default=0),
        )

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata, kv_scales=None) -> None:
        kv_write(k, v, kv_cache, meta.slot_mapping, kv_scales)

    def rope_and_write_kv(self, q, k, v, cos, sin, kv_cache, meta: AttentionMetadata, kv_scales=None):
        return rope_kv_write(q, k, v, cos, sin, kv_cache, meta.slot_mapping, kv_scales)  # one launch, not two

    def attend(
        self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window, kv_scales=None, coded=None
    ):
        query_len = decode_query_len(meta)
        block_tables = meta.block_tables
        if coded is not None and query_len:
            return coded_decode_attention(
                q,
                kv_cache,
                coded.codes,
                coded.norms,
                coded.signs,
                coded.bits,
                block_tables,
                meta.seq_lens,
                scale,
                meta.num_kv_splits,
                query_len=query_len,
            )
        if coded is not None and isinstance(meta.mixed_split, MixedSplit):
            return self._attend_split(q, kv_cache, meta, scale, coded, meta.mixed_split)
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
        )

    def _attend_split(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        coded: CodedLayer,
        split: MixedSplit,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        tables, seq_lens = meta.block_tables, meta.seq_lens
        if len(split.decode_rows):
            out[split.decode_rows] = coded_decode_attention(
                q[split.decode_rows],
                kv_cache,
                coded.codes,
                coded.norms,
                coded.signs,
                coded.bits,
                tables[split.decode_seqs],
                seq_lens[split.decode_seqs],
                scale,
                split.decode_splits,
            )
        if len(split.rest_rows):
            rest_cache, rest_tables = with_decoded_blocks(kv_cache, tables[split.rest_seqs], coded)
            out[split.rest_rows] = prefill_attention(
                q[split.rest_rows],
                rest_cache,
                rest_tables,
                seq_lens[split.rest_seqs],
                split.rest_query_start,
                split.rest_max_query_len,
                scale,
            )
        return out
