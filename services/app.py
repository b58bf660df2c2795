"""build_app(config) -> a Ray Serve application: the OpenAI ingress, a decode pool and (disaggregated) a
prefill pool. Each pool is a deployment with its own replicas or autoscaling, resources and engine options;
requests reach replicas through the least-loaded router."""

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import RequestRouterConfig

from control_plane.admission import AdmissionController
from control_plane.concurrency_limit import ConcurrencyLimit
from control_plane.cost import default_price_per_hour
from control_plane.membership import Registration, RegistryView
from control_plane.quantization import check_kv_handoff, pool_formats
from control_plane.registry import keys, parse_url
from control_plane.slo import DEFAULT_SLO_TABLE, SLOClass, SLOTable
from engine import envs
from engine.kv.age_policy import age_policy_from_dict
from engine.llm_engine import engine_config
from engine.model_source import resolve_model, served_model_name
from engine.sampling_params import MAX_LOGPROBS
from engine.stat_logger import ConsoleConfig, configure_logging
from engine.tokenizer import Tokenizer
from observability import tracing
from observability.aggregate import app_metrics
from observability.metrics import POOL_PRICE, POOL_REPLICAS
from services import ray_hardening
from services.decode import DecodeWorker
from services.draft import DraftWorker
from services.frontend import build_frontend
from services.messages.pools import DraftSettings, PoolDescription, TierSettings
from services.messages.worker import WorkerRegistration
from services.openai_serving import OpenAIServing
from services.pd_client import DisaggregatedClient
from services.prefill import PrefillWorker
from services.registry_actor import connector

ray_hardening.install()  # before Serve starts this replica's inter-deployment gRPC server


