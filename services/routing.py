"""Ray Serve request router that asks the control plane's policy which replica should take a request.

Each replica reports its engine load through `record_routing_stats`; the router adds its own count of
requests in flight per replica (updated on every send, so a burst does not pile onto one replica).
"""

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from control_plane.router import LeastLoadedPolicy, ReplicaLoad


class LeastLoadedRequestRouter(FIFOMixin, RequestRouter):
    policy = LeastLoadedPolicy()

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        total = stats.get("kv_total_blocks") or 1
        ongoing = self.replica_queue_len_cache.get(replica.replica_id) or 0
        return ReplicaLoad(replica.replica_id.unique_id, ongoing, stats.get("running", 0), stats.get("waiting", 0),
                           stats.get("kv_free_blocks", total) / total)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = self.policy.rank([self._load(r) for r in candidate_replicas])
        return [[by_id[replica_id]] for replica_id in order]  # one rank each: try the best first
