"""CUDA graphs for the steps where every sequence computes the same few tokens: decode (one token a
sequence) and speculative verification (1 + k tokens a sequence, k drafts). Each (batch size, tokens a
sequence) shape on a ladder of batch sizes is captured once and replayed with the batch padded up to the
next captured size.

Static buffers hold the step's inputs (StaticInputs): the model runner stages a step's metadata on the host
in their layout and one copy per dtype fills them in place. Padded sequences have slot -1 (their K/V are
not written) and a context of their own query length, and their logits are dropped. The attention backend
must read only device tensors.
"""

from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, AttentionMetadata, CodedLayer, ForwardContext
from engine.models.decoder import DecoderForCausalLM
from kernels.decode_attention import num_kv_splits


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


@dataclass(frozen=True)
class InputLayout:
    """Where a step's metadata sits in its two staging arrays. int64: input ids, positions and slots, then
    extras (sample rows, placeholder rows); int32: query_start_loc, seq_lens, then block tables, `row`
    entries a sequence."""

    ids: int
    positions: int
    slots: int
    extras: int
    query_start: int
    seq_lens: int
    tables: int
    row: int

    @staticmethod
    def packed(num_tokens: int, num_seqs: int, width: int) -> "InputLayout":
        T, B = num_tokens, num_seqs
        return InputLayout(0, T, 2 * T, 3 * T, 0, B + 1, 2 * B + 1, width)


class StaticInputs:
    """Input buffers at fixed addresses for captured graphs, in one InputLayout: a step of up to
    `max_tokens` tokens and `max_seqs` sequences is copied straight in from pinned staging.
    `sizes`: tokens a sequence -> the batch sizes that have a captured shape."""

    def __init__(self, sizes: dict[int, list[int]], max_blocks: int, device: torch.device):
        self.sizes = sizes
        N = self.max_tokens = max(q * s[-1] for q, s in sizes.items())
        n = self.max_seqs = max(s[-1] for s in sizes.values())
        self.layout = InputLayout(0, N, 2 * N, 3 * N, 0, n + 1, 2 * n + 1, max_blocks)
        # extras: at most one sample row a token, and two entries a sequence for placeholders
        self.longs = torch.zeros(4 * N + 2 * n, dtype=torch.int64, device=device)
        self.ints = torch.zeros(2 * n + 1 + n * max_blocks, dtype=torch.int32, device=device)
        self.input_ids = self.longs[:N]
        self.positions = self.longs[N : 2 * N]
        self.slot_mapping = self.longs[2 * N : 3 * N].fill_(-1)
        self.seq_lens = self.ints[n + 1 : 2 * n + 1].fill_(1)
        self.block_tables = self.ints[2 * n + 1 :].view(n, max_blocks)

    def batch_size_for(self, num_seqs: int, query_len: int) -> int:
        """The captured batch size a step of num_seqs sequences x query_len tokens pads to; 0: none."""
        return next((s for s in self.sizes.get(query_len, ()) if s >= num_seqs), 0)


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
        coded: list[CodedLayer] | None = None,
    ):
        """max_spec_len: verification graphs for 1 + k tokens a sequence, k = 1..max_spec_len, at batch
        sizes up to max_verify_tokens // (1 + k) (past that, drafting stops: engine/spec/drafter.py);
        coded: the low-bit blocks of a KV age policy (the graphs read both formats)."""
        self.model = model
        self.kv_caches = kv_caches
        self.coded = coded
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        sizes = capture_sizes(max_num_seqs)
        self.sizes: dict[int, list[int]] = {1: sizes}  # tokens a sequence -> batch sizes captured
        for q in range(2, max_spec_len + 2):
            fit = [s for s in sizes if s * q <= max_verify_tokens]
            if fit:
                self.sizes[q] = fit
        self.inputs = StaticInputs(self.sizes, -(-max_model_len // block_size), device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        T = bs * q
        inputs = self.inputs
        meta = AttentionMetadata(
            slot_mapping=inputs.slot_mapping[:T],
            query_start_loc=torch.arange(0, T + 1, q, dtype=torch.int32, device=inputs.seq_lens.device),
            seq_lens=inputs.seq_lens[:bs],
            block_tables=inputs.block_tables[:bs],
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            block_size=self.block_size,
            num_kv_splits=num_kv_splits(bs, self.model.config.num_kv_heads, self.max_model_len, self.num_sms),
            uniform_query_len=q,
        )
        cos, sin = self.model.rotary.cos_sin(inputs.positions[:T])
        ctx = ForwardContext(meta, self.kv_caches, self.backend, cos, sin, coded=self.coded)
        return self.model.compute_logits(self.model(inputs.input_ids[:T], ctx))  # [T, vocab]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        shapes = sorted(
            ((bs, q) for q, sizes in self.sizes.items() for bs in sizes), key=lambda s: -s[0] * s[1]
        )
        for bs, q in shapes:  # largest first, so smaller graphs reuse its memory
            self.inputs.seq_lens[:bs].fill_(q)  # padded sequences' context: their own tokens
            self._forward(bs, q)  # compile the kernels outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs, q] = self._forward(bs, q)
            self.graphs[bs, q] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def replay(self, num_seqs: int, query_len: int) -> torch.Tensor:
        """The step staged in `inputs` (padded to a captured batch size) -> logits [num_seqs * query_len,
        vocab] fp32."""
        bs = self.inputs.batch_size_for(num_seqs, query_len)
        self.graphs[bs, query_len].replay()
        return self.logits[bs, query_len][: num_seqs * query_len]
