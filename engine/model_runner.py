"""Turns a SchedulerOutput into one forward pass over a flattened batch, then samples."""

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.block_manager import BlockManager
from engine.cuda_graphs import CUDAGraphRunner
from engine.kv_cache import layer_views
from engine.request import Request
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flattened batch whose logits are sampled
    sample_requests: list[Request]  # [S]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: torch.Tensor, backend: AttentionBackend,
                 block_manager: BlockManager, device: torch.device, graphs: CUDAGraphRunner | None = None):
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = layer_views(kv_pool)
        self.backend = backend
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.sampler = Sampler()
        self.graphs = graphs  # decode steps replay captured graphs when set

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        bs = self.block_size
        for request, n in sched.scheduled:
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            table = self.block_manager.block_ids(request.request_id)
            input_ids += request.token_ids(start, end)
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            tables.append(table)
            if end == request.num_tokens:  # caught up: this row's logits give the next token
                sample_rows.append(query_start[-1] - 1)
                sample_requests.append(request)
        padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
        for row, table in zip(padded, tables, strict=True):
            row[:len(table)] = table

        def tensor(data, dtype):
            return torch.tensor(data, dtype=dtype, device=self.device)

        attn = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=torch.from_numpy(padded).to(self.device),
            max_query_len=max(n for _, n in sched.scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        self.backend.plan(attn, self.model.config.num_kv_heads)
        return StepInputs(tensor(input_ids, torch.int64), tensor(positions, torch.int64), attn,
                          tensor(sample_rows, torch.int64), sample_requests)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """-> hidden states [T, hidden]."""
        cos, sin = self.model.rotary.cos_sin(inputs.positions)
        ctx = ForwardContext(inputs.attn, self.kv_caches, self.backend, cos, sin)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Request], SamplerOutput]:
        inputs = self.prepare(sched)
        if self.graphs is not None and self.graphs.can_run(inputs.attn, len(inputs.sample_requests)):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn)  # [B, vocab]
        else:
            hidden = self.forward(inputs)
            if not inputs.sample_requests:
                return [], SamplerOutput([], [])
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [S, vocab]
        return inputs.sample_requests, self.sampler(logits, inputs.sample_requests)
