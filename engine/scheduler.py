"""The scheduler: each step gives tokens to running requests first, then admits waiting ones; after the
step, `update_from_output` advances what was computed and appends what was sampled.

One loop serves every case: a decode is a request one token behind, a chunked prefill is a request many
tokens behind, a prefix hit starts `num_computed_tokens` above zero.

Async scheduling (vLLM v1's, SGLang's overlap scheduler) schedules step N+1 before step N's tokens reach the
host: a request's tokens scheduled in a step not yet updated count as computed (`num_inflight_tokens`), and
the token that step samples counts as a placeholder (`num_output_placeholders`) whose id the runner takes
from the device. A request is never scheduled past what it may still generate (max_tokens, the context's
end), and a request that came back from preemption or hands its KV over waits until its tokens are known.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import SchedulerConfig
from engine.document_assembly import DocumentAssembler
from engine.kv.age_policy import KVAgePolicy
from engine.kv.block_hash import update_block_hashes
from engine.kv.block_manager import Block, BlockManager
from engine.kv.offload import KVOffloader, NullOffloader
from engine.request import Request, RequestStatus
from engine.scheduling_policy import SchedulingPolicy, make_policy
from engine.stats import EngineStats


@dataclass
class SchedulerOutput:
    """What one step computes: for each request, how many of its tokens (from num_computed_tokens on)."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # per scheduled request: its first position this step
    samples: list[bool] = field(
        default_factory=list
    )  # per scheduled request: the step samples its next token
    # blocks a KV age policy moved to a coded pool: (old id, coded id), re-encoded as the scheduler moved them
    aged: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Sampled:
    """What one request got from a step: the new tokens (one, or the accepted drafts and one more)."""

    request: Request
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    num_drafts: int = 0
    num_accepted: int = 0


