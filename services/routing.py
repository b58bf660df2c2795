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

from control_plane import membership  # (a module, read at call time: see the metrics import)
from control_plane.kv_index import KVIndex
from control_plane.router import KVAwarePolicy, LeastLoadedPolicy, ReplicaLoad
from engine.kv.block_hash import hash_extra, prompt_block_hashes
from observability import metrics, tracing  # (modules: Serve pickles this class by value; metrics hold locks)
from services.worker_protocol import WorkerRequest


class _LoadTrackingRouter(RequestRouter):
    """Load per replica: its routing stats plus this router's own count of requests sent and not done."""

    @property
    def _inflight(self) -> Counter:
        return self.__dict__.setdefault("_inflight_by_replica", Counter())

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
        view = membership.VIEWS.get(self._deployment_id.app_name)
        if view is None:
            return candidates
        live = {w.get("replica"): w.get("registered_at") for w in view.under("workers/").values()}
        ever = self.__dict__.setdefault("_ever_registered", set())
        ever.update(live)
        self.__dict__["_registrations"] = live
        kept = [r for r in candidates if r.replica_id.unique_id in live or r.replica_id.unique_id not in ever]
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
        recent = [(t, rid) for t, rid in self.__dict__.get("_recent_choices", []) if now - t < _RECENT_S]
        self.__dict__["_recent_choices"] = recent
        loads = []
        for replica in replicas:
            load = self._load(replica)
            chosen = sum(1 for _, rid in recent if rid == load.replica_id)
            loads.append(dataclasses.replace(load, ongoing=max(load.ongoing, chosen)))
        return loads

    def _chose(self, replica_id: str) -> None:
        self.__dict__.setdefault("_recent_choices", []).append((time.monotonic(), replica_id))

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        total = stats.get("kv_total_blocks") or 1
        return ReplicaLoad(
            replica.replica_id.unique_id,
            self._inflight[replica.replica_id.unique_id],
            stats.get("running", 0),
            stats.get("waiting", 0),
            stats.get("kv_free_blocks", total) / total,
        )


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

    @property
    def _kv(self) -> dict:
        state = self.__dict__.get("_kv_state")
        if state is None:
            index = KVIndex()
            state = self.__dict__["_kv_state"] = {
                "index": index,
                "policy": KVAwarePolicy(index),
                "seen": {},
                "last_seen": {},
            }
        return state

    def _sync(self, replicas: list[RunningReplica]) -> None:
        index, seen, last_seen = self._kv["index"], self._kv["seen"], self._kv["last_seen"]
        now = time.monotonic()
        # the registry's word: a lapsed registration drops the replica's entries; a new one (the replica
        # registered again) drops them until its next snapshot rebuilds them
        registrations, known = self.__dict__.get("_registrations"), self._kv.setdefault("registered_at", {})
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
            feed = (replica.routing_stats or {}).get("kv_feed")
            if not feed:
                continue
            last = seen.get(rid)
            snapshot = feed.get("snapshot")
            if snapshot is not None and (last is None or snapshot[0] > last):
                index.rebuild(rid, snapshot[1])
                last = snapshot[0]
            if last is None:
                if feed["batches"] and feed["batches"][0][0] != 1:
                    continue  # history incomplete: wait for the next snapshot
                last = 0  # every batch since the worker started is here: build from empty
            batches = [b for b in feed["batches"] if b[0] > last]
            if batches and batches[0][0] != last + 1:  # fell behind what the replica keeps
                index.drop(rid)
                seen.pop(rid, None)
                continue
            for batch_seq, events in batches:
                index.apply(rid, events)
                last = batch_seq
            seen[rid] = last

    def _block_hashes(
        self, replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[bytes]:
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        stats = next((r.routing_stats for r in replicas if r.routing_stats), None)
        if not isinstance(request, WorkerRequest) or not stats or "kv_fingerprint" not in stats:
            return []
        extra = hash_extra(stats["kv_fingerprint"], stats["kv_dtype"], request.cache_salt)
        return prompt_block_hashes(request.prompt_token_ids, stats["block_size"], extra)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidate_replicas = self._registered(candidate_replicas)
        self._sync(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        hashes = self._block_hashes(candidate_replicas, pending_request)
        policy = self._kv["policy"]
        order = policy.rank(self._loads(candidate_replicas), hashes)
        if order:
            self._chose(order[0])
        matched = 0
        if hashes and order:  # the decision, as metrics: how much of the prompt the chosen replica holds
            match = self._kv["index"].match(hashes, [order[0]])[order[0]]
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
            self._kv["index"].apply(order[0], [("stored", "hbm", hashes)])
        self._traced(
            pending_request,
            policy.name,
            order,
            **{"ridgeline.router.prompt_blocks": len(hashes), "ridgeline.router.matched_blocks": matched},
        )
        return [[by_id[replica_id]] for replica_id in order]
