"""What prefill and decode workers share: one engine on its own thread, the KV transport registered on its
pool, the load report the router reads, and health. Plain classes: build_app() makes them Ray Serve
deployments; tests may drive them directly."""

import functools
import os
import socket
import uuid
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace

from control_plane.membership import Registration
from control_plane.registry import keys
from engine.async_llm import AsyncLLM
from engine.spec.drafter import Drafter
from engine.stat_logger import ConsoleConfig, configure_logging
from observability import tracing
from observability.metrics import KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES, QUEUE_TIME
from observability.metrics_server import start_metrics_server
from observability.worker_metrics import EngineSnapshot, register_worker, unregister_worker
from services import ray_hardening
from services.kv_feed import KVEventFeed
from services.kv_memory.client import KVMemoryClient
from services.kv_memory.service import connect
from services.kv_memory.tier_policy import TierPolicy
from services.kv_memory.tiered_store import TieredKVStore, build_store
from services.messages.kv_feed import KVFeedReport
from services.messages.pools import TierSettings
from services.messages.worker import ModelInfo, WorkerCounters, WorkerRegistration, WorkerStats
from services.registry_actor import connector
from services.transport.factory import make_transport

ray_hardening.install()  # before Serve starts this replica's inter-deployment gRPC server
DEFAULT_CONSOLE = ConsoleConfig()