class StopChecker(Protocol):
    """Stop strings are found in the text (engine/output_processor.py), token by token."""

    def stop_string(self, req: Request) -> str | None: ...

    def finalize(self, req: Request, ends_here: bool) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        policy: SchedulingPolicy | None = None,
        offloader: KVOffloader | NullOffloader | None = None,
        stats: EngineStats | None = None,
        max_spec_len: int = 0,
        age_policy: KVAgePolicy | None = None,
        age_windows: dict[int, int] | None = None,
        apply_aging: Callable[[list[tuple[int, int]]], None] | None = None,
    ):
        """offloader: loads prompt blocks that lower KV tiers hold (a NullOffloader: none); stats: counters
        the update step keeps; max_spec_len: the most drafts a request's adaptive draft length reaches;
        age_policy: the bits a decoding request's blocks are held at by age (the block manager's coded pool);
        age_windows: request priority -> its own window (an SLO class's); apply_aging(moves): re-encodes aged
        blocks (the engine's CodedKV.apply), called as soon as they move, before any block they free is handed
        out again this step (to a step's compute, or to a writer outside it: a tier load, a copy from an HBM
        hit, a KV transfer). `documents`, set by the engine, assembles a new request's documents from the
        document cache when it is admitted."""
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(config.policy)
        self.offloader = offloader or NullOffloader()
        self.stats = stats or EngineStats()
        self.max_spec_len = max_spec_len
        self.age_policy = age_policy
        self.age_windows = age_windows or {}
        self.apply_aging = apply_aging or (lambda moves: None)
        self.documents: DocumentAssembler | None = None
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_lookup_blocks = 0  # full prompt blocks looked up in the prefix cache at first admission
        self.prefix_hit_blocks = 0  # ... and found there
        self.loading: dict[str, Request] = {}  # admitted, blocks allocated, waiting for a KV load
        self._abandoned: dict[str, Request] = {}  # aborted while loading: blocks freed when the load ends

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.loading or self._abandoned)

    @property
    def num_loading(self) -> int:
        return len(self.loading) + len(self._abandoned)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.num_loading:
            self._finish_loads()
        scheduled: dict[str, int] = {}  # request_id -> tokens, insertion-ordered
        aged: set[str] = set()  # decodes aged before they allocate (below)
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=self.policy.key)

        budget = self._schedule_running(out, scheduled, aged, budget)

        if not out.preempted:  # memory was short this step: admit nobody new
            budget = self._admit_waiting(out, scheduled, budget)

        by_id = {r.request_id: r for r in self.running}
        out.scheduled = [(by_id[rid], n) for rid, n in scheduled.items()]
        for request, n in out.scheduled:  # in flight until update_from_output
            start = request.scheduled_tokens
            samples = start + n >= request.total_tokens
            out.starts.append(start)
            out.samples.append(samples)
            request.num_inflight_tokens += n
            request.num_output_placeholders += samples
            if self.age_policy is not None and request.request_id not in aged:
                out.aged += self._age(request, start, n)
        return out

    def _schedule_running(
        self, out: SchedulerOutput, scheduled: dict[str, int], aged: set[str], budget: int
    ) -> int:
        """The running requests in priority order, each its next tokens while the budget lasts; memory runs
        short -> the lowest-priority request is preempted. Returns the budget left."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_output_placeholders and not self._may_run_ahead(request):
                i += 1
                continue
            num_new = min(request.total_tokens - request.scheduled_tokens, budget)
            if (
                request.spec_token_ids
            ):  # a decode with drafts: its last token and the drafts, verified at once
                ahead = request.num_output_placeholders  # drafts follow known tokens only
                if num_new == request.total_tokens - request.scheduled_tokens == 1 and not ahead:
                    del request.spec_token_ids[budget - 1 :]
                    num_new += len(request.spec_token_ids)
                else:
                    request.spec_token_ids = []
            if self.age_policy is not None and num_new > 1 and not request.spec_token_ids:
                fit = self._aging_chunk(request, num_new)
                if not fit and scheduled:
                    i += 1  # no free block for its chunk: those scheduled free some as they age
                    continue
                num_new = max(fit, 1)
            elif self.age_policy is not None and num_new == 1:
                # a decode ages first: the block leaving its window frees the 16-bit block its next token
                # may need (aging after allocating would preempt someone for it)
                out.aged += self._age(request, request.scheduled_tokens, 1)
                aged.add(request.request_id)
            while not self.block_manager.allocate_slots(request, num_new):
                if request.spec_token_ids:  # memory is short: verify no drafts rather than preempt anyone
                    num_new -= len(request.spec_token_ids)
                    request.spec_token_ids = []
                    continue
                victim = self.running[-1]  # lowest priority last
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = num_new
                budget -= num_new
                i += 1
        return budget

    def _aging_chunk(self, request: Request, num_new: int, hits: Sequence[Block] = ()) -> int:
        """A prefill chunk under an age policy: no more than the free blocks take (aging frees more by the next
        step); 0 when none is free (callers take at least 1 token, so the last request standing progresses)."""
        return min(num_new, self.block_manager.fitting_tokens(request, hits))

    def _coded_ok(self, request: Request) -> list[range]:
        """Prompt blocks a prefix hit may serve from coded copies: those the age policy holds coded at the
        prompt's length (so the request reads them at the bits it would anyway)."""
        if self.age_policy is None:
            return []
        window = self.age_windows.get(request.priority)
        return self.age_policy.coded_ranges(request.num_tokens, self.block_manager.block_size, window)

    def _age(self, request: Request, start: int, n: int) -> list[tuple[int, int]]:
        """The blocks the age policy holds coded at this step's context length (start + n), among those
        earlier steps computed (a prefill chunk's own blocks age later). A chunk reads its context at the
        bits its last position would."""
        assert self.age_policy is not None
        bs = self.block_manager.block_size
        ranges = self.age_policy.coded_ranges(start + n, bs, self.age_windows.get(request.priority))
        moves = self.block_manager.age(request, [range(r.start, min(r.stop, start // bs)) for r in ranges])
        if moves:
            self.apply_aging(moves)
        self.stats.kv_blocks_aged += len(moves)
        return moves

    def _may_run_ahead(self, request: Request) -> bool:
        """Whether a request whose last step is still in flight may be scheduled again now: not when the
        token in flight may be its last, nor when its KV is handed over when it finishes."""
        ahead = request.num_output_placeholders
        max_tokens = request.params.max_tokens
        if max_tokens is not None and request.num_output_tokens + ahead >= max_tokens:
            return False
        return request.num_tokens + ahead < self.max_model_len and not request.hold_kv

    def _admit_waiting(self, out: SchedulerOutput, scheduled: dict[str, int], budget: int) -> int:
        self.waiting.sort(key=self.policy.key)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if request.num_inflight_tokens:  # preempted while its last step ran: back once that is known
                break
            if len(self.running) >= self.config.max_num_seqs:  # full: only a lower class may make room
                victim = self._victim_for(request)
                if victim is None:
                    break
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim, out)
            handed_over = request.num_computed_tokens > 0  # KV from another worker already fills its blocks
            if not handed_over and not self._base_pool_holds(request):
                break
            hits, num_hit_tokens = self._prefix_hits(request, handed_over)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.age_policy is not None and num_new > 1:
                num_new = max(self._aging_chunk(request, num_new, hits), 1)
            # documents to assemble: blocks for the whole prompt now (the assembly fills them past this chunk)
            assembles = self._assembles(request, handed_over, num_hit_tokens)
            while not self.block_manager.allocate_slots(
                request, request.num_tokens - num_hit_tokens if assembles else num_new, hits
            ):
                victim = self._victim_for(request)
                if victim is None:
                    return budget
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim, out)
                num_new = min(request.num_tokens - num_hit_tokens, budget)
            self.waiting.pop(0)
            if request.scheduled_wall is None:
                request.scheduled_wall = time.time()
            if assembles:
                num_hit_tokens, num_new = self._assemble(request, num_hit_tokens, budget)
            elif not handed_over:
                loaded = self._load_lower_tiers(request, len(hits), num_new)
                if loaded is None:  # a load runs; the request joins `running` when it is done
                    request.num_computed_tokens = num_hit_tokens
                    request.status = RequestStatus.LOADING_KV
                    self.loading[request.request_id] = request
                    continue
                num_hit_tokens, num_new = num_hit_tokens + loaded, num_new - loaded
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new
        return budget

    def _assembles(self, request: Request, handed_over: bool, num_hit_tokens: int) -> bool:
        """Whether a request being admitted has documents to assemble past its prefix hits."""
        return (
            self.documents is not None
            and not handed_over
            and bool(request.documents)
            and request.documents[-1].end > num_hit_tokens
        )

    def _assemble(self, request: Request, num_hit_tokens: int, budget: int) -> tuple[int, int]:
        """Documents from the document cache after the prefix hits. -> (tokens whose KV is now in place, tokens
        this step computes)."""
        assert self.documents is not None
        first = request.num_cached_tokens < 0  # a preempted request coming back counts its reuse once
        if first:
            request.num_cached_tokens = num_hit_tokens
        cached = request.num_cached_tokens
        ready = self.documents.assemble(request, num_hit_tokens)
        if not first:
            request.num_cached_tokens = cached
        return ready, min(request.num_tokens - ready, budget)

    def _prefix_hits(self, request: Request, handed_over: bool) -> tuple[list[Block], int]:
        """(cached blocks, tokens computed) a request starts from: its prefix hits, or the tokens another
        worker's KV handed over."""
        if handed_over:
            return [], request.num_computed_tokens
        hits, num_hit_tokens = self.block_manager.get_computed_blocks(request, self._coded_ok(request))
        if request.num_cached_tokens < 0:  # first admission (not a preempted request coming back)
            self.prefix_lookup_blocks += (request.num_tokens - 1) // self.block_manager.block_size
            self.prefix_hit_blocks += len(hits)
        return hits, num_hit_tokens

    def _base_pool_holds(self, request: Request) -> bool:
        """Under an age policy, a new request is admitted only while the 16-bit pool holds what every running
        request keeps there at its last token (sinks, window, the open block) beside its own: its prompt then
        ages through its chunks, and a decode never waits for a 16-bit block another prompt took (that
        preempted requests in storms). The first request is always admitted."""
        if self.age_policy is None or not self.running:
            return True
        need = sum(self._base_footprint(r) for r in (*self.running, request))
        return need <= self.block_manager.num_blocks

    def _base_footprint(self, request: Request) -> int:
        """16-bit blocks a request holds at its last token under the age policy (+1: a block opening)."""
        assert self.age_policy is not None
        bs = self.block_manager.block_size
        max_tokens = request.params.max_tokens or self.max_model_len
        end = min(request.num_prompt_tokens + max_tokens, self.max_model_len)
        coded = self.age_policy.coded_ranges(end, bs, self.age_windows.get(request.priority))[0]
        return -(-end // bs) - len(coded) + 1

    def _victim_for(self, request: Request) -> Request | None:
        """The running request the policy would preempt last-in-line for `request`, if any."""
        victims = [r for r in self.running if self.policy.may_preempt_for(request, r)]
        return max(victims, key=self.policy.key, default=None)

    def _load_lower_tiers(self, request: Request, first_block: int, num_new: int) -> int | None:
        """Tokens ready now in the request's fresh blocks after its HBM hits (whole blocks; the last
        token and at least one scheduled token are always computed), or None while a load runs."""
        bs = self.block_manager.block_size
        max_blocks = min((request.num_tokens - 1) // bs - first_block, (num_new - 1) // bs)
        if max_blocks <= 0:
            return 0
        block_ids = self.block_manager.block_ids(request.request_id)
        ready = self.offloader.start_load(
            request,
            first_block,
            block_ids,
            max_blocks,
            bs,
            self.block_manager.cached_block_id,
            self._coded_ok(request),  # blocks its policy holds coded may come back from a coded tier
            self.block_manager.take_coded,
        )
        return None if ready is None else ready * bs

    def _finish_loads(self) -> None:
        """Requests whose KV load finished start running, from the last block that arrived."""
        for loaded in self.offloader.take_finished():
            request = loaded.request
            if self._abandoned.pop(request.request_id, None) is not None:
                self.block_manager.free(request)  # aborted meanwhile: nobody writes the blocks any more
                self.block_manager.release_coded([c for _, c in loaded.coded] + loaded.unused)
                continue
            del self.loading[request.request_id]
            self.block_manager.adopt_coded(request, loaded.coded)
            self.block_manager.release_coded(loaded.unused)
            request.num_computed_tokens += loaded.blocks * self.block_manager.block_size
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Recompute-style preemption: free the blocks, keep the tokens, start over later."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)
        out.preempted.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and release its blocks (finish or abort). A request that hands
        its KV to another worker (`hold_kv`) keeps its blocks when it finishes normally."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif self.loading.pop(request.request_id, None) is not None:
            self._abandoned[request.request_id] = request  # the loader still writes its blocks
            return
        if not (request.hold_kv and status != RequestStatus.FINISHED_ABORTED):
            self.block_manager.free(request)

    # -- after the step ---------------------------------------------------------------------------

    def update_from_output(
        self, sched: SchedulerOutput, sampled: list[Sampled], stops: StopChecker
    ) -> list[tuple[Request, int, int]]:
        """Advance what the step computed, then append what it sampled (accepting verified drafts and
        finishing requests at a stop token, a stop string, max_tokens or the context's end). Returns
        (request, prompt tokens, decode tokens) computed: what the step's time is charged by."""
        split = self._advance(sched)
        for s in sampled:
            self._append_sampled(s, stops)
        return split

    def _advance(self, sched: SchedulerOutput) -> list[tuple[Request, int, int]]:
        self.stats.steps += 1
        split = []
        for (req, n), start in zip(sched.scheduled, sched.starts, strict=True):
            req.num_inflight_tokens -= n
            prompt = min(n, max(req.num_prompt_tokens - start, 0))
            split.append((req, prompt, n - prompt))
            self.stats.prompt_tokens_computed += prompt
            self.stats.scheduled_tokens += n
            if req.status is not RequestStatus.RUNNING:  # preempted or finished while the step ran
                continue
            # drafted positions count once verified (_append_sampled): only real tokens are computed here
            req.num_computed_tokens += min(n, req.num_tokens - req.num_computed_tokens)
            self.block_manager.cache_full_blocks(req)
        return split

    def _append_sampled(self, s: Sampled, stops: StopChecker) -> None:
        """One request's new tokens; accepted drafts' KV (written this step) becomes valid."""
        req = s.request
        req.num_output_placeholders -= 1
        if req.is_finished:  # stopped or aborted while this step ran ahead: its tokens are dropped
            return
        self.stats.sample_events += 1
        if s.num_drafts:
            self._adapt_draft_length(req, s.num_drafts, s.num_accepted)
        for i, (token, logprobs) in enumerate(zip(s.token_ids, s.logprobs, strict=True)):
            self._append_token(req, token, logprobs, stops)
            if req.is_finished:
                return
            if i < s.num_accepted:  # this token was a draft: its KV is in place
                req.num_computed_tokens += 1
        if s.num_accepted:
            self.block_manager.cache_full_blocks(req)

    def _adapt_draft_length(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """Longer after a full acceptance, shorter when most drafts fail."""
        self.stats.spec_verifications += 1
        self.stats.spec_draft_tokens += num_drafts
        self.stats.spec_accepted_tokens += num_accepted
        req.spec_token_ids = []
        if num_accepted == num_drafts:
            req.spec_len = min(req.spec_len + 1, self.max_spec_len)
        elif 2 * num_accepted < num_drafts:
            req.spec_len = max(req.spec_len - 1, 1)

    def _append_token(
        self, req: Request, token: int, logprobs: dict[int, float] | None, stops: StopChecker
    ) -> None:
        params = req.params
        req.output_token_ids.append(token)
        self.stats.generated_tokens += 1
        update_block_hashes(req, self.block_manager.block_size)
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token]
        ends_here = token in params.stop_token_ids or (token in req.eos_token_ids and not params.ignore_eos)
        if req.grammar is not None:  # the sampler's mask allowed it; a stop token completes the grammar
            req.grammar.accept_token(token)
            ends_here = ends_here or req.grammar.is_terminated()
        status = None
        if ends_here:
            status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in params.stop_token_ids else None
        elif (stop := stops.stop_string(req)) is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        elif (
            params.max_tokens is not None and req.num_output_tokens >= params.max_tokens
        ) or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            stops.finalize(req, ends_here)
            self.finish(req, status)
