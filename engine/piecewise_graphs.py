"""Piecewise CUDA graphs for steps of any shape: packed variable-length batches that mix prefill chunks and
decodes, without padding any sequence (vLLM's piecewise graphs, by hand).

Everything but attention is captured, per bucket of the step's token count: piece 0 is the embedding and
layer 0 up to attention (projections, norms, rotary, K/V written); piece l is the rest of layer l - 1 and
layer l up to attention; the last piece is the rest of the last layer and the final norm. Attention runs
between the pieces, eagerly, with the step's own varlen metadata: it is the one part whose work depends
on how the tokens are split into sequences. The batch's tokens fill the first rows of static buffers;
padded rows have slot -1 (no K/V written), position 0, and their outputs are never read. Only the tokens
themselves are padded (up to the bucket), never a sequence.

Without capture (the CPU) the pieces run eagerly through the same buffers: the layout is tested there.
"""

from collections.abc import Callable

import torch

from engine.attention import AttentionBackend, AttentionMetadata, CodedLayer, ForwardContext
from engine.models.decoder import DecoderForCausalLM, DecoderLayer


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts captured: powers of two to 256, then every 256 (at most 255 padded rows)."""
    buckets = [b for b in (8, 16, 32, 64, 128, 256) if b < max_tokens]
    buckets += list(range(512, max_tokens, 256))
    return buckets + [max_tokens]


class PiecewiseGraphRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        max_tokens: int,
        device: torch.device,
        coded: list[CodedLayer] | None = None,
    ):
        cfg = model.config
        self.coded = coded  # the low-bit blocks of a KV age policy (attention runs between the pieces)
        self.model = model
        self.layers: list[DecoderLayer] = [
            layer for layer in model.model.layers if isinstance(layer, DecoderLayer)
        ]
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.buckets = token_buckets(max_tokens)
        self.device = device
        n, dtype = self.buckets[-1], model.model.embed_tokens.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        # between the pieces: q of the layer about to attend, its output, the residual stream
        self.q = torch.zeros((n, cfg.num_heads, cfg.head_dim), dtype=dtype, device=device)
        self.o = torch.zeros((n, cfg.num_heads, cfg.head_dim), dtype=dtype, device=device)
        self.residual = torch.zeros((n, cfg.hidden_size), dtype=dtype, device=device)
        self.hidden = torch.zeros((n, cfg.hidden_size), dtype=dtype, device=device)
        self.cos = torch.zeros((n, cfg.head_dim), dtype=torch.float32, device=device)
        self.sin = torch.zeros((n, cfg.head_dim), dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _ctx(self, T: int) -> ForwardContext:
        """What the pieces read: only the slots (K/V writes) and rotary tables of the padded batch."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:T],
            query_start_loc=self.slot_mapping[:0],
            seq_lens=self.slot_mapping[:0],
            block_tables=self.slot_mapping[:0],
            max_query_len=T,
            max_seq_len=T,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            block_size=self.block_size,
        )
        return ForwardContext(meta, self.kv_caches, self.backend, self.cos[:T], self.sin[:T])

    def _piece(self, i: int, T: int) -> Callable[[], None]:
        """Piece i of a T-token batch: reads and writes only the static buffers."""
        layers = self.layers
        ctx = self._ctx(T)

        def first() -> None:
            cos, sin = self.model.rotary.cos_sin(self.positions[:T])
            self.cos[:T].copy_(cos)
            self.sin[:T].copy_(sin)
            q, residual = layers[0].before_attention(
                self.model.model.embed_tokens(self.input_ids[:T]), None, ctx
            )
            self.q[:T].copy_(q)
            self.residual[:T].copy_(residual)

        def middle() -> None:
            x, residual = layers[i - 1].after_attention(self.o[:T], self.residual[:T])
            q, residual = layers[i].before_attention(x, residual, ctx)
            self.q[:T].copy_(q)
            self.residual[:T].copy_(residual)

        def last() -> None:
            x, residual = layers[i - 1].after_attention(self.o[:T], self.residual[:T])
            x, _ = self.model.model.norm(x, residual)
            self.hidden[:T].copy_(x)

        return first if i == 0 else last if i == len(layers) else middle

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for T in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            for i in range(len(self.layers) + 1):
                piece = self._piece(i, T)
                piece()  # compile the kernels outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    piece()
                self.graphs[T, i] = graph
        torch.cuda.synchronize()

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """A step's inputs -> hidden states [T, hidden] (a view of the static buffer, valid until the next
        step)."""
        T = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= T)
        self.input_ids[:T].copy_(input_ids)
        self.positions[:T].copy_(positions)
        self.positions[T:bucket].fill_(0)
        self.slot_mapping[:T].copy_(attn.slot_mapping)
        self.slot_mapping[T:bucket].fill_(-1)
        ctx = ForwardContext(attn, self.kv_caches, self.backend, self.cos[:T], self.sin[:T], coded=self.coded)
        layers = self.layers
        for i in range(len(layers) + 1):
            graph = self.graphs.get((bucket, i))
            if graph is not None:
                graph.replay()
            else:  # not captured (the CPU): the same piece, eagerly
                self._piece(i, bucket)()
            if i < len(layers):
                self.o[:T].copy_(layers[i].self_attn.attend(self.q[:T], ctx))
        return self.hidden[:T]
