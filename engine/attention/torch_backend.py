"""Pure-torch paged attention (the kernels' reference): the CPU path."""

from engine.attention.backend import AttentionBackend, AttentionMetadata
from kernels.attention_ref import kv_write_ref, paged_attention_ref


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, kv_cache, k, v, meta: AttentionMetadata) -> None:
        kv_write_ref(k, v, kv_cache, meta.slot_mapping)

    def attend(self, q, kv_cache, meta: AttentionMetadata, scale: float, sliding_window: int | None):
        return paged_attention_ref(q, kv_cache, meta.block_tables, meta.seq_lens_cpu, meta.query_start_loc_cpu,
                                   scale, sliding_window)
