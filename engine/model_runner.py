"""Turns a SchedulerOutput into one forward pass over a flattened batch, then samples."""

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.cuda_graphs import CUDAGraphRunner
from engine.kv.block_manager import BlockManager
from engine.kv.pool import layer_views
from engine.logits_processors import LogitsRow, apply_logits_processing, needs_processing
from engine.models.decoder import DecoderForCausalLM
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import Sampled, SchedulerOutput
from engine.spec.verify import verify, verify_greedy
from engine.structured_output import allocate_bitmask, apply_bitmask, fill_draft_bitmasks


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flattened batch whose logits are sampled
    sample_requests: list[Request]  # one per request sampled
    num_drafts: list[int]  # per sampled request: drafted tokens verified (its rows: 1 + that many)


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_pool: torch.Tensor,
        backend: AttentionBackend,
        block_manager: BlockManager,
        device: torch.device,
        graphs: CUDAGraphRunner | None = None,
    ):
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = layer_views(kv_pool)
        self.backend = backend
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.sampler = Sampler()
        self.graphs = graphs  # decode steps replay captured graphs when set
        self._bitmask: torch.Tensor | None = None  # structured outputs' token masks, grown as needed

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        B = len(sched.scheduled)
        T = sched.num_scheduled_tokens
        tables = [self.block_manager.block_ids(r.request_id) for r, _ in sched.scheduled]
        width = max(len(t) for t in tables)
        # two host buffers, two copies to the device:
        # int64 [ids | positions | slots | sample rows], int32 [query_start_loc | seq_lens | block tables]
        num_drafts = [
            r.spec_token_ids and max(n - (r.num_tokens - r.num_computed_tokens), 0) or 0
            for r, n in sched.scheduled
        ]
        longs = np.empty(3 * T + B + sum(num_drafts), dtype=np.int64)
        ints = np.zeros(2 * B + 1 + B * width, dtype=np.int32)
        ids, positions, slots = longs[:T], longs[T : 2 * T], longs[2 * T : 3 * T]
        query_start, seq_lens = ints[: B + 1], ints[B + 1 : 2 * B + 1]
        block_tables = ints[2 * B + 1 :].reshape(B, width)
        sample_requests: list[Request] = []
        sampled_drafts: list[int] = []
        rows = 0
        t = 0
        for i, ((request, n), table) in enumerate(zip(sched.scheduled, tables, strict=True)):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            pos = np.arange(start, end)
            k = num_drafts[i]
            ids[t : t + n] = request.token_ids_with_spec(start, end) if k else request.token_ids(start, end)
            positions[t : t + n] = pos
            block_tables[i, : len(table)] = table
            slots[t : t + n] = block_tables[i, pos // bs].astype(np.int64) * bs + pos % bs
            t += n
            query_start[i + 1] = t
            seq_lens[i] = end
            if end == request.num_tokens + k:  # caught up: these rows' logits give the next token(s)
                if k:
                    longs[3 * T + rows : 3 * T + rows + k + 1] = np.arange(t - 1 - k, t)
                else:
                    longs[3 * T + rows] = t - 1
                rows += k + 1
                sample_requests.append(request)
                sampled_drafts.append(k)
        longs_dev = torch.from_numpy(longs).to(self.device)
        ints_dev = torch.from_numpy(ints).to(self.device)
        attn = AttentionMetadata(
            slot_mapping=longs_dev[2 * T : 3 * T],
            query_start_loc=ints_dev[: B + 1],
            seq_lens=ints_dev[B + 1 : 2 * B + 1],
            block_tables=ints_dev[2 * B + 1 :].view(B, width),
            max_query_len=max(n for _, n in sched.scheduled),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=query_start.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=bs,
        )
        self.backend.plan(attn, self.model.config.num_kv_heads)
        return StepInputs(
            longs_dev[:T],
            longs_dev[T : 2 * T],
            attn,
            longs_dev[3 * T : 3 * T + rows],
            sample_requests,
            sampled_drafts,
        )

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """-> hidden states [T, hidden]."""
        cos, sin = self.model.rotary.cos_sin(inputs.positions)
        ctx = ForwardContext(inputs.attn, self.kv_caches, self.backend, cos, sin)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[Sampled]:
        """One forward pass; returns once the new tokens are on the host."""
        inputs = self.prepare(sched)
        if self.graphs is not None and self.graphs.can_run(inputs.attn, len(inputs.sample_requests)):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn)  # [B, vocab]
        else:
            hidden = self.forward(inputs)
            if not inputs.sample_requests:
                return []
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [rows, vocab]
        if not any(inputs.num_drafts):
            processed = self._sampling_logits(
                logits, inputs.sample_requests, [0] * len(inputs.sample_requests)
            )
            out = self.sampler(processed, inputs.sample_requests, raw_logits=logits)
            return [
                Sampled(r, [t], [lp])
                for r, t, lp in zip(inputs.sample_requests, out.token_ids, out.logprobs, strict=True)
            ]
        return self._verify(logits, inputs)

    def _sampling_logits(
        self, raw: torch.Tensor, requests: list[Request], num_drafts: list[int]
    ) -> torch.Tensor:
        """The logits to sample from, rows laid out as the verifier's (1 + drafts per request): bias and
        penalties (the row of draft j sees drafts before j as generated), then each constrained request's
        grammar mask. `raw` stays untouched (logprobs); a batch asking for neither costs one pass."""
        logits = raw
        if any(needs_processing(r.params) for r in requests):
            rows = [
                LogitsRow(r, list(r.spec_token_ids[:j]))
                for r, k in zip(requests, num_drafts, strict=True)
                for j in range(k + 1)
            ]
            logits = apply_logits_processing(raw, rows)
        matchers = [r.grammar for r in requests]
        if all(m is None for m in matchers):
            return logits
        num_rows = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            self._bitmask = allocate_bitmask(max(num_rows, 64), logits.shape[1])
        drafts = [list(r.spec_token_ids[:k]) for r, k in zip(requests, num_drafts, strict=True)]
        masked_rows = fill_draft_bitmasks(matchers, drafts, self._bitmask).rows
        if logits is raw:
            logits = raw.clone()
        apply_bitmask(logits, self._bitmask, masked_rows)
        return logits

    def _verify(self, raw: torch.Tensor, inputs: StepInputs) -> list[Sampled]:
        """Requests without drafts are sampled in one batch; each with drafts is verified on its rows, the
        row of draft j seeing drafts before j as generated (penalties). Logprobs come from the raw logits."""
        starts = np.cumsum([0] + [k + 1 for k in inputs.num_drafts])
        logits = self._sampling_logits(raw, inputs.sample_requests, inputs.num_drafts)
        plain = [i for i, k in enumerate(inputs.num_drafts) if k == 0]
        results: list[Sampled | None] = [None] * len(inputs.sample_requests)
        if plain:
            rows = torch.tensor([int(starts[i]) for i in plain], device=logits.device)
            out = self.sampler(logits[rows], [inputs.sample_requests[i] for i in plain], raw_logits=raw[rows])
            for j, i in enumerate(plain):
                results[i] = Sampled(inputs.sample_requests[i], [out.token_ids[j]], [out.logprobs[j]])
        best = logits.argmax(dim=-1).tolist()  # one device->host copy for every greedy request's rows
        for i, k in enumerate(inputs.num_drafts):
            if k == 0:
                continue
            request = inputs.sample_requests[i]
            lo, hi = int(starts[i]), int(starts[i + 1])
            drafts = list(request.spec_token_ids[:k])
            if request.params.greedy:
                tokens, accepted = verify_greedy(best[lo:hi], drafts)
            else:
                tokens, accepted = verify(logits[lo:hi], drafts, request)
            logprobs: list[dict[int, float] | None] = [None] * len(tokens)
            if request.params.logprobs is not None:
                logprobs = self.sampler.logprobs_of(raw[lo : lo + len(tokens)], request.params, tokens)
            results[i] = Sampled(request, tokens, logprobs, k, accepted)
        return [r for r in results if r is not None]  # every request got its row
