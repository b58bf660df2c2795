"""Engine configuration: small frozen dataclasses. User-facing validation happens here, once."""

from dataclasses import dataclass, field

from engine.documents import DocumentRecompute
from engine.kv.age_policy import KVAgePolicy, age_policy_from_dict
from engine.kv.kv_format import check_kv_cache_dtype
from engine.sampling_params import MAX_LOGPROBS


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool. `num_blocks` wins over the memory budget when given. On CUDA the budget is what
    leaves the device's memory in use at `gpu_memory_utilization` of its total once the model is loaded
    (vLLM's meaning); on the CPU it is 512 MiB unless `kv_cache_memory_bytes` says otherwise."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # None: from gpu_memory_utilization (CUDA) or 512 MiB (CPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # auto: the activations' dtype; fp8 (= fp8_e4m3): e4m3 with per-(layer, KV head) scales (engine/kv/kv_format.py)
    kv_cache_dtype: str = "auto"
    # KV precision by age (engine/kv/age_policy.py; a dict of its fields is taken too): None keeps every block
    # in kv_cache_dtype; else a decoding request's old blocks move to low-bit pools of kv_coded_fraction of
    # the budget (or num_coded_blocks blocks, when num_blocks is given)
    kv_age_policy: KVAgePolicy | None = None
    kv_coded_fraction: float | None = None  # None: from the longest request (engine/kv/coded_pool.py)
    num_coded_blocks: int | None = None
    # a request priority (SLO class) -> the recent tokens its requests keep at full precision, instead of the
    # policy's window (an interactive class keeps a longer one); only with kv_age_policy
    kv_age_windows: dict[int, int] | None = None

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.kv_cache_dtype)
        if isinstance(self.kv_age_policy, dict):
            object.__setattr__(self, "kv_age_policy", age_policy_from_dict(self.kv_age_policy))
        if self.kv_age_policy is not None:
            self._check_age_policy(self.kv_age_policy)
        else:
            for name in ("kv_age_windows", "kv_coded_fraction", "num_coded_blocks"):
                if getattr(self, name):
                    raise ValueError(f"{name}: needs a kv_age_policy")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: got {self.block_size}, allowed a power of two >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: got {self.num_blocks}, allowed >= 1 or None")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes: got {self.kv_cache_memory_bytes}, allowed > 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: got {self.gpu_memory_utilization}, allowed (0, 1]")

    def _check_age_policy(self, policy: KVAgePolicy) -> None:
        if not isinstance(policy, KVAgePolicy):
            raise ValueError(
                f"kv_age_policy: got {policy!r}, allowed a KVAgePolicy, a dict of its fields or None"
            )
        policy.check_block_size(self.block_size)
        if policy.horizon is not None and policy.horizon % self.block_size:
            raise ValueError(
                f"kv_age_policy.horizon: got {policy.horizon}, allowed a multiple of the block size "
                f"({self.block_size})"
            )
        for priority, window in (self.kv_age_windows or {}).items():
            if (
                isinstance(window, bool)
                or not isinstance(window, int)
                or window < 1
                or window % self.block_size
            ):
                raise ValueError(
                    f"kv_age_windows: priority {priority} got {window!r}, allowed a multiple of the block "
                    f"size ({self.block_size})"
                )
        if self.kv_coded_fraction is not None and not 0.0 < self.kv_coded_fraction < 1.0:
            raise ValueError(f"kv_coded_fraction: got {self.kv_coded_fraction}, allowed (0, 1)")
        if self.num_coded_blocks is not None and (self.num_coded_blocks < 1 or self.num_blocks is None):
            raise ValueError(
                f"num_coded_blocks: got {self.num_coded_blocks}, allowed >= 1 and only with num_blocks"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets. A step mixes decode tokens and prefill chunks up to `max_num_batched_tokens`."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: got {self.max_num_seqs}, allowed >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: got {self.max_num_batched_tokens}, allowed >= 1")