class PoolConfig(BaseModel):
    """One worker pool. `autoscaling` is Ray Serve's autoscaling_config (min_replicas, max_replicas,
    target_ongoing_requests, ...); when given it replaces `replicas`."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(default=1, ge=1)
    autoscaling: dict | None = None
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_ongoing_requests: int = Field(default=128, ge=1)
    engine: dict = Field(
        default_factory=dict,
        description="engine options (engine/config.py): num_blocks, max_model_len, gpu_memory_utilization, "
        "max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed, ...",
    )
    kv_dram_blocks: int = Field(default=0, ge=0, description="host-memory KV tier per replica (0: none)")
    kv_ssd_dir: str | None = Field(default=None, description="SSD KV tier directory (one per replica)")
    kv_ssd_blocks: int = Field(default=0, ge=0)
    kv_memory: Literal["replica", "node"] = Field(
        default="replica",
        description="replica: tiers inside each replica; node: one KV memory service per "
        "node shared by its replicas (sizes are the service's), surviving replica restarts",
    )
    kv_staging_blocks: int = Field(default=64, ge=1, description="node mode: host blocks staged for offload")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each replica "
        "needs (the Helm chart pins pools to their worker groups with them)",
    )
    device: str | None = Field(
        default=None,
        description="what a replica runs on: cpu, or the GPU type "
        "(H200, A100-80GB, ...); default cpu without GPUs, gpu with",
    )
    price_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="$ per hour per replica; default: "
        "control_plane/cost.py's default list rates for its GPUs and CPUs",
    )
    worker_cls: str | None = Field(
        default=None,
        description="module:Class of the replicas' worker, a subclass "
        "of the pool's role (PrefillWorker, DecodeWorker) — like vLLM's --worker-cls, "
        "for extensions and fault injection; default: the role's own class",
    )
    weight_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8"] = Field(
        default="auto",
        description="auto: the checkpoint's dtype; fp8: e4m3 weights with per-channel scales, quantized at "
        "load, activations in the engine's dtype (engine/quantization.py)",
    )
    kv_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8"] = Field(
        default="auto",
        description="auto: the activations' dtype; fp8: e4m3 with per-(layer, KV head) scales, from the "
        "checkpoint or calibrated at start (engine/kv/kv_format.py), twice the blocks of a 16-bit cache",
    )

    kv_age_policy: dict | None = Field(
        default=None,
        description="KV precision by age (engine/kv/age_policy.py): bits (2, 3, 4), sinks, window, seed. A "
        "request's blocks past the sinks and older than the window move to a rotated low-bit pool; each SLO "
        "class's kv_window overrides the window for its requests",
    )

    @model_validator(mode="after")
    def _check_device_and_dtypes(self) -> "PoolConfig":
        if self.device is not None and not self.device.strip():
            raise ValueError("device: must not be empty")
        if self.num_gpus > 0 and self.device == "cpu":
            raise ValueError(f"device: 'cpu' but num_gpus is {self.num_gpus}; name the GPU type")
        if self.num_gpus == 0 and self.device not in (None, "cpu"):
            raise ValueError(f"device: {self.device!r} needs num_gpus > 0")
        engine_dtype = self.engine.get("dtype", "auto")
        quantization = self.engine.get("quantization")
        if self.weight_dtype == "fp8":
            if quantization not in (None, "fp8"):
                raise ValueError(f"weight_dtype: fp8 but engine.quantization is {quantization!r}; set one")
        elif self.weight_dtype != "auto" and engine_dtype not in ("auto", self.weight_dtype):
            raise ValueError(f"weight_dtype: {self.weight_dtype} but engine.dtype is {engine_dtype}; set one")
        elif self.weight_dtype != "auto" and quantization is not None:
            raise ValueError(f"weight_dtype: {self.weight_dtype} but engine.quantization is {quantization!r}")
        # the KV cache is stored in the activations' dtype (FP8 weights compute in the engine's dtype)
        weights = self.weight_dtype if self.weight_dtype not in ("auto", "fp8") else engine_dtype
        if self.kv_dtype not in ("auto", "fp8") and self.kv_dtype != weights:
            raise ValueError(
                f"kv_dtype: got {self.kv_dtype}, allowed auto, fp8 or the weight dtype ({weights}): a 16-bit "
                "KV cache is stored in the activations' dtype"
            )
        engine_kv = self.engine.get("kv_cache_dtype", "auto")
        if (
            self.kv_dtype != "auto"
            and engine_kv != "auto"
            and not (self.kv_dtype == "fp8" and engine_kv in ("fp8", "fp8_e4m3"))
        ):
            raise ValueError(f"kv_dtype: {self.kv_dtype} but engine.kv_cache_dtype is {engine_kv}; set one")
        return self

    @model_validator(mode="after")
    def _check_engine_options(self) -> "PoolConfig":
        """Bad engine options fail here, naming the option, not later in a replica."""
        app_wide = sorted(set(self.engine) & set(APP_WIDE_ENGINE_OPTIONS))
        if app_wide:
            raise ValueError(f"engine: {', '.join(app_wide)} is set for the whole app, not per pool")
        engine_config("-", **self.engine_options())  # ValueError naming the option
        if self.kv_dram_blocks and self.engine.get("enable_prefix_caching") is False:
            raise ValueError(
                "kv_dram_blocks: the KV tiers need prefix caching (blocks are found by their hashes); "
                "turn one of them off"
            )
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or ("gpu" if self.num_gpus > 0 else "cpu")

    @property
    def resolved_price(self) -> float:
        if self.price_per_hour is not None:
            return self.price_per_hour
        return default_price_per_hour(self.num_gpus, self.num_cpus)

    def engine_options(self) -> dict:
        """The engine's options: priority scheduling (SLO classes) unless the pool says otherwise."""
        options = {"scheduling_policy": "priority", **self.engine}
        if self.weight_dtype == "fp8":
            options["quantization"] = "fp8"
        elif self.weight_dtype != "auto":
            options["dtype"] = self.weight_dtype
        if self.kv_dtype == "fp8":
            options["kv_cache_dtype"] = "fp8"
        if self.kv_age_policy is not None:
            options["kv_age_policy"] = self.kv_age_policy
        return options

    @property
    def weight_format(self) -> str:
        """What the pool's weights are stored as: fp8, a dtype, or auto (the checkpoint's)."""
        if self.weight_dtype == "fp8" or self.engine.get("quantization") == "fp8":
            return "fp8"
        return self.weight_dtype if self.weight_dtype != "auto" else self.engine.get("dtype", "auto")

    def describe(self, name: str, role: str, router: str) -> PoolDescription:
        """The pool as the registry stores it and /v1/pools shows it."""
        return PoolDescription(
            name=name,
            role=role,
            device=self.resolved_device,
            replicas=self.replicas,
            autoscaling=self.autoscaling,
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            price_per_hour=self.resolved_price,
            price_is_default=self.price_per_hour is None,
            weight_dtype=self.weight_format,
            kv_dtype="fp8"
            if self.engine_options().get("kv_cache_dtype", "auto") != "auto"
            else self.kv_dtype,
            kv_age_policy=self.age_policy_fields(),
            router=router,
            kv_memory=self.kv_memory,
            kv_dram_blocks=self.kv_dram_blocks,
            kv_ssd_blocks=self.kv_ssd_blocks,
        )

    def age_policy_fields(self) -> dict | None:
        """The pool's KV age policy as its fields (set here or in engine options), defaults filled in."""
        policy = self.engine_options().get("kv_age_policy")
        if policy is None:
            return None
        policy = age_policy_from_dict(policy) if isinstance(policy, dict) else policy
        return dataclasses.asdict(policy)

    def kv_tiers(self, policy: dict[int, str] | None = None) -> TierSettings | None:
        """policy: each SLO priority's lowest tier."""
        if not self.kv_dram_blocks:
            if self.kv_ssd_dir:
                raise ValueError("kv_ssd_dir: needs kv_dram_blocks >= 1 (SSD sits below DRAM)")
            return None
        return TierSettings(
            dram_blocks=self.kv_dram_blocks,
            ssd_dir=self.kv_ssd_dir,
            ssd_blocks=self.kv_ssd_blocks,
            service=self.kv_memory == "node",
            staging_blocks=self.kv_staging_blocks,
            policy=dict(policy or {}),
        )


