"""CUDA graphs for decode steps: the forward for one token per sequence, captured for a ladder of batch
sizes and replayed with the batch padded up to the next captured size.

Static buffers hold the step's inputs; padded rows have slot -1 (their K/V are not written) and a
one-token context, and their logits are dropped. The attention backend must read only device tensors.
"""

import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.models.decoder import DecoderForCausalLM
from kernels.decode_attention import num_kv_splits


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class CUDAGraphRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            block_size=self.block_size,
            num_kv_splits=num_kv_splits(bs, self.model.config.num_kv_heads, self.max_model_len, self.num_sms),
        )
        cos, sin = self.model.rotary.cos_sin(self.positions[:bs])
        ctx = ForwardContext(meta, self.kv_caches, self.backend, cos, sin)
        return self.model.compute_logits(self.model(self.input_ids[:bs], ctx))  # [bs, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self._forward(bs)  # compile the kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, attn: AttentionMetadata, num_sampled: int) -> bool:
        return attn.max_query_len == 1 and num_sampled == attn.num_seqs and attn.num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """A decode step's inputs -> logits [B, vocab] fp32."""
        B = attn.num_seqs
        bs = next(s for s in self.sizes if s >= B)
        width = attn.block_tables.shape[1]
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slot_mapping[:B].copy_(attn.slot_mapping)
        self.slot_mapping[B:bs].fill_(-1)
        self.seq_lens[:B].copy_(attn.seq_lens)
        self.seq_lens[B:bs].fill_(1)
        self.block_tables[:B, :width].copy_(attn.block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:B]
