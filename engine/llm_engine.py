"""LLMEngine: add_request / abort_request / step() = schedule -> execute -> update."""

import time
from dataclasses import dataclass, field, fields

import torch

from engine import envs
from engine.attention import get_backend
from engine.attention.backend import default_backend
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cuda_graphs import CUDAGraphRunner
from engine.detokenizer import IncrementalDetokenizer
from engine.kv.block_hash import hash_extra, update_block_hashes
from engine.kv.block_manager import BlockManager
from engine.kv.events import KVEventLog
from engine.kv.offload import KVOffloader, KVStore
from engine.kv.pool import allocate_kv_pool, layer_views, num_blocks_for
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, ComputeUsage, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec.drafter import make_drafter
from engine.tokenizer import Tokenizer


@dataclass
class EngineStats:
    steps: int = 0
    scheduled_tokens: int = 0  # tokens whose KV was computed, over all steps
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    busy_seconds: float = 0.0  # wall time of the steps that computed tokens (split over their requests)
    spec_verifications: int = 0  # (request, step) pairs that verified drafts
    spec_draft_tokens: int = 0  # drafted tokens verified
    spec_accepted_tokens: int = 0  # ... and accepted
    sample_events: int = 0  # (request, step) pairs that produced tokens: generated = events + accepted drafts
    requests_by_priority: dict = field(default_factory=dict)  # priority -> requests added