class DraftConfig(BaseModel):
    """The CPU draft-model pool for speculative decoding (services/draft.py)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a small checkpoint with the target's tokenizer")
    replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per draft worker (its torch threads)")
    engine: dict = Field(default_factory=dict)
    deadline_s: float = Field(default=0.5, gt=0, description="proposals older than this are not used")
    wait_s: float = Field(
        default=0.0,
        ge=0,
        description="how long a decode step waits for its own drafts (0: "
        "pipelined, never waits; at most deadline_s)",
    )
    price_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="$ per hour per draft worker (default: control_plane/cost.py's default vCPU rate)",
    )
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker"
    )

    @property
    def resolved_price(self) -> float:
        return (
            self.price_per_hour
            if self.price_per_hour is not None
            else default_price_per_hour(0, self.num_cpus)
        )

    @model_validator(mode="after")
    def _wait_within_deadline(self):
        if self.wait_s > self.deadline_s:
            raise ValueError(f"wait_s: got {self.wait_s}; allowed at most deadline_s ({self.deadline_s})")
        return self


# engine options every pool of an app shares: the frontend tokenizes and validates with them too
APP_WIDE_ENGINE_OPTIONS = ("chat_template", "max_logprobs", "download_dir")


def checkpoint_dtype(model: str) -> str | None:
    """config.json's torch_dtype of a local checkpoint (None for a Hub id not resolved yet)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text())
    return hf.get("torch_dtype") or hf.get("dtype")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a checkpoint directory or a Hugging Face Hub id (engine/model_source.py)")
    served_model_name: str | None = Field(
        default=None, description="the `model` clients send (default: the directory's name, or the Hub id)"
    )
    chat_template: str | None = Field(
        default=None,
        description="overrides the model's chat template: the template, or a file every replica can read",
    )
    max_logprobs: int = Field(
        default=MAX_LOGPROBS,
        ge=0,
        le=MAX_LOGPROBS,
        description="the most logprobs per token a request may ask for (more: 400)",
    )
    download_dir: str | None = Field(
        default=None, description="the Hugging Face cache for a Hub id (default: $HF_HUB_CACHE)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="of Ridgeline's loggers in every replica (engine/stat_logger.py)"
    )
    stats_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="each worker logs its engine's throughput, queue and KV usage this often while "
        "it works (0: never)",
    )
    mode: Literal["disaggregated", "aggregated"] = "disaggregated"
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    kv_transport: Literal["auto", "nixl", "ray"] = "auto"
    kv_lease_s: float = Field(default=30.0, gt=0, description="prefill holds handed-out KV this long")
    kv_pull_timeout_s: float = Field(default=30.0, gt=0)
    api_key: str | None = None
    max_inflight: int = Field(default=256, ge=1)
    frontend_num_cpus: float = Field(default=0.5, ge=0)
    max_migrations: int = Field(default=3, ge=0)
    expose_worker_addresses: bool = Field(
        default=False,
        description="/v1/pools shows each worker's pid, host, "
        "node IP and metrics URL (hidden by default: API clients need none)",
    )
    slo_classes: list[dict] = Field(
        default_factory=lambda: [dataclasses.asdict(c) for c in DEFAULT_SLO_TABLE.by_name.values()],
        description="SLO classes (control_plane/slo.py): name, priority, ttft_ms, tpot_ms, lowest_tier, preemptible",
    )
    slo_default: str = "standard"
    router: Literal["kv_aware", "least_loaded"] = Field(
        default="kv_aware",
        description="how the pool that computes prompts (prefill; decode when aggregated) "
        "picks a replica: where the prompt's KV already is (kv_aware) or by load only; the decode pool of a "
        "disaggregated app always goes by load and free KV",
    )

    app_name: str | None = Field(default=None, description="registry namespace (default: the Serve app name)")
    registry: str = Field(
        default="embedded",
        description="where workers and pools register: embedded (a Ray actor) or etcd://HOST:PORT",
    )
    registry_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="a worker that stops heartbeating leaves "
        "the registry (and the router's choices) after this long",
    )
    spec: Literal["none", "ngram", "draft"] = Field(
        default="none",
        description="speculative decoding on the decode pool: prompt lookup (ngram) or a draft "
        "model on CPU draft workers (draft)",
    )
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)
    draft: DraftConfig | None = None
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables of every replica "
        "(e.g. OTEL_EXPORTER_OTLP_ENDPOINT to export traces)",
    )
    admission: bool = Field(
        default=True,
        description="reject with 429 + Retry-After what would miss its SLO "
        "class's TTFT target (control_plane/admission.py), and find the in-flight cap under "
        "max_inflight from first-token times (control_plane/concurrency_limit.py)",
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or served_model_name(self.model)

    def engine_options(self, pool: PoolConfig) -> dict:
        """A pool's engine options with the app-wide ones."""
        options = {"max_logprobs": self.max_logprobs} | pool.engine_options()
        windows = self.slo_table().kv_windows()
        if "kv_age_policy" in options and windows and "kv_age_windows" not in options:
            options["kv_age_windows"] = windows  # each SLO class's full-precision window
        for name in ("chat_template", "download_dir"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options

    @model_validator(mode="after")
    def _check_slo_classes(self) -> "ServeConfig":
        self.slo_table()  # ValueError (naming the class and field) for a bad table
        parse_url(self.registry)  # ValueError naming `registry`
        if (self.spec == "draft") != (self.draft is not None):
            raise ValueError(
                "draft: spec 'draft' needs a draft pool (draft.model), and a draft pool needs spec 'draft'"
            )
        return self

    @model_validator(mode="after")
    def _check_age_windows(self) -> "ServeConfig":
        """The SLO classes' windows fit each aging pool's blocks (ValueError naming kv_age_windows)."""
        for pool, _, _ in self.pools().values():
            options = self.engine_options(pool)
            if "kv_age_windows" in options:
                engine_config("-", **options)
        return self

    @model_validator(mode="after")
    def _check_pool_formats(self) -> "ServeConfig":
        """Decode must be able to take prefill's KV, as it is or converted (control_plane/quantization.py)."""
        if self.mode == "disaggregated":
            checkpoint = checkpoint_dtype(self.model)
            prefill, decode = (
                pool_formats(p.weight_dtype, p.kv_dtype, p.engine, p.resolved_device, checkpoint)
                for p in (self.prefill, self.decode)
            )
            check_kv_handoff(prefill, decode)  # ValueError when decode cannot take prefill's KV
        return self

    def pools(self) -> dict[str, tuple[PoolConfig, str, str]]:
        """name -> (config, role, router) of the pools this app runs."""
        decode_router = self.router if self.mode == "aggregated" else "least_loaded"
        pools: dict[str, tuple[PoolConfig, str, str]] = {
            "decode": (self.decode, "decode" if self.mode == "disaggregated" else "aggregated", decode_router)
        }
        if self.mode == "disaggregated":
            pools = {"prefill": (self.prefill, "prefill", self.router), **pools}
        return pools

    def prices(self) -> dict[str, float]:
        prices = {name: pool.resolved_price for name, (pool, _, _) in self.pools().items()}
        if self.draft is not None:
            prices["draft"] = self.draft.resolved_price
        return prices

    def slo_table(self) -> SLOTable:
        try:
            classes = [SLOClass(**c) for c in self.slo_classes]
        except TypeError as e:
            raise ValueError(f"slo_classes: {e}") from None
        return SLOTable(classes, self.slo_default)

    def kv_tiers(self, pool: PoolConfig) -> TierSettings | None:
        """A pool's KV tiers, with each SLO class's lowest tier."""
        return pool.kv_tiers(self.slo_table().lowest_tiers())


@serve.ingress()
class OpenAIIngress:
    """The HTTP frontend replica: tokenizes, admits by SLO class, sends each request through the pools,
    streams SSE back. It publishes the pools' configuration in the registry and follows the registry's view
    of live workers (for /v1/pools and for the routers in this process)."""

    def __init__(self, config: dict, decode, prefill=None):
        self.config = ServeConfig.model_validate(config)
        configure_logging(self.config.log_level)
        self.decode, self.prefill = decode, prefill
        self.client: DisaggregatedClient | None = None
        self.app_name = self.config.app_name or serve.get_replica_context().app_name
        tracing.configure("ridgeline-frontend")  # records spans only when OTEL_* names an exporter
        self._membership: list[Registration | RegistryView] = []

    def _follow_registry(self):

        connect = connector(self.config.registry)
        for name, (pool, role, router) in self.config.pools().items():
            self._membership.append(
                Registration(
                    connect,
                    keys.pool(self.app_name, name),
                    pool.describe(name, role, router).to_json(),
                    ttl_s=self.config.registry_ttl_s,
                )
            )
        view = RegistryView(connect, keys.app(self.app_name), resync_s=5.0)
        self._membership.append(view)
        for part in self._membership:
            part.start()
        return view

    async def __serve_build_asgi_app__(self):
        infos = [await self.decode.info.remote()]
        if self.prefill is not None:
            infos.append(await self.prefill.info.remote())
        self.client = DisaggregatedClient(
            Tokenizer(resolve_model(self.config.model, self.config.download_dir), self.config.chat_template),
            min(i.max_model_len for i in infos),
            infos[0].vocab_size,
            self.decode,
            self.prefill,
            max_migrations=self.config.max_migrations,
            model_name=self.config.model_name,
        )
        view = self._follow_registry()
        configured = {
            name: pool.describe(name, role, router).to_json()
            for name, (pool, role, router) in self.config.pools().items()
        }
        if (d := self.config.draft) is not None:  # CPU draft workers, charged per request for their drafts
            configured["draft"] = PoolDescription(
                name="draft",
                role="draft",
                device="cpu",
                replicas=d.replicas,
                num_cpus=d.num_cpus,
                model=d.model,
                price_per_hour=d.resolved_price,
                price_is_default=d.price_per_hour is None,
            ).to_json()

        async def pools() -> list[dict]:
            """Each pool as the registry has it (the configuration here until it does) and its live workers."""
            registered = view.under("pools/")
            workers = view.under("workers/")
            out = []
            for name, described in configured.items():
                live = sorted(
                    (
                        WorkerRegistration.from_json(w)
                        for key, w in workers.items()
                        if key.startswith(name + "/")
                    ),
                    key=lambda w: w.replica,
                )
                shown = [
                    {k: v for k, v in w.to_json().items() if k not in hidden}
                    | {"transport": w.transport.get("name")}
                    for w in live
                ]
                out.append(
                    {**registered.get(name, described), "registered": name in registered, "workers": shown}
                )
            return out

        hidden = {"transport"} | (set() if self.config.expose_worker_addresses else _WORKER_ADDRESSES)

        model = self.config.model_name
        prices = self.config.prices()

        async def metrics() -> bytes:
            """This process's metrics and every live worker's (the URLs they registered)."""
            workers = [WorkerRegistration.from_json(w) for w in view.under("workers/").values()]
            for name, price in prices.items():
                POOL_PRICE.labels(model, name).set(price)
                POOL_REPLICAS.labels(model, name).set(sum(1 for w in workers if w.pool == name))
            return await app_metrics(
                {w.replica: w.metrics_url for w in workers if w.metrics_url}, token=api_key
            )

        api_key = self.config.api_key or envs.api_key()
        serving = OpenAIServing(
            self.client,
            model,
            max_inflight=self.config.max_inflight,
            slo_table=self.config.slo_table(),
            prices=prices,
            admission=AdmissionController() if self.config.admission else None,
            concurrency=ConcurrencyLimit(self.config.max_inflight) if self.config.admission else None,
            max_logprobs=self.config.max_logprobs,
        )
        return build_frontend(serving, api_key=api_key, pools=pools, app_metrics=metrics)

    def __del__(self):
        for part in getattr(self, "_membership", []):
            part.stop()


# what a worker registers that only an operator needs (/v1/pools hides it unless expose_worker_addresses)
_WORKER_ADDRESSES = {"pid", "host", "node_ip", "metrics_url"}

_ROUTERS = {
    "kv_aware": "services.routing:KVAwareRequestRouter",
    "least_loaded": "services.routing:LeastLoadedRequestRouter",
}


def _router_config(router: str, registry: dict) -> RequestRouterConfig:
    """registry: {"url": ..., "app": ...}: the routers follow the registry (services/routing.py) through
    Serve's request-router state hook."""
    settings: dict[str, Any] = {
        "request_router_class": _ROUTERS[router],
        "request_router_kwargs": {"registry_url": registry["url"], "registry_app": registry["app"]},
        "request_routing_stats_period_s": 0.5,
        "request_routing_stats_timeout_s": 5,
    }
    return RequestRouterConfig(**settings)


def _actor_options(
    num_cpus: float,
    num_gpus: float = 0.0,
    env: dict[str, str] | None = None,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return options


def _pool(
    cls: type,
    name: str,
    pool: PoolConfig,
    registry: dict,
    router: str = "least_loaded",
    env: dict | None = None,
):
    scale = {"autoscaling_config": pool.autoscaling} if pool.autoscaling else {"num_replicas": pool.replicas}
    return serve.deployment(
        cls,
        name=name,
        max_ongoing_requests=pool.max_ongoing_requests,
        ray_actor_options=_actor_options(pool.num_cpus, pool.num_gpus, env, pool.ray_resources),
        request_router_config=_router_config(router, registry),
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
        **scale,
    )


def worker_class(pool: PoolConfig, role_class: type) -> type:
    """The pool's worker_cls (module:Class, a subclass of role_class), or role_class itself."""
    if pool.worker_cls is None:
        return role_class
    module, _, name = pool.worker_cls.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"worker_cls: cannot import {pool.worker_cls!r} ({e}); allowed module:Class"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, role_class)):
        raise ValueError(f"worker_cls: {pool.worker_cls!r} is not a subclass of {role_class.__name__}")
    return cls


def build_app(config: ServeConfig | dict) -> serve.Application:
    config = ServeConfig.model_validate(config) if isinstance(config, dict) else config
    pools = config.pools()
    registry = {"url": config.registry, "ttl_s": config.registry_ttl_s, "app": config.app_name}

    def worker_options(name: str) -> dict:
        pool = pools[name][0]
        return {
            "kv_tiers": config.kv_tiers(pool),
            "pool_name": name,
            "registry": registry,
            "model_name": config.model_name,
            "metrics_token": config.api_key or envs.api_key(),
            "console": ConsoleConfig(config.log_level, config.stats_interval_s),
        }

    decode_pool, _, decode_router = pools["decode"]
    decode_engine = config.engine_options(decode_pool)
    drafts = None
    if config.spec == "ngram":
        decode_engine |= {
            "speculative_method": "ngram",
            "num_speculative_tokens": config.num_speculative_tokens,
        }
    elif config.spec == "draft":
        decode_engine |= {"num_speculative_tokens": config.num_speculative_tokens}
        d = config.draft
        assert d is not None  # ServeConfig checks that spec "draft" comes with a draft pool
        pool_handle = serve.deployment(
            name="DraftWorker",
            num_replicas=d.replicas,
            max_ongoing_requests=64,
            ray_actor_options=_actor_options(d.num_cpus, env=config.env, resources=d.ray_resources),
        )(DraftWorker).bind(d.model, d.engine, num_threads=max(1, int(d.num_cpus)))
        drafts = DraftSettings(pool_handle, deadline_s=d.deadline_s, wait_s=d.wait_s, pool="draft")
    decode = _pool(
        worker_class(decode_pool, DecodeWorker),
        "DecodeWorker",
        decode_pool,
        registry,
        decode_router,
        config.env,
    ).bind(
        config.model,
        decode_engine,
        config.kv_transport,
        pull_timeout_s=config.kv_pull_timeout_s,
        drafts=drafts,
        **worker_options("decode"),
    )
    prefill = None
    if "prefill" in pools:
        prefill_pool, _, prefill_router = pools["prefill"]
        prefill = _pool(
            worker_class(prefill_pool, PrefillWorker),
            "PrefillWorker",
            prefill_pool,
            registry,
            prefill_router,
            config.env,
        ).bind(
            config.model,
            config.engine_options(prefill_pool),
            config.kv_transport,
            kv_lease_s=config.kv_lease_s,
            **worker_options("prefill"),
        )
    # the frontend takes every request the proxy gets (its own max_inflight answers 503 beyond that), so its
    # admission control and metrics see the whole queue; Serve's default (5 ongoing) would hold the rest in
    # the proxy, invisible
    ingress = serve.deployment(
        name="OpenAIIngress",
        num_replicas=1,
        max_ongoing_requests=config.max_inflight + 16,
        ray_actor_options=_actor_options(config.frontend_num_cpus, env=config.env),
    )(OpenAIIngress)
    return ingress.bind(config.model_dump(), decode, prefill)


def app_builder(args: dict) -> serve.Application:
    """Ray Serve's application builder (`import_path: services.app:app_builder`, `args:` the ServeConfig
    fields): what the Helm chart's RayService runs. Bad args fail the deployment with the field named."""
    return build_app(ServeConfig.model_validate(args))
