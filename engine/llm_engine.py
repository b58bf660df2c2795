"""LLMEngine: add_request / abort_request / step() = schedule -> execute -> update.

With async scheduling a step schedules and launches step N+1, then updates from step N while the device
runs N+1 (vLLM v1's async scheduling, SGLang's overlap scheduler): outputs come one step behind, and a step
whose next one needs its tokens on the host first (grammars, penalties, drafts) is updated before that.

The engine builds its collaborators in its constructor (model, KV pool and block manager, scheduler,
runner, output processor, KV handoff); a caller may hand it a drafter and a factory for the KV tiers below
HBM. Null objects stand in for what is absent (no drafter, no tier), so nothing asks whether they exist.
"""

import functools
import itertools
import logging
import threading
import time
from dataclasses import fields, replace
from typing import Protocol

import torch

from engine.attention import get_backend
from engine.attention.backend import default_backend
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cuda_graphs import CUDAGraphRunner
from engine.document_assembly import DocumentAssembler
from engine.documents import DocumentRecompute, check_spans, document_key
from engine.envs import default_device
from engine.errors import ParameterError
from engine.gemm_tuning import tune_skinny_linears
from engine.kv.block_hash import hash_extra, update_block_hashes
from engine.kv.block_manager import BlockManager
from engine.kv.coded_pool import CodedFormat, CodedKV, check_model_for_age_policy, split_kv_budget
from engine.kv.document_cache import DocumentCache, DocumentEntry
from engine.kv.events import KVEventLog
from engine.kv.handoff import KVHandoff
from engine.kv.kv_format import CALIBRATION_TEXT, FP8_KV, KVFormat, cache_torch_dtype
from engine.kv.kv_scales import calibrate_kv_scales, needs_calibration, stacked_scales
from engine.kv.offload import KVOffloader, KVStore, NullOffloader
from engine.kv.pool import allocate_kv_pool, layer_views, num_blocks_for
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, StepFuture
from engine.model_source import resolve_model
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import RequestOutput
from engine.piecewise_graphs import PiecewiseGraphRunner
from engine.request import EngineRequest, Request, RequestStatus
from engine.scheduler import Scheduler
from engine.spec.draft_model import DraftModelDrafter
from engine.spec.drafter import Drafter, NullDrafter, make_drafter
from engine.stats import EngineStats
from engine.structured_output import GrammarCompilerCache
from engine.tokenizer import Tokenizer
from kernels.fp8 import supports_fp8

logger = logging.getLogger(__name__)


class KVStoreFactory(Protocol):
    """Builds the KV tiers below HBM once a pool exists: (pool, the engine's KV event log) -> store. Called
    again for each coded pool of a KV age policy with its raw blocks [N, block_bytes], `coded` its format and
    no event log (coded copies are not reported to the router); None: that pool's blocks stay in HBM."""

    def __call__(
        self, pool: torch.Tensor, events: KVEventLog | None, coded: CodedFormat | None = None
    ) -> KVStore | None: ...