def replica_name() -> str:
    """The Ray Serve replica id when running as one, else a unique local name."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return "ridgeline"


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray here
        return "127.0.0.1"


def worker_labels(model: str, role: str, worker_options: dict) -> dict[str, str]:
    """A worker's metric labels: its model's served name, its pool (default: its role), its role."""
    model_name = worker_options.get("model_name") or os.path.basename(os.path.normpath(model))
    return {"model": model_name, "pool": worker_options.get("pool_name") or role, "role": role}


class EngineWorker:
    role = "worker"

    def __init__(
        self,
        model: str,
        engine_options: dict | None = None,
        kv_transport: str = "auto",
        kv_tiers: TierSettings | None = None,
        pool_name: str | None = None,
        registry: dict | None = None,
        model_name: str | None = None,
        metrics_token: str | None = None,
        drafter: Drafter | None = None,
        console: ConsoleConfig = DEFAULT_CONSOLE,
    ):
        """kv_tiers: the tiers below HBM (services/messages/pools.py) that keep prefix blocks in host
        memory (and on SSD) and load them back instead of recomputing them.
        pool_name: the pool this replica's compute is charged to (default: its role). registry: {"url":
        "embedded" | "etcd://HOST:PORT", "ttl_s": ..., "app": ...} registers this replica under a lease.
        metrics_token: the bearer token this replica's metrics endpoint requires (the app's API key).
        drafter: speculative decoding's proposer for this replica's engine (a remote draft pool).
        console: the level of Ridgeline's loggers in this process, and how often the engine logs its
        throughput and state while it works (engine/stat_logger.py)."""
        configure_logging(console.log_level)
        self.metrics_token = metrics_token
        tracing.configure(f"ridgeline-{self.role}")  # records spans only when OTEL_* names an exporter
        self.name = replica_name()
        self.metric_labels = worker_labels(
            model, self.role, {"pool_name": pool_name, "model_name": model_name}
        )
        self.pool, self.model_name = self.metric_labels["pool"], self.metric_labels["model"]
        self.registration: Registration | None = None
        self.metrics_server: WSGIServer | None = None
        self.transport = make_transport(kv_transport)
        factory = functools.partial(self._kv_store_for, kv_tiers, kv_transport) if kv_tiers else None
        self.llm = AsyncLLM.from_pretrained(
            model,
            kv_store_factory=factory,
            drafter=drafter,
            stats_interval_s=console.stats_interval_s,
            name=f"{self.pool} {self.name}",
            **(engine_options or {}),
        )
        self.engine = self.llm.engine
        if factory is None:  # else the factory registered it, before building the tiers on it
            self.transport.register(self.engine.kv_pool)
        for coded in self.engine.coded_kv.pools if self.engine.coded_kv is not None else []:
            self.transport.register_coded(coded.raw, coded.format, coded.first_id)  # aged blocks travel coded
        self.transport.set_kv_scales(self.engine.kv_format.scales)  # what this pool's bytes mean
        self.kv_store = self.engine.offloader.store  # None without tiers

        self.kv_feed = KVEventFeed(self.engine.kv_events, self._kv_snapshot)
        self._metrics_token = register_worker(self.metric_labels, self._metrics_read)
        for metric in (KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES):  # known series start at 0, not absent
            metric.labels(**self.metric_labels, transport=self.transport.name)
        if registry is not None:
            self._register(registry)
        self.counters = WorkerCounters()

    def _kv_store_for(self, tiers: TierSettings, kv_transport: str, pool, events, coded=None):
        """The engine's kv_store_factory: the tiers below HBM for its pool, reporting into its event log. A
        coded pool (a KV age policy's) gets tiers of its own in this process, as many blocks (of its size)
        as the pool's DRAM and SSD tiers hold, reporting nothing to the router. With the node's KV memory
        service (one block size, a budget for the node) coded blocks stay in HBM: a tier in every worker would
        multiply the node's host memory by its workers."""
        if coded is not None:
            if tiers.service:
                return None
            return build_store(
                coded.block_bytes,
                tiers.dram_blocks,
                tiers.ssd_dir,
                tiers.ssd_blocks,
                policy=TierPolicy({int(k): v for k, v in tiers.policy.items()}),
                ssd_claim=f"{self.pool}-{coded.name}-seed{coded.seed}",  # codes of another seed never match
            )
        self.transport.register(pool)
        store = self._build_kv_store(tiers, kv_transport, pool)
        store.events = events
        return store

    def _build_kv_store(self, tiers: TierSettings, kv_transport: str, pool):
        if tiers.service:  # the node's shared KV memory service
            service = connect(
                self.transport.layout,
                tiers.dram_blocks,
                tiers.ssd_dir,
                tiers.ssd_blocks,
                kv_transport=kv_transport,
                policy=tiers.policy,
            )
            return KVMemoryClient(
                service,
                self.transport.layout,
                self.transport,
                staging_blocks=tiers.staging_blocks,
                kv_transport=kv_transport,
                use_shm=tiers.use_shm,
            )
        return build_store(
            pool[0].numel() * pool.element_size(),
            tiers.dram_blocks,
            tiers.ssd_dir,
            tiers.ssd_blocks,
            policy=TierPolicy({int(k): v for k, v in tiers.policy.items()}),
            ssd_claim=self.pool,  # a slot per replica (ssd_dir/<pool>-<rank>), found again after a restart
        )

    def _register(self, registry: dict) -> None:
        """Put this replica in the registry under a lease kept alive by a heartbeat thread; a registration
        made again (the registry lost it) sends a full KV snapshot with the next routing stats."""

        engine = self.engine
        node_ip = _node_ip()
        # this replica's metrics endpoint: the frontend's /metrics gathers it (observability/aggregate.py)
        self.metrics_server = server = start_metrics_server(node_ip, self.metrics_token)
        value = WorkerRegistration(
            pool=self.pool,
            role=self.role,
            replica=self.name,
            pid=os.getpid(),
            host=socket.gethostname(),
            node_ip=node_ip,
            device=str(engine.device),
            transport=self.transport.describe(),
            block_size=engine.block_manager.block_size,
            kv_blocks=engine.block_manager.num_blocks,
            kv_dtype=engine.kv_format.name,
            kv_fingerprint=engine.fingerprint,
            max_model_len=engine.max_model_len,
            weight_dtype=engine.weight_format,
            metrics_url=f"http://{node_ip}:{server.server_port}/metrics",
        ).to_json()
        app = registry.get("app") or _app_name()
        self.registration = registration = Registration(
            connector(registry["url"]),
            keys.worker(app, self.pool, self.name),
            value,
            ttl_s=registry.get("ttl_s", 10.0),
            on_registered=self.kv_feed.force_snapshot,
        )
        registration.start()

    def _metrics_read(self) -> EngineSnapshot:
        """Engine state for observability/worker_metrics.py (read at scrape time, off the engine thread)."""
        engine, sched, blocks = self.engine, self.engine.scheduler, self.engine.block_manager
        kv_blocks = {"hbm": (blocks.num_blocks, blocks.num_blocks - blocks.num_free_blocks)}
        hit_blocks = {"hbm": sched.prefix_hit_blocks}
        moved: dict[tuple[str, str], int] = {}
        store, offloader = self.kv_store, engine.offloader
        if store is not None:
            block_bytes = engine.kv_pool[0].numel() * engine.kv_pool.element_size()
            occupancy = store.occupancy()
            for tier in ("dram", "ssd"):
                if f"{tier}_capacity_blocks" in occupancy:
                    kv_blocks[tier] = (occupancy[f"{tier}_capacity_blocks"], occupancy[f"{tier}_blocks"])
            served = store.served_blocks()
            hit_blocks["dram"] = served.get("dram", 0)
            hit_blocks["ssd"] = served.get("ssd", 0)
            moved[("dram", "offload")] = offloader.stats.offloaded_blocks * block_bytes
            moved[("dram", "load")] = offloader.stats.loaded_blocks * block_bytes
            moved[("ssd", "offload")] = store.demoted_blocks() * block_bytes
            moved[("ssd", "load")] = hit_blocks["ssd"] * block_bytes
            moved[("dram", "load")] -= offloader.stats.loaded_coded_blocks * block_bytes  # at their own size
        tier_formats = self._coded_tiers(moved)
        return EngineSnapshot(
            running=len(sched.running),
            waiting=len(sched.waiting) + sched.num_loading,
            preemptions=sched.num_preemptions,
            busy_seconds=engine.stats.busy_seconds,
            steps=engine.stats.steps,
            lookup_blocks=sched.prefix_lookup_blocks,
            kv_blocks=kv_blocks,
            hit_blocks=hit_blocks,
            tier_formats=tier_formats,
            moved_bytes=moved,
            spec_draft_tokens=engine.stats.spec_draft_tokens,
            spec_accepted_tokens=engine.stats.spec_accepted_tokens,
            spec_verifications=engine.stats.spec_verifications,
            weight_dtype=engine.weight_format,
            kv_dtype=engine.kv_format.name,
            kv_formats=engine.kv_pool_formats(),
            kv_blocks_aged=engine.stats.kv_blocks_aged,
            document_lookups=(
                engine.stats.document_hits,
                engine.stats.document_tier_hits,
                engine.stats.document_misses,
            ),
            document_tokens=(engine.stats.document_tokens_reused, engine.stats.document_tokens_recomputed),
            document_fallbacks=engine.stats.document_fallbacks,
            document_cache_blocks=engine.documents.cache.num_blocks,
        )

    def observe_queue_time(self, queued: tuple[float, float] | None, slo_class: str, span=None) -> None:
        """The queue-time metric, and a `queue` child span (arrival to first scheduled step) of `span`."""
        if queued is None:
            return
        QUEUE_TIME.labels(**self.metric_labels, slo_class=slo_class).observe(max(queued[1] - queued[0], 0.0))
        if span is not None and span.is_recording():
            start, end = int(queued[0] * 1e9), int(queued[1] * 1e9)
            tracing.tracer().start_span(
                "queue", context=trace.set_span_in_context(span), start_time=start
            ).end(end_time=max(end, start))

    def request_span(self, name: str, req):
        """This worker's SERVER span for a request, a child of the caller's span carried in the request."""
        return tracing.tracer().start_span(
            name,
            context=tracing.extract(req.trace_context),
            kind=tracing.SpanKind.SERVER,
            attributes={
                "ridgeline.replica": self.name,
                "ridgeline.pool": self.pool,
                "ridgeline.role": self.role,
                "ridgeline.request_id": req.request_id,
                "ridgeline.slo_class": req.slo_class,
                "gen_ai.usage.input_tokens": len(req.prompt_token_ids),
            },
        )

    def snapshot(self) -> WorkerStats:
        """Load, KV occupancy and counters of this replica."""
        sched, blocks, engine = self.engine.scheduler, self.engine.block_manager, self.engine
        offload = engine.offloader.stats
        return WorkerStats(
            role=self.role,
            replica=self.name,
            pid=os.getpid(),
            pool=self.pool,
            transport=self.transport.name,
            unfinished=self.llm.num_unfinished(),
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_free_blocks=blocks.num_free_blocks,
            kv_total_blocks=blocks.num_blocks,
            counters=self.counters,
            busy_seconds=engine.stats.busy_seconds,
            kv_loading=sched.num_loading,
            kv_pulls_by_path=dict(getattr(self.transport, "pulls_by_path", {})),
            kv_tier_loaded_blocks=offload.loaded_blocks,
            kv_tier_offloaded_blocks=offload.offloaded_blocks,
            spec_draft_tokens=engine.stats.spec_draft_tokens,
            spec_accepted_tokens=engine.stats.spec_accepted_tokens,
            kv_blocks_aged=engine.stats.kv_blocks_aged,
            drafter=dict(getattr(engine.drafter, "stats", {}) or {}),
            registered=self.registration.registered if self.registration else None,
            kv_store=self._store_stats(),
        )

    def _coded_tiers(self, moved: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        """Blocks the coded pools' own tiers hold, by (tier, format); their moves added to `moved`."""
        out: dict[tuple[str, str], int] = {}
        for sub, pool in zip(
            getattr(self.engine.offloader, "coded", []),
            self.engine.coded_kv.pools if self.engine.coded_kv is not None else [],
            strict=False,
        ):
            if sub is None:
                continue
            occupancy, size, name = sub.store.occupancy(), pool.block_bytes(), pool.format.name
            for tier in ("dram", "ssd"):
                if f"{tier}_blocks" in occupancy:
                    out[(tier, name)] = occupancy[f"{tier}_blocks"]
            moved[("dram", "offload")] = moved.get(("dram", "offload"), 0) + sub.stats.offloaded_blocks * size
            loaded = sub.store.stats.get("loaded_blocks", 0) * size
            moved[("dram", "load")] = moved.get(("dram", "load"), 0) + loaded
        return out

    def _store_stats(self) -> dict:
        store = self.kv_store
        if store is None:
            return {}
        stats = {k: (dict(v) if isinstance(v, dict) else v) for k, v in store.stats.items()}
        stats |= store.occupancy()
        return stats

    def _kv_snapshot(self) -> dict[str, list[bytes]]:
        """Every block this worker holds, by tier (HBM from the prefix cache and the document cache's keys;
        DRAM/SSD of in-process tiers)."""
        out = {"hbm": [*self.engine.block_manager.cached, *self.engine.documents.cache.entries]}
        store = self.kv_store
        if isinstance(store, TieredKVStore):  # the node's service reports its tiers itself
            out["dram"] = store.dram.hashes()
            if store.ssd is not None:
                out["ssd"] = store.ssd.hashes()
        return out

    def record_routing_stats(self) -> dict:
        """Ray Serve collects this every stats period for the request router (services/routing.py): load,
        and the KV events since the last reports (for the KV-aware router's index)."""
        engine = self.engine
        return {
            **self.snapshot().to_dict(),
            "kv_feed": self.kv_feed.report(),
            "block_size": engine.block_manager.block_size,
            "kv_fingerprint": engine.fingerprint,
            "kv_format": engine.kv_format.tag,
        }

    async def stats(self) -> dict:
        return self.snapshot().to_dict()

    async def kv_events(self) -> KVFeedReport:
        """The KV event feed's latest report (services/kv_feed.py): numbered batches of block hashes
        stored/removed per tier, and a full snapshot every few reports."""
        return self.kv_feed.report()

    async def info(self) -> ModelInfo:
        return ModelInfo(
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.model_config.vocab_size,
            block_size=self.engine.block_manager.block_size,
        )

    def check_health(self) -> None:
        """Ray Serve's health check: raises for a dead or stalled engine loop, so the replica is replaced."""
        self.llm.check_health()

    def __del__(self):  # Ray Serve calls it when the replica shuts down; safe to call twice
        if getattr(self, "_metrics_token", None) is not None:
            unregister_worker(self._metrics_token)
            self._metrics_token = None
        server, self.metrics_server = getattr(self, "metrics_server", None), None
        if server is not None:
            server.shutdown()
            server.server_close()
        registration, self.registration = getattr(self, "registration", None), None
        if registration is not None:
            registration.stop()  # revokes the lease: the replica leaves the registry now
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()
            llm.engine.offloader.close()
        store, self.kv_store = getattr(self, "kv_store", None), None
        if store is not None:
            store.close()
        transport, self.transport = getattr(self, "transport", None), None
        if transport is not None:
            transport.close()
