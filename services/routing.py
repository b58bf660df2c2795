"""Ray Serve request routers that ask the control plane's policies which replica should take a request.

Each replica reports its engine load through `record_routing_stats` (every stats period); the router adds
its own count of requests it has sent to each replica and not yet seen complete, updated on every
send, so a burst arriving between two stats reports does not pile onto one replica.
"""

from collections import Counter

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from control_plane.kv_index import KVIndex
from control_plane.router import KVAwarePolicy, LeastLoadedPolicy, ReplicaLoad
from engine.block_hash import hash_extra, prompt_block_hashes
from observability import metrics  # (a module: Serve pickles this class by value, metrics hold locks)
from services.worker_protocol import WorkerRequest


class LeastLoadedRequestRouter(FIFOMixin, RequestRouter):
    policy = LeastLoadedPolicy()

    @property
    def _inflight(self) -> Counter:
        return self.__dict__.setdefault("_inflight_by_replica", Counter())

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve calls it for every request sent; completion undoes it
        self._inflight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._inflight[replica_id.unique_id] > 0:
            self._inflight[replica_id.unique_id] -= 1

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        total = stats.get("kv_total_blocks") or 1
        return ReplicaLoad(replica.replica_id.unique_id, self._inflight[replica.replica_id.unique_id],
                           stats.get("running", 0), stats.get("waiting", 0), stats.get("kv_free_blocks", total) / total)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = self.policy.rank([self._load(r) for r in candidate_replicas])
        return [[by_id[replica_id]] for replica_id in order]  # one rank each: try the best first


class KVAwareRequestRouter(LeastLoadedRequestRouter):
    """Sends a request where its prompt's KV already is (control_plane/router.py:KVAwarePolicy), from an
    exact index of every replica's blocks, kept current from the KV event batches replicas put in their
    routing stats (services/kv_feed.py)."""

    @property
    def _kv(self) -> dict:
        state = self.__dict__.get("_kv_state")
        if state is None:
            index = KVIndex()
            state = self.__dict__["_kv_state"] = {"index": index, "policy": KVAwarePolicy(index), "seen": {}}
        return state

    def _sync(self, replicas: list[RunningReplica]) -> None:
        index, seen = self._kv["index"], self._kv["seen"]
        live = {r.replica_id.unique_id for r in replicas}
        for gone in [rid for rid in seen if rid not in live]:  # dead or removed replicas
            index.drop(gone)
            del seen[gone]
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
                continue  # nothing to build on yet: wait for a snapshot
            batches = [b for b in feed["batches"] if b[0] > last]
            if batches and batches[0][0] != last + 1:  # fell behind what the replica keeps
                index.drop(rid)
                seen.pop(rid, None)
                continue
            for batch_seq, events in batches:
                index.apply(rid, events)
                last = batch_seq
            seen[rid] = last

    def _block_hashes(self, replicas: list[RunningReplica], pending_request: PendingRequest | None) -> list[bytes]:
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        stats = next((r.routing_stats for r in replicas if r.routing_stats), None)
        if not isinstance(request, WorkerRequest) or not stats or "kv_fingerprint" not in stats:
            return []
        extra = hash_extra(stats["kv_fingerprint"], stats["kv_dtype"], request.cache_salt)
        return prompt_block_hashes(request.prompt_token_ids, stats["block_size"], extra)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._sync(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        hashes = self._block_hashes(candidate_replicas, pending_request)
        policy = self._kv["policy"]
        order = policy.rank([self._load(r) for r in candidate_replicas], hashes)
        if hashes and order:  # the decision, as metrics: how much of the prompt the chosen replica holds
            match = self._kv["index"].match(hashes, [order[0]])[order[0]]
            counts = {"hbm": match.hbm, "dram": match.dram, "ssd": match.ssd}
            metrics.ROUTER_DECISIONS.labels(policy.name, next((t for t, n in counts.items() if n), "none")).inc()
            for tier, n in counts.items():
                metrics.ROUTER_MATCHED_BLOCKS.labels(policy.name, tier).inc(n)
            metrics.ROUTER_PROMPT_BLOCKS.labels(policy.name).inc(len(hashes))
        return [[by_id[replica_id]] for replica_id in order]