def check_prompt_ids(prompt_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """ValueError for an empty prompt, token ids outside the vocabulary, or no room to generate."""
    if not prompt_ids:
        raise ValueError("prompt: must not be empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise ValueError(f"prompt: token ids must be integers in [0, {vocab_size})")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(
            f"prompt: {len(prompt_ids)} tokens, but the context holds {max_model_len} "
            f"(max_model_len) including at least one generated token"
        )


def engine_config(model: str, **kwargs) -> EngineConfig:
    """Route flat keyword arguments to EngineConfig, CacheConfig and SchedulerConfig fields."""
    groups = {name: {} for name in ("engine", "cache", "scheduler")}
    aliases = {"scheduling_policy": ("scheduler", "policy")}
    owners = {f.name: "engine" for f in fields(EngineConfig)}
    owners |= {f.name: "cache" for f in fields(CacheConfig)}
    owners |= {f.name: "scheduler" for f in fields(SchedulerConfig)}
    for key, value in kwargs.items():
        group, name = aliases.get(key, (owners.get(key), key))
        if group is None or key in ("model", "cache", "scheduler", "policy"):
            raise ValueError(f"{key}: not an engine option")
        groups[group][name] = value
    return EngineConfig(
        model=model,
        cache=CacheConfig(**groups["cache"]),
        scheduler=SchedulerConfig(**groups["scheduler"]),
        **groups["engine"],
    )


@dataclass(frozen=True)
class KVReservation:
    block_ids: list[int]  # the request's block table for the arriving KV
    num_cached_blocks: int  # leading blocks already holding it (local prefix-cache hits)


class _Parent:
    """A user request: n sequences sharing one prompt."""

    def __init__(
        self, request_id: str, prompt: str | None, children: list[Request], tokenizer: Tokenizer, stream: bool
    ):
        self.request_id = request_id
        self.stream = stream  # outputs every step; otherwise only when finished
        self.prompt = prompt
        self.children = children
        self.detokenizers = {r.request_id: IncrementalDetokenizer(tokenizer, r) for r in children}

    def output(self) -> RequestOutput:
        outs = []
        for i, req in enumerate(self.children):
            detok = self.detokenizers[req.request_id]
            want = req.params.logprobs is not None
            outs.append(
                CompletionOutput(
                    index=i,
                    text=detok.output_text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=req.cumulative_logprob if want else None,
                    logprobs=list(req.logprobs) if want else None,
                    finish_reason=req.status.value if req.is_finished else None,
                    stop_reason=req.stop_reason,
                )
            )
        first = self.children[0]
        return RequestOutput(
            self.request_id,
            self.prompt,
            first.prompt_token_ids,
            outs,
            finished=all(r.is_finished for r in self.children),
            num_cached_tokens=max(first.num_cached_tokens, 0),
            compute=sum((r.compute for r in self.children), ComputeUsage()),
            draft_compute=sum((r.draft_compute for r in self.children), ComputeUsage()),
            queued=(first.arrival_wall, first.scheduled_wall) if first.scheduled_wall else None,
        )


class LLMEngine:
    def __init__(self, config: EngineConfig, kv_store: KVStore | None = None):
        """`kv_store`: a tier below HBM (engine/kv/offload.py) that keeps evicted prefix blocks."""
        self.config = config
        self.device = torch.device(
            config.device or envs.default_device() or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        torch.manual_seed(config.seed)
        loaded = load_model(config.model, config.dtype, self.device, config.load_format)
        self.model, self.model_config, self.dtype = loaded.model, loaded.config, loaded.dtype
        self.fingerprint = loaded.fingerprint
        self.tokenizer = Tokenizer(config.model)
        self.max_model_len = self._max_model_len()
        cache = config.cache
        self.drafter = (
            self._make_drafter()
        )  # before the KV pool: a draft model's memory comes out of its budget
        num_blocks = num_blocks_for(cache, self.model_config, self.dtype, self.device)
        self.kv_pool = allocate_kv_pool(
            num_blocks, self.model_config, cache.block_size, self.dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.kv_events = KVEventLog()  # drained by the worker that owns this engine
        self.block_manager.events = self.kv_events
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len)
        self.offloader = None
        if kv_store is not None:
            self.attach_kv_store(kv_store)
        backend = get_backend(config.attention_backend or default_backend(self.device.type))
        graphs = None
        if self.device.type == "cuda" and backend.name == "triton" and not config.enforce_eager:
            graphs = CUDAGraphRunner(
                self.model,
                layer_views(self.kv_pool),
                backend,
                cache.block_size,
                config.scheduler.max_num_seqs,
                self.max_model_len,
                self.device,
            )
            graphs.capture()
        self.runner = ModelRunner(self.model, self.kv_pool, backend, self.block_manager, self.device, graphs)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.stats = EngineStats()
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, _Parent] = {}
        self._aborted: list[_Parent] = []

    def _make_drafter(self):
        config = self.config
        method = config.speculative_method or ("draft_model" if config.speculative_model else None)
        if method is None:
            return None
        if config.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens: got {config.num_speculative_tokens}, allowed >= 1")
        if method == "draft_model":
            if not config.speculative_model:
                raise ValueError(
                    "speculative_model: needed by speculative_method draft_model (a draft checkpoint)"
                )
            from engine.spec.draft_model import DraftModelDrafter

            block_size, seqs = config.cache.block_size, config.scheduler.max_num_seqs
            return DraftModelDrafter(
                config.speculative_model,
                vocab_size=self.model_config.vocab_size,
                device=str(self.device),
                max_num_seqs=seqs,
                block_size=block_size,
                num_blocks=DraftModelDrafter.blocks_for(self.max_model_len, seqs, block_size),
                enforce_eager=config.enforce_eager,
                seed=config.seed,
            )
        if config.speculative_model:
            raise ValueError(f"speculative_model: only with speculative_method draft_model, not {method!r}")
        return make_drafter(method, ngram_min=config.spec_ngram_min, ngram_max=config.spec_ngram_max)

    def attach_drafter(self, drafter) -> None:
        """Speculative decoding with `drafter` (engine/spec/drafter.py:Drafter), e.g. a remote draft-model pool."""
        if self.config.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens: got {self.config.num_speculative_tokens}, allowed >= 1"
            )
        if self.drafter is not None:
            self.drafter.close()
        self.drafter = drafter

    def attach_kv_store(self, store: KVStore) -> None:
        """Keep evicted prefix blocks in `store` and load prompt blocks from it (needs prefix caching)."""
        if not self.config.cache.enable_prefix_caching:
            raise ValueError("kv_store: needs enable_prefix_caching (blocks are found by their hashes)")
        self.detach_kv_store()
        cached = self.block_manager.cached
        store.events = self.kv_events  # lower tiers report into the same log
        self.offloader = KVOffloader(
            store, self.kv_pool, lambda h: cached[h].block_id if h in cached else None
        )
        self.block_manager.on_evict = self.offloader.on_evict
        self.block_manager.on_cached = self.offloader.on_cached
        self.scheduler.offloader = self.offloader

    def detach_kv_store(self) -> KVStore | None:
        """Stop offloading and loading (no load may be in flight); returns the store that was attached."""
        if self.offloader is None:
            return None
        if self.scheduler.num_loading:
            raise RuntimeError("detach_kv_store: KV loads are in flight")
        self.offloader.close()
        store, self.offloader = self.offloader.store, None
        self.block_manager.on_evict = None
        self.block_manager.on_cached = None
        self.scheduler.offloader = None
        return store

    @classmethod
    def from_pretrained(cls, model: str, kv_store: KVStore | None = None, **kwargs) -> "LLMEngine":
        return cls(engine_config(str(model), **kwargs), kv_store)

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if not 1 <= wanted <= limit:
            raise ValueError(f"max_model_len: got {wanted}, allowed 1..{limit} (max_position_embeddings)")
        return wanted

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        preemptible: bool = True,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
        output_token_ids: list[int] | None = None,
        kv_computed_tokens: int = 0,
        hold_kv: bool = False,
    ) -> None:
        """Queue a request. `stream=False`: step() reports it only when finished, and its text is decoded
        once at the end unless stop strings need it earlier (what LLM.generate uses).

        Disaggregated serving: `output_token_ids` resumes a request whose first outputs came from another
        worker; `kv_computed_tokens` says the blocks reserved with `reserve_kv` already hold that many
        tokens' KV; `hold_kv` keeps the blocks after the request finishes until `release_kv`.
        """
        params = params or SamplingParams()
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if not prompt:
            raise ValueError("prompt: must not be empty")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        resumed = list(output_token_ids or [])
        self._validate_prompt(prompt_ids + resumed, params)
        if (resumed or hold_kv) and params.n != 1:
            raise ValueError("n: resuming a request or holding its KV needs n == 1")
        if params.max_tokens is not None and len(resumed) >= params.max_tokens:
            raise ValueError(f"output_token_ids: {len(resumed)} tokens already reach max_tokens")
        self._check_reserved(request_id, kv_computed_tokens, len(prompt_ids) + len(resumed))
        extra = hash_extra(self.fingerprint, str(self.dtype), cache_salt)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(
                child_id,
                prompt_ids,
                params,
                eos_token_ids=self.eos_token_ids,
                priority=priority,
                preemptible=preemptible,
                hash_extra=extra,
                arrival_time=arrival_time,
                seed_offset=i,
                hold_kv=hold_kv,
            )
            if resumed:
                req.resume(resumed, self.model_config.vocab_size)
            if kv_computed_tokens:
                req.num_computed_tokens, req.num_cached_tokens = kv_computed_tokens, 0
            update_block_hashes(req, self.block_manager.block_size)
            children.append(req)
        self.stats.requests_by_priority[priority] = self.stats.requests_by_priority.get(priority, 0) + 1
        parent = _Parent(request_id, text, children, self.tokenizer, stream)
        if resumed:  # the resumed tokens' text is part of the output, as if generated here
            parent.detokenizers[request_id].update(skip_last=False)
        self._parents[request_id] = parent
        for req in children:
            self._child_to_parent[req.request_id] = parent
            self.scheduler.add_request(req)

    def _check_reserved(self, request_id: str, kv_tokens: int, num_tokens: int) -> None:
        if not kv_tokens:
            return
        if not 0 < kv_tokens < num_tokens:
            raise ValueError(f"kv_computed_tokens: got {kv_tokens}, allowed 1..{num_tokens - 1}")
        have = len(self.block_manager.block_ids(request_id)) * self.block_manager.block_size
        if kv_tokens > have:
            raise ValueError(
                f"kv_computed_tokens: {kv_tokens} tokens but only {have} slots reserved "
                f"for {request_id!r} (reserve_kv first)"
            )

    # -- KV handoff between workers ---------------------------------------------------------------

    def reserve_kv(
        self,
        request_id: str,
        num_tokens: int,
        token_ids: list[int] | None = None,
        cache_salt: str | None = None,
    ) -> KVReservation | None:
        """Blocks for `num_tokens` tokens of KV that another worker will write; None when memory is short.

        Given the tokens, full blocks already in this engine's prefix cache are reused: only the blocks
        after `num_cached_blocks` need to be filled.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens: got {num_tokens}, allowed >= 1")
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        hits = []
        if token_ids is not None:
            probe = Request(
                request_id,
                token_ids[:num_tokens],
                SamplingParams(),
                hash_extra=hash_extra(self.fingerprint, str(self.dtype), cache_salt),
            )
            update_block_hashes(probe, self.block_manager.block_size)
            hits = self.block_manager.cached_prefix(probe.block_hashes)
        block_ids = self.block_manager.allocate_blocks(
            request_id, -(-num_tokens // self.block_manager.block_size), hits
        )
        return None if block_ids is None else KVReservation(block_ids, len(hits))

    def free_reserved(self, request_id: str) -> None:
        """Give back blocks from `reserve_kv` that no request adopted (the transfer failed)."""
        if request_id not in self._parents:
            self.block_manager.free_blocks(request_id)

    def held_kv(self, request_id: str) -> list[int]:
        """The block table of a finished `hold_kv` request (its KV stays until `release_kv`)."""
        return list(self.block_manager.block_ids(request_id))

    def release_kv(self, request_id: str) -> None:
        if request_id not in self._parents:  # still running: its own finish will free the blocks
            self.block_manager.free_blocks(request_id)

    def _validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt_ids(prompt_ids, self.model_config.vocab_size, self.max_model_len)
        max_len = min(self.max_model_len, len(prompt_ids) + (params.max_tokens or self.max_model_len))
        need = -(-max_len // self.block_manager.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt: with max_tokens it needs {need} KV blocks, the pool has "
                f"{self.block_manager.num_blocks}"
            )

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for req in parent.children:
            if not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(parent)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._aborted)

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass. Returns an output for every user request that changed."""
        start = time.perf_counter()
        touched: dict[str, _Parent] = {p.request_id: p for p in self._aborted}
        self._aborted.clear()
        sched = self.scheduler.schedule()
        if sched.is_empty and self.scheduler.num_loading:
            self.offloader.wait(0.005)  # only KV loads are in flight: do not spin
        if not sched.is_empty:
            run_start = time.perf_counter()
            sampled = self.runner.execute(sched)  # returns once the new tokens are on the host
            seconds = time.perf_counter() - run_start
            split = self._record(sched)
            if self.offloader is not None:
                self.offloader.observe_prefill(sum(p for _, p, _ in split), seconds)  # what recomputing costs
                self.offloader.write_through()  # this step's new cached blocks start copying down
            for s in sampled:
                self._append_sampled(s)
                parent = self._child_to_parent[s.request.request_id]
                touched[parent.request_id] = parent
            if self.drafter is not None:
                self._draft()
            self._account(split, time.perf_counter() - start)
        outputs = []
        for parent in touched.values():
            if not parent.stream and not all(r.is_finished for r in parent.children):
                continue
            output = parent.output()
            if output.finished:
                self._release(parent)
            outputs.append(output)
        return outputs

    def _record(self, sched: SchedulerOutput) -> list[tuple[Request, int, int]]:
        """Advance the scheduled requests; returns (request, prompt tokens, decode tokens) computed."""
        self.stats.steps += 1
        split = []
        for req, n in sched.scheduled:
            prompt = min(n, max(req.num_prompt_tokens - req.num_computed_tokens, 0))
            split.append((req, prompt, n - prompt))
            self.stats.prompt_tokens_computed += prompt
            self.stats.scheduled_tokens += n
            # drafted positions count once verified (_append_sampled): only real tokens are computed here
            req.num_computed_tokens += min(n, req.num_tokens - req.num_computed_tokens)
            self.block_manager.cache_full_blocks(req)
        return split

    def _append_sampled(self, s) -> None:
        """The step's new tokens for one request; accepted drafts' KV (written this step) becomes valid."""
        req = s.request
        self.stats.sample_events += 1
        if s.num_drafts:
            self.stats.spec_verifications += 1
            self.stats.spec_draft_tokens += s.num_drafts
            self.stats.spec_accepted_tokens += s.num_accepted
            req.spec_token_ids = []
            # adaptive draft length: longer after a full acceptance, shorter when most drafts fail
            if s.num_accepted == s.num_drafts:
                req.spec_len = min(req.spec_len + 1, self.config.num_speculative_tokens)
            elif 2 * s.num_accepted < s.num_drafts:
                req.spec_len = max(req.spec_len - 1, 1)
        for i, (token, logprobs) in enumerate(zip(s.token_ids, s.logprobs, strict=True)):
            self._append_token(req, token, logprobs)
            if req.is_finished:
                return
            if i < s.num_accepted:  # this token was a draft: its KV is in place
                req.num_computed_tokens += 1
        if s.num_accepted:
            self.block_manager.cache_full_blocks(req)

    def _draft(self) -> None:
        """Drafts for the next step of every running request that is decoding (one token behind), unless
        the batch is past the point where verifying drafts costs as much as the tokens it saves."""
        decoding = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        k_max = self.config.num_speculative_tokens
        if len(decoding) * (k_max + 1) > self.config.spec_max_batch_tokens:
            for req in decoding:
                req.spec_token_ids = []
            return
        wanted = []
        for req in decoding:
            if req.spec_len == 0:
                req.spec_len = k_max
            room = min(req.spec_len, self.max_model_len - req.num_tokens - 1)
            if req.params.max_tokens is not None:  # the step emits the accepted drafts and one more
                room = min(room, req.params.max_tokens - req.num_output_tokens - 1)
            wanted.append(max(room, 0))
        for req, drafts in zip(decoding, self.drafter.propose_batch(decoding, wanted), strict=True):
            req.spec_token_ids = drafts

    def _account(self, split: list[tuple[Request, int, int]], seconds: float) -> None:
        """The step's wall time (schedule to last token appended), split evenly over its tokens."""
        per_token = seconds / sum(p + d for _, p, d in split)
        self.stats.busy_seconds += seconds
        for req, prompt, decode in split:
            c = req.compute
            c.prefill_seconds += prompt * per_token
            c.decode_seconds += decode * per_token
            c.prefill_tokens += prompt
            c.decode_tokens += decode

    def _append_token(self, req: Request, token: int, logprobs: dict[int, float] | None) -> None:
        params = req.params
        req.output_token_ids.append(token)
        self.stats.generated_tokens += 1
        update_block_hashes(req, self.block_manager.block_size)
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token]
        parent = self._child_to_parent[req.request_id]
        detok = parent.detokenizers[req.request_id]
        ends_here = token in params.stop_token_ids or (token in req.eos_token_ids and not params.ignore_eos)
        status = None
        if ends_here:
            status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in params.stop_token_ids else None
        elif (parent.stream or params.stop) and (stop := detok.update(skip_last=False)) is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        elif (
            params.max_tokens is not None and req.num_output_tokens >= params.max_tokens
        ) or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if not isinstance(req.stop_reason, str):  # a stop string already cut the final text
                detok.update(skip_last=ends_here, final=True)
            self.scheduler.finish(req, status)

    def _release(self, parent: _Parent) -> None:
        del self._parents[parent.request_id]
        for req in parent.children:
            self._child_to_parent.pop(req.request_id, None)
