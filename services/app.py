"""build_app(config) -> a Ray Serve application: the OpenAI ingress, a decode pool and (disaggregated) a
prefill pool. Each pool is a deployment with its own replicas or autoscaling, resources and engine options;
requests reach replicas through the least-loaded router."""

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.config import RequestRouterConfig

from control_plane.slo import DEFAULT_SLO_TABLE, SLOClass, SLOTable
from engine.tokenizer import Tokenizer
from services.decode import DecodeWorker
from services.frontend import build_frontend
from services.pd_client import DisaggregatedClient
from services.prefill import PrefillWorker


class PoolConfig(BaseModel):
    """One worker pool. `autoscaling` is Ray Serve's autoscaling_config (min_replicas, max_replicas,
    target_ongoing_requests, ...); when given it replaces `replicas`."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(default=1, ge=1)
    autoscaling: dict | None = None
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_ongoing_requests: int = Field(default=128, ge=1)
    engine: dict = Field(default_factory=dict, description="engine options: num_blocks, max_model_len, ...")
    kv_dram_blocks: int = Field(default=0, ge=0, description="host-memory KV tier per replica (0: none)")
    kv_ssd_dir: str | None = Field(default=None, description="SSD KV tier directory (one per replica)")
    kv_ssd_blocks: int = Field(default=0, ge=0)
    kv_memory: Literal["replica", "node"] = Field(
        default="replica", description="replica: tiers inside each replica; node: one KV memory service per "
        "node shared by its replicas (sizes are the service's), surviving replica restarts")
    kv_staging_blocks: int = Field(default=64, ge=1, description="node mode: host blocks staged for offload")

    def kv_tiers(self) -> dict | None:
        if not self.kv_dram_blocks:
            if self.kv_ssd_dir:
                raise ValueError("kv_ssd_dir: needs kv_dram_blocks >= 1 (SSD sits below DRAM)")
            return None
        tiers = {"dram_blocks": self.kv_dram_blocks, "ssd_dir": self.kv_ssd_dir, "ssd_blocks": self.kv_ssd_blocks}
        if self.kv_memory == "node":
            tiers |= {"service": True, "staging_blocks": self.kv_staging_blocks}
        return tiers


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    served_model_name: str | None = None
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
    fault_corrupt_pulls: int = Field(default=0, ge=0, description="tests only: corrupt the first N KV pulls")
    slo_classes: list[dict] = Field(
        default_factory=lambda: [dataclasses.asdict(c) for c in DEFAULT_SLO_TABLE.by_name.values()],
        description="SLO classes (control_plane/slo.py): name, priority, ttft_ms, tpot_ms, lowest_tier, preemptible")
    slo_default: str = "standard"
    router: Literal["kv_aware", "least_loaded"] = Field(
        default="kv_aware", description="how the pool that computes prompts (prefill; decode when aggregated) "
        "picks a replica: where the prompt's KV already is (kv_aware) or by load only; the decode pool of a "
        "disaggregated app always goes by load and free KV")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @model_validator(mode="after")
    def _check_slo_classes(self) -> "ServeConfig":
        self.slo_table()  # ValueError (naming the class and field) for a bad table
        return self

    def slo_table(self) -> SLOTable:
        try:
            classes = [SLOClass(**c) for c in self.slo_classes]
        except TypeError as e:
            raise ValueError(f"slo_classes: {e}") from None
        return SLOTable(classes, self.slo_default)

    def kv_tiers(self, pool: PoolConfig) -> dict | None:
        """A pool's KV tiers, with each SLO class's lowest tier."""
        tiers = pool.kv_tiers()
        return None if tiers is None else {**tiers, "policy": self.slo_table().lowest_tiers()}


@serve.ingress()
class OpenAIIngress:
    """The HTTP frontend replica: tokenizes, sends each request through the pools, streams SSE back."""

    def __init__(self, config: dict, decode, prefill=None):
        self.config = ServeConfig.model_validate(config)
        self.decode, self.prefill = decode, prefill
        self.client: DisaggregatedClient | None = None

    async def __serve_build_asgi_app__(self):
        infos = [await self.decode.info.remote()]
        if self.prefill is not None:
            infos.append(await self.prefill.info.remote())
        self.client = DisaggregatedClient(
            Tokenizer(self.config.model), min(i["max_model_len"] for i in infos), infos[0]["vocab_size"],
            self.decode, self.prefill, max_migrations=self.config.max_migrations)
        return build_frontend(self.client, self.config.model_name, api_key=self.config.api_key,
                              slo_table=self.config.slo_table(),
                              max_inflight=self.config.max_inflight)


_ROUTERS = {"kv_aware": "services.routing:KVAwareRequestRouter",
            "least_loaded": "services.routing:LeastLoadedRequestRouter"}


def _router_config(router: str) -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class=_ROUTERS[router],
                               request_routing_stats_period_s=0.5, request_routing_stats_timeout_s=5)


def _pool(cls: type, name: str, pool: PoolConfig, router: str = "least_loaded"):
    scale = {"autoscaling_config": pool.autoscaling} if pool.autoscaling else {"num_replicas": pool.replicas}
    return serve.deployment(cls, name=name, max_ongoing_requests=pool.max_ongoing_requests,
                            ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
                            request_router_config=_router_config(router), health_check_period_s=2,
                            graceful_shutdown_timeout_s=5, **scale)


def build_app(config: ServeConfig | dict) -> serve.Application:
    config = ServeConfig.model_validate(config) if isinstance(config, dict) else config
    decode_router = config.router if config.mode == "aggregated" else "least_loaded"
    decode = _pool(DecodeWorker, "DecodeWorker", config.decode, decode_router).bind(
        config.model, config.decode.engine, config.kv_transport, pull_timeout_s=config.kv_pull_timeout_s,
        fault_corrupt_pulls=config.fault_corrupt_pulls, kv_tiers=config.kv_tiers(config.decode))
    prefill = None
    if config.mode == "disaggregated":
        prefill = _pool(PrefillWorker, "PrefillWorker", config.prefill, config.router).bind(
            config.model, config.prefill.engine, config.kv_transport, kv_lease_s=config.kv_lease_s,
            kv_tiers=config.kv_tiers(config.prefill))
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", num_replicas=1,
                               ray_actor_options={"num_cpus": config.frontend_num_cpus})
    return ingress.bind(config.model_dump(), decode, prefill)
