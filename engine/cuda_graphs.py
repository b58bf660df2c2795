"""CUDA graphs for the steps where every sequence computes the same few tokens: decode (one token a
sequence) and speculative verification (1 + k tokens a sequence, k drafts). Each (batch size, tokens a
sequence) shape on a ladder of batch sizes is captured once and replayed with the batch padded up to the
next captured size.

Static buffers hold the step's inputs; padded sequences have slot -1 (their K/V are not written) and a
context of their own query length, and their logits are dropped. The attention backend must read only
device tensors.
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
        max_spec_len: int = 0,
        max_verify_tokens: int = 0,
    ):
        """max_spec_len: verification graphs for 1 + k tokens a sequence, k = 1..max_spec_len, at batch
        sizes up to max_verify_tokens // (1 + k) (past that, drafting stops: engine/spec/drafter.py)."""
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        sizes = capture_sizes(max_num_seqs)
        self.sizes: dict[int, list[int]] = {1: sizes}  # tokens a sequence -> batch sizes captured
        for q in range(2, max_spec_len + 2):
            fit = [s for s in sizes if s * q <= max_verify_tokens]
            if fit:
                self.sizes[q] = fit
        n = sizes[-1]
        num_tokens = max(q * s[-1] for q, s in self.sizes.items())
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        T = bs * q
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:T],
            query_start_loc=torch.arange(0, T + 1, q, dtype=torch.int32, device=self.seq_lens.device),
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            block_size=self.block_size,
            num_kv_splits=num_kv_splits(bs, self.model.config.num_kv_heads, self.max_model_len, self.num_sms),
            uniform_query_len=q,
        )
        cos, sin = self.model.rotary.cos_sin(self.positions[:T])
        ctx = ForwardContext(meta, self.kv_caches, self.backend, cos, sin)
        return self.model.compute_logits(self.model(self.input_ids[:T], ctx))  # [T, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        shapes = sorted(
            ((bs, q) for q, sizes in self.sizes.items() for bs in sizes), key=lambda s: -s[0] * s[1]
        )
        for bs, q in shapes:  # largest first, so smaller graphs reuse its memory
            self.seq_lens[:bs].fill_(q)  # padded sequences' context: their own tokens
            self._forward(bs, q)  # compile the kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs, q] = self._forward(bs, q)
            self.graphs[bs, q] = graph
        torch.cuda.synchronize()

    def can_run(self, attn: AttentionMetadata) -> bool:
        """A step every sequence of which computes the same q tokens, q captured."""
        sizes = self.sizes.get(attn.uniform_query_len)
        return sizes is not None and attn.num_seqs <= sizes[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """A step's inputs -> logits [B * q, vocab] fp32."""
        B, q = attn.num_seqs, attn.uniform_query_len
        bs = next(s for s in self.sizes[q] if s >= B)
        T = B * q
        width = attn.block_tables.shape[1]
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.slot_mapping[:T].copy_(attn.slot_mapping)
        self.slot_mapping[T : bs * q].fill_(-1)
        self.seq_lens[:B].copy_(attn.seq_lens)
        self.seq_lens[B:bs].fill_(q)
        self.block_tables[:B, :width].copy_(attn.block_tables)
        self.graphs[bs, q].replay()
        return self.logits[bs, q][:T]
