"""Replica choice, first version: least loaded. No Ray, no torch: the Serve glue (services/routing.py)
feeds it loads and asks for a ranking; the KV-aware router replaces the policy, not the glue."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    ongoing: int = 0  # requests this router has sent there and not seen finish (fresh)
    running: int = 0  # the replica's own report (up to a stats period old)
    waiting: int = 0
    kv_free_fraction: float = 1.0


class LeastLoadedPolicy:
    """Fewest requests first (the larger of the router's fresh count and the replica's report), then the
    most free KV memory, then the replica id so ties break the same way everywhere."""

    name = "least_loaded"

    def rank(self, loads: list[ReplicaLoad]) -> list[str]:
        def key(load: ReplicaLoad):
            return max(load.ongoing, load.running + load.waiting), -load.kv_free_fraction, load.replica_id

        return [load.replica_id for load in sorted(loads, key=key)]