def check_prompt_ids(prompt_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """ValueError for an empty prompt, token ids outside the vocabulary, or no room to generate."""
    if not prompt_ids:
        raise ParameterError("prompt", "must not be empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_ids):
        raise ParameterError("prompt", f"token ids must be integers in [0, {vocab_size})")
    if len(prompt_ids) >= max_model_len:
        raise ParameterError(
            "prompt",
            f"{len(prompt_ids)} tokens, but the context holds {max_model_len} (max_model_len) including at "
            "least one generated token",
        )


def engine_config(model: str, **kwargs) -> EngineConfig:
    """Route flat keyword arguments to EngineConfig, CacheConfig and SchedulerConfig fields."""
    groups: dict[str, dict] = {name: {} for name in ("engine", "cache", "scheduler")}
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


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        kv_store_factory: KVStoreFactory | None = None,
        drafter: Drafter | None = None,
    ):
        """kv_store_factory: the tiers below HBM (engine/kv/offload.py) that keep evicted prefix blocks;
        drafter: speculative decoding's proposer (default: the config's method, or none)."""
        self.config = config
        self.device = torch.device(
            config.device or default_device() or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        # every device's default generator: unseeded sampling repeats from one engine start to the next
        torch.manual_seed(config.seed)
        self.model_dir = resolve_model(config.model, config.download_dir)
        loaded = load_model(
            self.model_dir,
            config.dtype,
            self.device,
            config.load_format,
            config.quantization,
            config.cache.kv_cache_dtype,
        )
        self.model, self.model_config, self.dtype = loaded.model, loaded.config, loaded.dtype
        self.fingerprint = loaded.fingerprint
        self.tokenizer = Tokenizer(self.model_dir, config.chat_template)
        self.max_model_len = self._max_model_len()
        # before the KV pool: a draft model's memory comes out of the pool's budget
        self.drafter = drafter or build_drafter(
            config, self.model_config.vocab_size, self.device, self.max_model_len
        )
        if not isinstance(self.drafter, NullDrafter) and config.num_speculative_tokens < 1:
            raise ParameterError(
                "num_speculative_tokens", f"got {config.num_speculative_tokens}, allowed >= 1"
            )
        cache = config.cache
        kv_dtype = cache_torch_dtype(cache.kv_cache_dtype, self.dtype)
        if kv_dtype == FP8_KV and self.device.type == "cpu":
            logger.warning("kv_cache_dtype=fp8 on the CPU: emulated (pages dequantized as they are read)")
        if kv_dtype == FP8_KV and self.device.type == "cuda" and not supports_fp8(self.device):
            cap = torch.cuda.get_device_capability(self.device)
            raise ParameterError(
                "kv_cache_dtype", f"fp8 needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}"
            )
        policy = cache.kv_age_policy
        coded_sizes: list[int] = []
        if policy is None:
            num_blocks = num_blocks_for(cache, self.model_config, kv_dtype, self.device)
        else:
            check_model_for_age_policy(self.model_config)
            num_blocks, coded_sizes = split_kv_budget(
                cache,
                self.model_config,
                kv_dtype,
                self.device,
                policy,
                self.max_model_len,
                config.scheduler.max_num_batched_tokens,
            )
        self.kv_pool = allocate_kv_pool(
            num_blocks, self.model_config, cache.block_size, kv_dtype, self.device
        )
        # the low-bit pools of KV precision by age (block ids from num_blocks on)
        self.coded_kv = (
            None
            if policy is None
            else CodedKV.allocate(
                coded_sizes, num_blocks, self.model_config, cache.block_size, policy, self.device
            )
        )
        self.kv_events = KVEventLog()  # drained by the worker that owns this engine
        self.offloader = self._offloader(kv_store_factory)
        self.block_manager = BlockManager(
            num_blocks,
            cache.block_size,
            cache.enable_prefix_caching,
            self.kv_events,
            listener=self.offloader,
            coded_pools=coded_sizes,
        )
        self.stats = EngineStats()
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            self.max_model_len,
            offloader=self.offloader,
            stats=self.stats,
            max_spec_len=config.num_speculative_tokens,
            age_policy=policy,
            age_windows=cache.kv_age_windows,
            apply_aging=None
            if self.coded_kv is None
            else functools.partial(self.coded_kv.apply, self.kv_pool),
        )
        self.kv_format = self._kv_format()  # before any block is hashed: the format is part of the hash
        if self.coded_kv is not None and self.kv_format.scales is not None:
            self.coded_kv.base_scales = self.kv_format.scales.to(self.device)  # aging reads e4m3 blocks
        self.gemm_table = self._tune_gemms()  # before graph capture: the graphs record the chosen kernels
        self.runner = ModelRunner(
            self.model,
            self.kv_pool,
            self._backend(),
            self.block_manager,
            self.device,
            self._graphs(),
            self._piecewise_graphs(),
            self.coded_kv,
        )
        self.scheduler.documents = self.documents = self._document_assembler()
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self._grammars: GrammarCompilerCache | None = None  # structured outputs (the `grammars` property)
        self._grammars_lock = threading.Lock()
        self.kv_handoff = KVHandoff(
            self.block_manager, self._hash_extra, lambda rid: rid in self.outputs, fence=self._fence
        )
        self._ids = itertools.count()
        wanted = config.async_scheduling
        self.async_scheduling = self.device.type == "cuda" if wanted is None else wanted
        self._in_flight: tuple[StepFuture, float] | None = None  # launched, not updated: (step, launch time)
        self._last_update = 0.0

    @property
    def weight_format(self) -> str:
        """How the weights are stored: the quantization method, else the model's dtype."""
        return self.config.quantization or str(self.dtype).removeprefix("torch.")

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        kv_store: KVStore | None = None,
        kv_store_factory: KVStoreFactory | None = None,
        drafter: Drafter | None = None,
        **kwargs,
    ) -> "LLMEngine":
        """kwargs: engine options (EngineConfig, CacheConfig and SchedulerConfig fields). kv_store: a store
        built already (the factory's shortcut)."""
        if kv_store is not None:
            if kv_store_factory is not None:
                raise ValueError("kv_store, kv_store_factory: give one")
            kv_store_factory = ready_store(kv_store)
        return cls(engine_config(str(model), **kwargs), kv_store_factory, drafter)

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if not 1 <= wanted <= limit:
            raise ParameterError(
                "max_model_len", f"got {wanted}, allowed 1..{limit} (max_position_embeddings)"
            )
        return wanted

    def _offloader(self, factory: KVStoreFactory | None) -> KVOffloader | NullOffloader:
        if factory is None:
            return NullOffloader()
        if not self.config.cache.enable_prefix_caching:
            raise ParameterError("kv_store", "needs enable_prefix_caching (blocks are found by their hashes)")
        store = factory(self.kv_pool, self.kv_events)
        if store is None:
            raise ParameterError("kv_store", "the factory built no store for the KV pool")
        coded = [
            None
            if (s := factory(p.raw, None, p.format)) is None
            else KVOffloader(s, p.raw, first_id=p.first_id)
            for p in (self.coded_kv.pools if self.coded_kv is not None else [])
        ]
        if None in coded:
            logger.info(
                "KV tiers: the coded pools' blocks stay in HBM (the store factory built no tier for them)"
            )
        return KVOffloader(store, self.kv_pool, coded)

    def replace_kv_store(self, factory: KVStoreFactory | None) -> None:
        """Swap the tiers below HBM of an idle engine (benchmarks compare tiers on one loaded model): the
        old offloader is closed and a fresh one (or none) takes its place."""
        if self.has_unfinished_requests() or self.scheduler.num_loading:
            raise RuntimeError("replace_kv_store: the engine is not idle")
        self.offloader.close()
        self.offloader = self._offloader(factory)
        self.scheduler.offloader = self.block_manager.listener = self.offloader
        self.documents.store = getattr(self.offloader, "store", None)

    def _kv_format(self) -> KVFormat:
        """The pool's format; an FP8 pool's scales calibrated now unless the checkpoint gave them."""
        if self.kv_pool.dtype != FP8_KV:
            return KVFormat(self.kv_pool.dtype)
        if needs_calibration(self.model):
            ids = self.tokenizer.encode(CALIBRATION_TEXT)[: self.max_model_len]
            calibrate_kv_scales(self.model, self.kv_pool, self._backend(), self.block_manager, ids)
        return KVFormat(FP8_KV, stacked_scales(self.model))

    def _document_assembler(self) -> DocumentAssembler:
        """Documents' KV (RAG) in blocks of the pool, up to max_document_blocks (default a quarter of it)."""
        limit = self.config.max_document_blocks
        cache = DocumentCache(
            self.block_manager, self.block_manager.num_blocks // 4 if limit is None else limit, self.kv_events
        )
        scales = None if self.kv_format.scales is None else self.kv_format.scales.to(self.device)
        self.block_manager.reclaim = cache.evict_one  # requests' blocks before unpinned documents'
        return DocumentAssembler(
            self.model,
            self.kv_pool,
            self.runner.backend,
            self.block_manager,
            cache,
            self.stats,
            scales,
            getattr(self.offloader, "store", None),
        )

    def _backend(self):
        return get_backend(self.config.attention_backend or default_backend(self.device.type))

    def _tune_gemms(self) -> list[dict]:
        wanted = self.config.skinny_gemm
        if self.device.type != "cuda":
            if wanted:
                raise ParameterError("skinny_gemm", f"needs a CUDA device, got {self.device.type}")
            return []
        if wanted is False:
            return []
        return tune_skinny_linears(self.model, self.config.scheduler.max_num_batched_tokens)

    def _graphs(self) -> CUDAGraphRunner | None:
        """CUDA graphs of decode steps (Triton attention on a GPU, unless enforce_eager)."""
        backend = self._backend()
        if self.device.type != "cuda" or backend.name != "triton" or self.config.enforce_eager:
            return None
        graphs = CUDAGraphRunner(
            self.model,
            layer_views(self.kv_pool),
            backend,
            self.config.cache.block_size,
            self.config.scheduler.max_num_seqs,
            self.max_model_len,
            self.device,
            max_spec_len=0 if isinstance(self.drafter, NullDrafter) else self.config.num_speculative_tokens,
            max_verify_tokens=self.config.spec_max_batch_tokens,
            coded=None if self.coded_kv is None else self.coded_kv.layers(),
        )
        graphs.capture()
        return graphs

    def _piecewise_graphs(self) -> PiecewiseGraphRunner | None:
        """Piecewise CUDA graphs of mixed steps (Triton attention on a GPU, unless enforce_eager or off)."""
        if self.device.type != "cuda" or self._backend().name != "triton" or self.config.enforce_eager:
            return None
        max_tokens = min(self.config.cuda_graph_max_tokens, self.config.scheduler.max_num_batched_tokens)
        if max_tokens < 1:
            return None
        runner = PiecewiseGraphRunner(
            self.model,
            layer_views(self.kv_pool),
            self._backend(),
            self.config.cache.block_size,
            max_tokens,
            self.device,
            coded=None if self.coded_kv is None else self.coded_kv.layers(),
        )
        runner.capture()
        return runner

    def kv_pool_formats(self) -> dict[str, tuple[int, int, int]]:
        """Per KV format held in HBM: (capacity blocks, used blocks, bytes a block). Used: allocated to
        requests or cached (16-bit), held by requests (coded)."""
        bm = self.block_manager
        base = self.kv_pool[0].numel() * self.kv_pool.element_size()
        out = {self.kv_format.name: (bm.num_blocks, bm.num_blocks - bm.num_free_blocks, base)}
        for k, pool in enumerate(self.coded_kv.pools if self.coded_kv is not None else []):
            out[f"turboquant{pool.bits}"] = (pool.num_blocks, bm.used_coded_blocks(k), pool.block_bytes())
        return out

    def _hash_extra(self, cache_salt: str | None) -> bytes:
        return hash_extra(self.fingerprint, self.kv_format.tag, cache_salt)

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; ValueError (naming the field) for bad input, before anything is queued."""
        params, rid = request.params, request.request_id
        if rid in self.outputs:
            raise ParameterError("request_id", f"{rid!r} is already in use")
        if not request.prompt:
            raise ParameterError("prompt", "must not be empty")
        prompt = request.prompt
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        resumed = list(request.output_token_ids)
        self._validate(request, prompt_ids, resumed)
        children = [self._sequence(request, prompt_ids, resumed, i) for i in range(params.n)]
        self.stats.requests_by_priority[request.priority] = (
            self.stats.requests_by_priority.get(request.priority, 0) + 1
        )
        text = prompt if isinstance(prompt, str) else None
        self.outputs.add(
            RequestState(rid, text, children, self.tokenizer, request.stream), resumed=bool(resumed)
        )
        for req in children:
            self.scheduler.add_request(req)

    def _validate(self, request: EngineRequest, prompt_ids: list[int], resumed: list[int]) -> None:
        params = request.params
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ParameterError(
                "logprobs",
                f"got {params.logprobs}, allowed at most {self.config.max_logprobs} (max_logprobs)",
            )
        check_prompt_ids(prompt_ids + resumed, self.model_config.vocab_size, self.max_model_len)
        params.check_vocab(self.model_config.vocab_size)
        max_len = min(
            self.max_model_len, len(prompt_ids) + len(resumed) + (params.max_tokens or self.max_model_len)
        )
        bm = self.block_manager
        need = -(-max_len // bm.block_size)
        pinned = self.documents.cache.pinned_blocks  # stored documents keep theirs
        if need > bm.num_blocks + bm.num_coded_blocks - pinned:
            raise ParameterError(
                "prompt",
                f"with max_tokens it needs {need} KV blocks, the pool has {bm.num_blocks}"
                + (f" ({pinned} held by stored documents)" if pinned else ""),
            )
        policy = self.config.cache.kv_age_policy
        if policy is not None and need > bm.num_blocks:  # it relies on aging: sinks, window, two more blocks
            window = max([policy.window, *(self.config.cache.kv_age_windows or {}).values()])
            base = -(-policy.sinks // bm.block_size) + window // bm.block_size + 2
            if base > bm.num_blocks:
                raise ParameterError(
                    "prompt",
                    f"with max_tokens it needs {need} KV blocks; the age policy's sinks and window "
                    f"hold {base} 16-bit blocks, the pool has {bm.num_blocks}",
                )
        if (resumed or request.hold_kv) and params.n != 1:
            raise ParameterError("n", "resuming a request or holding its KV needs n == 1")
        if params.max_tokens is not None and len(resumed) >= params.max_tokens:
            raise ParameterError("output_token_ids", f"{len(resumed)} tokens already reach max_tokens")
        if request.documents:
            self._check_documents(request, prompt_ids)
        self.kv_handoff.check_reserved(
            request.request_id, request.kv_computed_tokens, len(prompt_ids) + len(resumed)
        )

    def _recompute(self, request: EngineRequest) -> DocumentRecompute:
        return self.resolve_recompute(request.document_recompute)

    def resolve_recompute(self, wanted: DocumentRecompute | dict | None) -> DocumentRecompute:
        """A request's document recompute: its own, or its fields over the engine's."""
        if isinstance(wanted, dict):
            return replace(self.config.document_recompute, **wanted)
        return wanted or self.config.document_recompute

    def _check_documents(self, request: EngineRequest, prompt_ids: list[int]) -> None:
        check_spans(request.documents, len(prompt_ids))
        self._recompute(request).check_layers(self.model_config.num_layers)
        if self.config.cache.kv_age_policy is not None and not request.kv_computed_tokens:
            # handed-over KV is never assembled here: its documents only name how it hashes
            raise ParameterError(
                "documents", "not with a kv_age_policy: a pool either ages KV or assembles documents"
            )

    def _sequence(self, request: EngineRequest, prompt_ids: list[int], resumed: list[int], i: int) -> Request:
        """Sequence i of n: its own id when n > 1, its own seed offset."""
        rid = request.request_id if request.params.n == 1 else f"{request.request_id}#{i}"
        req = Request(
            rid,
            prompt_ids,
            request.params,
            eos_token_ids=self.eos_token_ids,
            priority=request.priority,
            preemptible=request.preemptible,
            hash_extra=self._hash_extra(request.cache_salt),
            arrival_time=request.arrival_time,
            seed_offset=i,
            hold_kv=request.hold_kv,
        )
        req.set_documents(tuple(request.documents), self._recompute(request))
        if (spec := request.params.structured_output) is not None:
            req.grammar = self.grammars.matcher(spec)  # compiled once per spec (LRU); AsyncLLM compiles first
        if resumed:
            req.resume(resumed, self.model_config.vocab_size, request.output_logprobs)
        if request.kv_computed_tokens:
            req.num_computed_tokens, req.num_cached_tokens = request.kv_computed_tokens, 0
        update_block_hashes(req, self.block_manager.block_size)
        return req

    @property
    def grammars(self) -> GrammarCompilerCache:
        """Structured outputs' grammars compiled against this model's tokenizer and logits width: built on
        the first constrained request (a vocabulary scan), kept for the engine's life; one, whichever
        thread asks first (AsyncLLM compiles off the engine thread)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompilerCache.from_model_dir(
                    self.model_dir, self.model_config.vocab_size, sorted(self.eos_token_ids)
                )
            return self._grammars

    # -- documents (RAG) ----------------------------------------------------------------------------

    def add_document(
        self, document: str | list[int], cache_salt: str | None = None, pinned: bool = True
    ) -> DocumentEntry:
        """Compute a document's KV into the document cache now (or find it there) and keep it, pinned unless
        asked otherwise, until remove_document. Prompts naming the same tokens under the same cache_salt
        reuse it at any position. ValueError when it is empty, longer than the context or finds no room."""
        ids = (
            self.tokenizer.encode(document, add_special_tokens=False)
            if isinstance(document, str)
            else document
        )
        if not ids or len(ids) >= self.max_model_len:
            raise ParameterError(
                "documents",
                f"a document holds 1..{self.max_model_len - 1} tokens (the context), got {len(ids)}",
            )
        check_prompt_ids(ids, self.model_config.vocab_size, self.max_model_len)
        entry = self.documents.add(list(ids), self._hash_extra(cache_salt), pinned)
        if entry is None:
            raise ParameterError(
                "documents",
                f"no room in the document cache for {len(ids)} tokens ({self.documents.cache.max_blocks} blocks, "
                "max_document_blocks; pinned documents are kept until they are removed)",
            )
        return entry

    def document_key(self, token_ids: list[int], cache_salt: str | None = None) -> bytes:
        return document_key(token_ids, self._hash_extra(cache_salt))

    def remove_document(self, key: bytes) -> bool:
        """Drop a document and free its blocks; False when it is not cached."""
        return self.documents.cache.remove(key)

    def abort_request(self, request_id: str) -> None:
        state = self.outputs.get(request_id)
        if state is None:
            return
        for req in state.children:
            if not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.outputs.touch(state)  # its final output comes with the next step

    def has_unfinished_requests(self) -> bool:
        return (
            self.scheduler.has_unfinished_requests()
            or self.outputs.has_pending()
            or self._in_flight is not None
        )

    def run(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Add the requests and step until every one finished (offline use): their final outputs, in
        order. A request refused by validation aborts the ones added before it."""
        added = []
        try:
            for request in requests:
                self.add_request(request)
                added.append(request.request_id)
        except ValueError:
            for rid in added:
                self.abort_request(rid)
            while self.has_unfinished_requests():
                self.step()
            raise
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in added]

    def new_request_id(self, prefix: str = "engine") -> str:
        return f"{prefix}-{next(self._ids)}"

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass: schedule -> launch -> update. Returns an output for every user request that
        changed (only finished ones for requests added with stream=False). With async scheduling the update
        is the previous step's, made while this one runs."""
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if sched.is_empty and self.scheduler.num_loading and previous is None:
            self.offloader.wait(0.005)  # only KV loads are in flight: do not spin
        launched = None if sched.is_empty else self.runner.launch(sched)
        if previous is not None:
            self._update(*previous)
        if launched is not None:
            ahead = (
                self.async_scheduling and not launched.needs_sync and isinstance(self.drafter, NullDrafter)
            )
            if ahead:
                self._in_flight = (launched, start)
            else:
                self._update(launched, start)
        return self.outputs.collect()

    def _update(self, step: StepFuture, launched_at: float) -> None:
        """A launched step's tokens (waiting for them) into the requests: stop checks, outputs, drafts."""
        sampled = step.result()
        now = time.perf_counter()
        seconds = now - max(launched_at, self._last_update)  # overlapped steps share the device's time
        self._last_update = now
        split = self.scheduler.update_from_output(step.sched, sampled, self.outputs)
        self.offloader.observe_prefill(sum(p for _, p, _ in split), seconds)  # what recomputing costs
        self.offloader.write_through()  # this step's new cached blocks start copying down
        for s in sampled:
            self.outputs.touch_sequence(s.request)
        self.drafter.draft_for_step(
            self.scheduler.running,
            self.config.num_speculative_tokens,
            self.config.spec_max_batch_tokens,
            self.max_model_len,
        )
        self.stats.charge(split, seconds)

    def _fence(self) -> None:
        """Wait until the step in flight has written its KV: blocks it may still write (freed under it)
        are about to be handed to a writer outside the device's stream order (a KV transfer)."""
        if self._in_flight is not None:
            self._in_flight[0].wait_device()


def build_drafter(config: EngineConfig, vocab_size: int, device: torch.device, max_model_len: int) -> Drafter:
    """The config's drafter: a draft model in its own engine on the target's device, prompt lookup, or none."""
    method = config.speculative_method or ("draft_model" if config.speculative_model else None)
    if method is None:
        return NullDrafter()
    if method != "draft_model":
        if config.speculative_model:
            raise ParameterError(
                "speculative_model", f"only with speculative_method draft_model, not {method!r}"
            )
        return make_drafter(method, ngram_min=config.spec_ngram_min, ngram_max=config.spec_ngram_max)
    if not config.speculative_model:
        raise ParameterError(
            "speculative_model", "needed by speculative_method draft_model (a draft checkpoint)"
        )
    block_size, seqs = config.cache.block_size, config.scheduler.max_num_seqs
    draft = LLMEngine.from_pretrained(
        config.speculative_model,
        device=str(device),
        max_num_seqs=seqs,
        block_size=block_size,
        num_blocks=DraftModelDrafter.blocks_for(max_model_len, seqs, block_size),
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        enable_prefix_caching=True,
    )
    return DraftModelDrafter(draft, vocab_size=vocab_size)


def ready_store(store: KVStore) -> KVStoreFactory:
    """A factory handing out a store built already (it records into the engine's event log); coded pools
    get none."""

    def factory(
        pool: torch.Tensor, events: KVEventLog | None, coded: CodedFormat | None = None
    ) -> KVStore | None:
        if coded is not None:
            return None
        store.events = events  # lower tiers report into the same log
        return store

    return factory
