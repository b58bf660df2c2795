"""Ray Serve request router that asks the control plane's policy which replica should take a request.

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

from control_plane.router import LeastLoadedPolicy, ReplicaLoad


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