QUANTIZATIONS = ("fp8",)  # weight quantization methods (engine/quantization.py)


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a checkpoint directory or a Hugging Face Hub id (engine/model_source.py)
    dtype: str = "auto"  # auto = the checkpoint's dtype; or float32, bfloat16, float16
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0  # torch's generators are seeded with it at start: unseeded sampling repeats per start
    download_dir: str | None = None  # the Hugging Face cache for Hub ids (None: $HF_HUB_CACHE)
    chat_template: str | None = None  # overrides the model's: a file or the template (engine/tokenizer.py)
    max_logprobs: int = MAX_LOGPROBS  # a request asking for more logprobs per token is refused
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    attention_backend: str | None = None  # None: triton on CUDA, torch elsewhere
    load_format: str = "auto"  # "dummy": random weights, only config.json needed (benchmarks)
    enforce_eager: bool = False  # True: no CUDA graphs
    # steps of other shapes (prefill chunks and decodes packed) of up to this many tokens replay piecewise
    # CUDA graphs around attention (engine/piecewise_graphs.py); 0: they run eagerly. On an H100
    # (benchmarks/results/gpu_engine_mixed.json) a 64-token mixed step takes 0.5-0.6x the eager time and a
    # 512-token one about the same (0.97-1.03x); capture adds ~30 s to a Llama-8B engine's start
    cuda_graph_max_tokens: int = 512
    # weights quantized at load (engine/quantization.py): None (the checkpoint's dtype) or "fp8"
    quantization: str | None = None
    # decode-sized matmuls (<= 64 rows) run kernels/skinny_gemm.py where it measures faster than cuBLAS at
    # start (engine/gemm_tuning.py); None: on a GPU, False: cuBLAS only. True on a CPU is refused
    skinny_gemm: bool | None = None
    # schedule step N+1 while the device runs step N (engine/llm_engine.py); None: on a GPU, off on the CPU
    async_scheduling: bool | None = None
    # speculative decoding: a drafter (engine/spec/drafter.py) proposes up to num_speculative_tokens per decode step
    speculative_method: str | None = None  # None: off (or draft_model when speculative_model is set); "ngram"
    speculative_model: str | None = (
        None  # a draft checkpoint with the target's tokenizer, run on the same device
    )
    num_speculative_tokens: int = 4
    spec_ngram_min: int = 1
    spec_ngram_max: int = 4
    # drafting stops while the decode batch x (drafts + 1) exceeds this many tokens: past the roofline's ridge
    # a verify step is compute-bound and costs about (k + 1) plain steps, so drafts stop paying
    spec_max_batch_tokens: int = 256
    # documents (RAG, engine/documents.py): which tokens of a reused document are recomputed, unless a request
    # says otherwise (a dict of DocumentRecompute's fields is taken too); the KV blocks documents may hold
    # (None: a quarter of the pool)
    document_recompute: DocumentRecompute = field(default_factory=DocumentRecompute)
    max_document_blocks: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.document_recompute, dict):
            object.__setattr__(self, "document_recompute", DocumentRecompute(**self.document_recompute))
        if not isinstance(self.document_recompute, DocumentRecompute):
            raise ValueError(
                f"document_recompute: got {self.document_recompute!r}, allowed a dict of its fields"
            )
        if self.max_document_blocks is not None and self.max_document_blocks < 0:
            raise ValueError(f"max_document_blocks: got {self.max_document_blocks}, allowed >= 0 or None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: got {self.seed!r}, allowed an integer")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling: got {self.async_scheduling!r}, allowed true, false or None")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization: got {self.quantization!r}, allowed None or {list(QUANTIZATIONS)}"
            )
        if self.skinny_gemm is not None and not isinstance(self.skinny_gemm, bool):
            raise ValueError(f"skinny_gemm: got {self.skinny_gemm!r}, allowed true, false or None")
        if self.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens: got {self.cuda_graph_max_tokens}, allowed >= 0")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs: got {self.max_logprobs}, allowed 0..{MAX_LOGPROBS} (the most a request may ask)"
            )
