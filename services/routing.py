"""Ray Serve request routers that ask the control plane's policies which replica should take a request.

Each replica reports its engine load through `record_routing_stats` (every stats period); the router adds
its own count of requests it has sent to each replica and not yet seen complete, updated on every
send, so a burst arriving between two stats reports does not pile onto one replica.
"""

import dataclasses
import time
from collections import Counter

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from control_plane.kv_index import KVIndex
from control_plane.membership import RegistryView
from control_plane.registry import keys
from control_plane.router import KVAwarePolicy, LeastLoadedPolicy, ReplicaLoad
from engine.documents import document_key, tier_keys
from engine.kv.block_hash import hash_extra, prompt_block_hashes
from observability import metrics, tracing  # (modules: Serve pickles this class by value; metrics hold locks)
from services.messages.worker import RoutingStats, WorkerRegistration
from services.registry_actor import connector
from services.worker_protocol import WorkerRequest


class _LoadTrackingRouter(RequestRouter):
    """Load per replica: its routing stats plus this router's own count of requests sent and not done.
    Its state is set up by Serve's `initialize_state` hook with the deployment's `request_router_kwargs`:
    `registry_url` / `registry_app` name the registry it follows (None: it follows none)."""

    def initialize_state(
        self, registry_url: str | None = None, registry_app: str | None = None, **kwargs
    ) -> None:
        super().initialize_state(**kwargs)
        self._inflight: Counter = Counter()
        self._recent_choices: list[tuple[float, str]] = []
        self._ever_registered: set[str] = set()
        self._registrations: dict[str, float | None] | None = None
        self._view: RegistryView | None = None
        if registry_url is not None:
            app = registry_app or self._deployment_id.app_name
            self._view = RegistryView(connector(registry_url), keys.app(app), resync_s=5.0)
            self._view.start()

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve calls it for every request sent; completion undoes it
        self._inflight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._inflight[replica_id.unique_id] > 0:
            self._inflight[replica_id.unique_id] -= 1

    def _registered(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        """The candidates minus replicas whose registration lapsed (a killed worker leaves the registry within
        its TTL, often before Serve notices). Replicas not registered yet stay; with no registry view in this
        process, or nobody left, all stay. Records each replica's registration in `self._registrations`."""
        if self._view is None:
            return candidates
        workers = [WorkerRegistration.from_json(w) for w in self._view.under("workers/").values()]
        live = {w.replica: w.registered_at for w in workers}
        self._ever_registered.update(live)
        self._registrations = live
        kept = [
            r
            for r in candidates
            if r.replica_id.unique_id in live or r.replica_id.unique_id not in self._ever_registered
        ]
        return kept or candidates

    def _traced(
        self, pending_request: PendingRequest | None, policy: str, order: list[str], **attributes
    ) -> None:
        """A `route` span in the request's trace (observability/tracing.py), when it carries one."""
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(request, WorkerRequest) or not request.trace_context or not tracing.enabled():
            return
        span = tracing.tracer().start_span(
            "route",
            context=tracing.extract(request.trace_context),
            attributes={
                "ridgeline.router.policy": policy,
                "ridgeline.router.deployment": self._deployment_id.name,
                "ridgeline.router.chosen": order[0] if order else "",
                "ridgeline.router.candidates": len(order),
                **attributes,
            },
        )
        span.end()

    def _loads(self, replicas: list[RunningReplica]) -> list[ReplicaLoad]:
        """Each replica's load, counting this router's choices of the last _RECENT_S seconds: a burst is chosen
        before any of it is sent (Serve calls on_send_request later), and must not all pile onto one replica."""
        now = time.monotonic()
        recent = self._recent_choices = [(t, rid) for t, rid in self._recent_choices if now - t < _RECENT_S]
        loads = []
        for replica in replicas:
            load = self._load(replica)
            chosen = sum(1 for _, rid in recent if rid == load.replica_id)
            loads.append(dataclasses.replace(load, ongoing=max(load.ongoing, chosen)))
        return loads

    def _chose(self, replica_id: str) -> None:
        self._recent_choices.append((time.monotonic(), replica_id))

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = RoutingStats.from_dict(replica.routing_stats)
        rid = replica.replica_id.unique_id
        free = stats.kv_free_fraction if replica.routing_stats else 1.0  # no report yet: an empty replica
        return ReplicaLoad(rid, self._inflight[rid], stats.running, stats.waiting, free)


class LeastLoadedRequestRouter(FIFOMixin, _LoadTrackingRouter):
    """Any request may take the least loaded replica (FIFO: the oldest pending request goes first)."""

    policy = LeastLoadedPolicy()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidate_replicas = self._registered(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = self.policy.rank(self._loads(candidate_replicas))
        if order:
            self._chose(order[0])
        self._traced(pending_request, self.policy.name, order)
        return [[by_id[replica_id]] for replica_id in order]  # one rank each: try the best first


_FORGET_AFTER_S = 30.0  # a replica missing from the candidates this long is dropped from the KV index
_RECENT_S = 0.5  # this router's own choices count as load on a replica for this long


class _ExactThenFIFO(FIFOMixin):
    """A replica chosen for one request goes to that request (matched by Serve's internal request id);
    FIFO only when that fails. Plain FIFO would hand a replica chosen for one prefix to whichever request
    is oldest; exact-only matching loops forever when calls made while serving one HTTP request (n > 1
    fan-out) share that request's internal id."""

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        return self._get_pending_request_matching_internal_request_id(request_metadata)


class KVAwareRequestRouter(_ExactThenFIFO, _LoadTrackingRouter):
    """Sends a request where its prompt's KV already is (control_plane/router.py:KVAwarePolicy), from an
    index of every replica's blocks kept current from the KV event batches replicas put in their routing
    stats (services/kv_feed.py), plus what this router just sent (until the replica's events catch up)."""

    def initialize_state(
        self, registry_url: str | None = None, registry_app: str | None = None, **kwargs
    ) -> None:
        super().initialize_state(registry_url, registry_app, **kwargs)
        self._index = KVIndex()
        self._policy = KVAwarePolicy(self._index)
        self._seen: dict[str, int] = {}  # replica -> the last KV event batch applied
        self._last_seen: dict[str, float] = {}  # replica -> when it was last a candidate
        self._registered_at: dict[str, float | None] = {}  # replica -> the registration its entries came with

    def _sync(self, replicas: list[RunningReplica]) -> None:
        index, seen, last_seen = self._index, self._seen, self._last_seen
        now = time.monotonic()
        # the registry's word: a lapsed registration drops the replica's entries; a new one (the replica
        # registered again) drops them until its next snapshot rebuilds them
        registrations, known = self._registrations, self._registered_at
        if registrations is not None:
            for rid in list(known):
                if registrations.get(rid) != known[rid]:
                    index.drop(rid)
                    seen.pop(rid, None)
                    del known[rid]
            known.update(registrations)
        for replica in replicas:
            last_seen[replica.replica_id.unique_id] = now
        # candidates can be a subset; a replica absent for long is gone (dead or scaled down)
        for gone in [rid for rid, t in last_seen.items() if now - t > _FORGET_AFTER_S]:
            index.drop(gone)
            seen.pop(gone, None)
            del last_seen[gone]
        for replica in replicas:
            rid = replica.replica_id.unique_id
            feed = RoutingStats.from_dict(replica.routing_stats).kv_feed
            if feed is None:
                continue
            last = seen.get(rid)
            snapshot = feed.snapshot
            if snapshot is not None and (last is None or snapshot[0] > last):
                index.rebuild(rid, snapshot[1])
                last = snapshot[0]
            if last is None:
                if feed.batches and feed.batches[0][0] != 1:
                    continue  # history incomplete: wait for the next snapshot
                last = 0  # every batch since the worker started is here: build from empty
            batches = [b for b in feed.batches if b[0] > last]
            if batches and batches[0][0] != last + 1:  # fell behind what the replica keeps
                index.drop(rid)
                seen.pop(rid, None)
                continue
            for batch_seq, events in batches:
                index.apply(rid, events)
                last = batch_seq
            seen[rid] = last

    def _prompt_keys(
        self, replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> tuple[list[bytes], list[tuple[tuple[bytes, bytes], int]], int]:
        """(the prompt's block hashes a prefix hit may match, its documents as (key, blocks), its full blocks).
        With documents, blocks from the first one on hash with how the worker assembles them: only those
        before it are matched as a prefix, the documents on their own keys (in HBM) and their first block's
        (in DRAM or SSD)."""
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        reported = next((r.routing_stats for r in replicas if r.routing_stats), None)
        stats = RoutingStats.from_dict(reported)
        if not isinstance(request, WorkerRequest) or not stats.kv_fingerprint:
            return [], [], 0
        extra = hash_extra(stats.kv_fingerprint, stats.kv_format, request.cache_salt)
        ids, bs = request.prompt_token_ids, stats.block_size
        if not request.documents:
            hashes = prompt_block_hashes(ids, bs, extra)
            return hashes, [], len(hashes)
        keys = [document_key(ids[d.start : d.end], extra) for d in request.documents]
        documents = [
            ((key, tier_keys(key, 1)[0]), -(-d.length // bs))
            for key, d in zip(keys, request.documents, strict=True)
        ]
        return prompt_block_hashes(ids[: request.documents[0].start], bs, extra), documents, len(ids) // bs

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidate_replicas = self._registered(candidate_replicas)
        self._sync(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        hashes, documents, prompt_blocks = self._prompt_keys(candidate_replicas, pending_request)
        policy = self._policy
        order = policy.rank(self._loads(candidate_replicas), hashes, documents, prompt_blocks)
        if order:
            self._chose(order[0])
        matched = 0
        if hashes and order:  # the decision, as metrics: how much of the prompt the chosen replica holds
            match = self._index.match(hashes, [order[0]])[order[0]]
            counts = {"hbm": match.hbm, "dram": match.dram, "ssd": match.ssd}
            matched = sum(counts.values())
            metrics.ROUTER_DECISIONS.labels(
                policy.name, next((t for t, n in counts.items() if n), "none")
            ).inc()
            for tier, n in counts.items():
                metrics.ROUTER_MATCHED_BLOCKS.labels(policy.name, tier).inc(n)
            metrics.ROUTER_PROMPT_BLOCKS.labels(policy.name).inc(len(hashes))
            # the chosen replica will hold these blocks in a moment: count on it before its events say so
            # (so a burst sharing a prefix follows the first request); the next snapshot corrects a miss
            self._index.apply(order[0], [("stored", "hbm", hashes + [keys[0] for keys, _ in documents])])
        self._traced(
            pending_request,
            policy.name,
            order,
            **{"ridgeline.router.prompt_blocks": len(hashes), "ridgeline.router.matched_blocks": matched},
        )
        return [[by_id[replica_id]] for replica_id in order]
