"""Turns a SchedulerOutput into one forward pass over a flattened batch, then samples.

`launch` queues the step on the device and returns a StepFuture at once; its `result()` waits only for the
sampled tokens' copy to the host. With async scheduling the engine launches step N+1 before it reads step
N's tokens: a position whose token step N is still sampling takes it from the device (`_last_tokens`),
never through the host. Verification steps, and steps whose sampling needs the host (grammars, penalties),
finish inside `launch`.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.attention.triton_backend import MAX_DECODE_QUERY_LEN
from engine.cuda_graphs import CUDAGraphRunner, InputLayout, StaticInputs
from engine.kv.block_manager import BlockManager
from engine.kv.coded_pool import CodedKV
from engine.kv.pool import layer_views
from engine.logits_processors import LogitsRow, apply_logits_processing, needs_processing
from engine.models.decoder import DecoderForCausalLM
from engine.piecewise_graphs import PiecewiseGraphRunner
from engine.request import Request
from engine.sampler import Draws, Sampler
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
    graph_batch: int = 0  # staged in the graphs' static inputs, padded to this batch size; 0: eager


@dataclass
class StepFuture:
    """A launched step. `result()` gives each sampled request's tokens, waiting for their copy to the host
    when they are still on the way. `needs_sync`: the next step must not be scheduled before they are known
    (a grammar's mask or a penalty depends on them, or drafts were verified)."""

    sched: SchedulerOutput
    requests: list[Request]
    needs_sync: bool
    draws: Draws | None = None  # on the host once `ready` has happened
    ready: "torch.cuda.Event | None" = None
    results: list[Sampled] | None = field(default=None)

    def wait_device(self) -> None:
        """Until the device finished the step (its KV written, its tokens on the host)."""
        if self.ready is not None:
            self.ready.synchronize()

    def result(self) -> list[Sampled]:
        if self.results is None:
            assert self.draws is not None
            self.wait_device()
            out = self.draws.output()
            self.results = [
                Sampled(r, [t], [lp])
                for r, t, lp in zip(self.requests, out.token_ids, out.logprobs, strict=True)
            ]
        return self.results


class HostStaging:
    """Host buffers for a step's metadata. On a GPU they are pinned and used in turn, each refilled only
    after its last copy to the device ran, so the step's one copy per dtype is asynchronous."""

    def __init__(self, device: torch.device, depth: int = 2):
        self.device = device
        self._pinned = device.type == "cuda"
        self._slots: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(depth)]
        self._copied: list[torch.cuda.Event | None] = [None] * depth
        self._turn = 0

    def buffer(self, n: int, dtype: torch.dtype) -> np.ndarray:
        """A host array of n elements to fill (this turn's buffer of that dtype)."""
        if not self._pinned:
            return torch.zeros(n, dtype=dtype).numpy()
        event = self._copied[self._turn]
        if event is not None:
            event.synchronize()
            self._copied[self._turn] = None
        slot = self._slots[self._turn]
        buf = slot.get(dtype)
        if buf is None or buf.numel() < n:
            buf = slot[dtype] = torch.empty(
                max(n, 2 * (0 if buf is None else buf.numel()), 4096), dtype=dtype, pin_memory=True
            )
        view = buf[:n].numpy()
        view.fill(0)
        return view

    def to_device(self, *arrays: np.ndarray, into: tuple[torch.Tensor, ...] = ()) -> list[torch.Tensor]:
        """This turn's filled arrays on the device (copies queued in stream order), each into the front of
        its `into` buffer when given (no second copy), else a new tensor; the next turn begins."""
        if into:
            out = [
                dst[: len(a)].copy_(torch.from_numpy(a), non_blocking=True)
                for a, dst in zip(arrays, into, strict=True)
            ]
        else:
            out = [torch.from_numpy(a).to(self.device, non_blocking=True) for a in arrays]
        if self._pinned:
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
            self._turn = (self._turn + 1) % len(self._slots)
        return out


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        kv_pool: torch.Tensor,
        backend: AttentionBackend,
        block_manager: BlockManager,
        device: torch.device,
        graphs: CUDAGraphRunner | None = None,
        piecewise: PiecewiseGraphRunner | None = None,
        coded_kv: CodedKV | None = None,
    ):
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = layer_views(kv_pool)
        self.coded_kv = coded_kv  # KV precision by age: the low-bit pools (ids from the pool's size on)
        self.coded = coded_kv.layers() if coded_kv is not None else None
        self.backend = backend
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.device = device
        self.sampler = Sampler()
        self.graphs = graphs  # decode and verify steps replay captured graphs when set
        # steps of a captured shape are staged straight into these (the graphs' inputs)
        self.static_inputs: StaticInputs | None = graphs.inputs if graphs is not None else None
        # verify steps whose requests drafted different lengths are padded to one shape (graphs, or the
        # decode kernel); on by default where graphs replay them
        self.pad_verify_steps = graphs is not None
        self.piecewise = piecewise  # other steps (mixed, variable length) replay graphs around attention
        self._bitmask: torch.Tensor | None = None  # structured outputs' token masks, grown as needed
        self.staging = HostStaging(device)
        # the last launched step's sampled tokens on the device, and each sampled request's row in them
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """Stage the step's metadata in two host arrays (int64, int32; see InputLayout), one copy each to the
        device: into the graphs' static inputs when a captured shape runs it, else into new tensors."""
        B = len(sched.scheduled)
        tables = [self.block_manager.block_ids(r.request_id) for r, _ in sched.scheduled]
        width = max(len(t) for t in tables)
        num_drafts = [
            r.spec_token_ids and max(n - (r.num_tokens - start), 0) or 0
            for (r, n), start in zip(sched.scheduled, sched.starts, strict=True)
        ]
        num_ahead = sum(  # positions whose token the step in flight samples (filled on the device)
            start + n > r.num_tokens + k
            for (r, n), start, k in zip(sched.scheduled, sched.starts, num_drafts, strict=True)
        )
        pads = self._verify_padding(sched, num_drafts)
        T = sched.num_scheduled_tokens + sum(pads)
        R = sum(sched.samples) + sum(num_drafts)
        lens = [n + pad for (_, n), pad in zip(sched.scheduled, pads, strict=True)]
        uniform = T // B if all(n * B == T for n in lens) else 0
        static = self.static_inputs
        graph_batch = static.batch_size_for(B, uniform) if static is not None and uniform else 0
        layout = static.layout if static is not None and graph_batch else InputLayout.packed(T, B, width)
        longs = self.staging.buffer(layout.extras + R + 2 * num_ahead, torch.int64)
        ints = self.staging.buffer(layout.tables + B * layout.row, torch.int32)
        if graph_batch:  # padded sequences: no K/V written, a context of their own tokens
            longs[layout.slots + T : layout.extras] = -1
            ints[layout.seq_lens + B : layout.seq_lens + graph_batch] = uniform
        sample_requests, sampled_drafts, rows, p = self._fill(
            sched, tables, num_drafts, pads, layout, longs, ints
        )
        into = (static.longs, static.ints) if static is not None and graph_batch else ()
        longs_dev, ints_dev = self.staging.to_device(longs, ints, into=into)
        if p:
            assert self._last_tokens is not None
            ph = layout.extras + R
            ids_dev = longs_dev[layout.ids : layout.ids + T]
            ids_dev[longs_dev[ph : ph + p]] = self._last_tokens[longs_dev[ph + p : ph + 2 * p]]
        seq_lens = ints[layout.seq_lens : layout.seq_lens + B]
        query_start = ints[layout.query_start : layout.query_start + B + 1]
        attn = AttentionMetadata(
            slot_mapping=longs_dev[layout.slots : layout.slots + T],
            query_start_loc=ints_dev[layout.query_start : layout.query_start + B + 1],
            seq_lens=ints_dev[layout.seq_lens : layout.seq_lens + B],
            block_tables=ints_dev[layout.tables : layout.tables + B * layout.row].view(B, layout.row)[
                :, :width
            ],
            max_query_len=max(lens),
            uniform_query_len=uniform,
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=query_start.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            block_size=self.block_size,
            has_coded=self.block_manager.num_used_coded_blocks > 0,  # maybe not this step's: then a no-op
        )
        self.backend.plan(attn, self.model.config.num_kv_heads)
        return StepInputs(
            longs_dev[layout.ids : layout.ids + T],
            longs_dev[layout.positions : layout.positions + T],
            attn,
            longs_dev[layout.extras : layout.extras + rows],
            sample_requests,
            sampled_drafts,
            graph_batch,
        )

    def _fill(
        self,
        sched: SchedulerOutput,
        tables: list[list[int]],
        num_drafts: list[int],
        pads: list[int],
        layout: InputLayout,
        longs: np.ndarray,
        ints: np.ndarray,
    ) -> tuple[list[Request], list[int], int, int]:
        """Each request's ids, positions, slots, block table, context and sample rows into the staging
        arrays. -> (requests sampled, their drafts, sample rows, placeholders for the device to fill)."""
        bs = self.block_size
        B, T = len(sched.scheduled), sched.num_scheduled_tokens + sum(pads)
        R = sum(sched.samples) + sum(num_drafts)
        ids, positions = longs[layout.ids : layout.ids + T], longs[layout.positions : layout.positions + T]
        slots = longs[layout.slots : layout.slots + T]
        num_ahead = (len(longs) - layout.extras - R) // 2
        ph_dst, ph_src = (
            longs[layout.extras + R : layout.extras + R + num_ahead],
            longs[layout.extras + R + num_ahead :],
        )
        query_start, seq_lens = ints[layout.query_start : layout.query_start + B + 1], ints[layout.seq_lens :]
        block_tables = ints[layout.tables : layout.tables + B * layout.row].reshape(B, layout.row)
        sample_requests: list[Request] = []
        sampled_drafts: list[int] = []
        rows = t = p = 0
        for i, ((request, n), table, start) in enumerate(
            zip(sched.scheduled, tables, sched.starts, strict=True)
        ):
            end = start + n
            k = num_drafts[i]
            if pad := pads[i]:  # rows that recompute known positions' queries: no K/V written, never sampled
                ids[t : t + pad] = request.token_ids(start - pad, start)
                positions[t : t + pad] = np.arange(start - pad, start)
                slots[t : t + pad] = -1
                t += pad
            pos = np.arange(start, end)
            if (src := self._fill_ids(request, start, end, k, ids[t : t + n])) is not None:
                ph_dst[p], ph_src[p] = t + n - 1, src
                p += 1
            positions[t : t + n] = pos
            block_tables[i, : len(table)] = table
            slots[t : t + n] = block_tables[i, pos // bs].astype(np.int64) * bs + pos % bs
            t += n
            query_start[i + 1] = t
            seq_lens[i] = end
            if sched.samples[i]:  # caught up: these rows' logits give the next token(s)
                longs[layout.extras + rows : layout.extras + rows + k + 1] = np.arange(t - 1 - k, t)
                rows += k + 1
                sample_requests.append(request)
                sampled_drafts.append(k)
        return sample_requests, sampled_drafts, rows, p

    def _verify_padding(self, sched: SchedulerOutput, num_drafts: list[int]) -> list[int]:
        """Per request, rows put before its own so that every sequence of a verify step computes
        1 + (most drafts) tokens: the step gets one (batch, tokens) shape. Padding rows are the queries of
        the positions just before the request's (already in the pool), so they attend to valid context.
        All zeros unless every request is decoding its drafts and their numbers differ."""
        lens = [n for _, n in sched.scheduled]
        q = max(lens)
        if (
            not self.pad_verify_steps
            or not any(num_drafts)
            or len(set(lens)) == 1
            or q > MAX_DECODE_QUERY_LEN
            or not all(sched.samples)
            or any(n != 1 + k for n, k in zip(lens, num_drafts, strict=True))
            or any(start < q - n for start, n in zip(sched.starts, lens, strict=True))
        ):
            return [0] * len(lens)
        return [q - n for n in lens]

    def _fill_ids(self, request: Request, start: int, end: int, k: int, out: np.ndarray) -> int | None:
        """Tokens [start, end) of the request (its last k drafted) into `out`. When the last one is what the
        step in flight samples, its row in that step's tokens (the device fills it in)."""
        if k:
            out[:] = request.token_ids_with_spec(start, end)
        elif end > request.num_tokens:
            assert end == request.num_tokens + 1, (request, start, end)
            out[:-1] = request.token_ids(start, end - 1)
            return self._last_rows[request.request_id]
        else:
            out[:] = request.token_ids(start, end)
        return None

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """-> hidden states [T, hidden]."""
        if self.piecewise is not None and self.piecewise.can_run(len(inputs.input_ids)):
            return self.piecewise.run(inputs.input_ids, inputs.positions, inputs.attn)
        cos, sin = self.model.rotary.cos_sin(inputs.positions)
        ctx = ForwardContext(inputs.attn, self.kv_caches, self.backend, cos, sin, coded=self.coded)
        return self.model(inputs.input_ids, ctx)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[Sampled]:
        """One forward pass; returns once the new tokens are on the host."""
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepFuture:
        """Queue one forward pass and its sampling on the device; the tokens start copying to the host."""
        inputs = self.prepare(sched)
        requests = inputs.sample_requests
        if inputs.graph_batch and self.graphs is not None:
            logits = self.graphs.replay(inputs.attn.num_seqs, inputs.attn.uniform_query_len)  # [T, vocab]
            if len(inputs.sample_rows) != logits.shape[0]:  # padding rows, or a request not sampled yet
                logits = logits[inputs.sample_rows]
        else:
            hidden = self.forward(inputs)
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # [rows, vocab]
        if not requests:
            return StepFuture(sched, [], needs_sync=False, results=[])
        if any(inputs.num_drafts):
            self._last_tokens, self._last_rows = None, {}
            return StepFuture(sched, requests, needs_sync=True, results=self._verify(logits, inputs))
        processed = self._sampling_logits(logits, requests, [0] * len(requests))
        draws = self.sampler.sample(processed, requests, raw_logits=logits)
        self._last_tokens = draws.token_ids
        self._last_rows = {r.request_id: i for i, r in enumerate(requests)}
        ready = None
        if logits.is_cuda:
            draws = draws.to_host()
            ready = torch.cuda.Event()
            ready.record()
        needs_sync = processed is not logits  # a grammar or a penalty read the tokens so far
        return StepFuture(sched, requests, needs_sync, draws, ready)

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
