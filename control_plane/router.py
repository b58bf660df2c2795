"""Replica choice: pluggable policies ranking replicas for one request. No Ray, no torch: the Serve glue
(services/routing.py) feeds them loads (and the request's block hashes) and asks for a ranking.

`LeastLoadedPolicy` looks at load only. `KVAwarePolicy` prices each replica as the work the request would
cost there: the blocks it would have to compute (those no tier of that replica holds), the blocks it would
load from DRAM or SSD (cheaper than computing, not free), and the requests already queued there. A prompt's
documents (RAG) count where a replica's document cache holds them, at any position."""

from dataclasses import dataclass

from control_plane.kv_index import DocumentEntries, KVIndex


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

    def rank(
        self,
        loads: list[ReplicaLoad],
        block_hashes: list[bytes] | None = None,
        documents: DocumentEntries = (),
        prompt_blocks: int | None = None,
    ) -> list[str]:
        def key(load: ReplicaLoad):
            return max(load.ongoing, load.running + load.waiting), -load.kv_free_fraction, load.replica_id

        return [load.replica_id for load in sorted(loads, key=key)]


@dataclass(frozen=True)
class TierCosts:
    """What serving one block from a tier costs, in units of computing it (HBM: free)."""

    hbm: float = 0.0
    dram: float = 0.1
    ssd: float = 0.5

    def __post_init__(self) -> None:
        for tier in ("hbm", "dram", "ssd"):
            if not 0.0 <= getattr(self, tier) <= 1.0:
                raise ValueError(
                    f"tier_costs.{tier}: got {getattr(self, tier)}, allowed 0..1 (of computing a block)"
                )


class KVAwarePolicy:
    """Cheapest replica for this request: blocks to compute + tier-weighted blocks to load + requests in
    flight there × `queue_weight` × this request's blocks (each one ahead delays it about as much as a
    fraction of computing it); ties by load, then id."""

    name = "kv_aware"

    def __init__(self, index: KVIndex, tier_costs: TierCosts = TierCosts(), queue_weight: float = 0.5):
        if queue_weight < 0:
            raise ValueError(f"queue_weight: got {queue_weight}, allowed >= 0")
        self.index, self.tier_costs, self.queue_weight = index, tier_costs, queue_weight

    def costs(
        self,
        loads: list[ReplicaLoad],
        block_hashes: list[bytes],
        documents: DocumentEntries = (),
        prompt_blocks: int | None = None,
    ) -> dict[str, float]:
        """block_hashes: the prompt's leading blocks that may be prefix hits (with documents, those before the
        first one); documents: (key, blocks) of its documents; prompt_blocks: all its blocks (default: as
        many as the hashes)."""
        ids = [load.replica_id for load in loads]
        matches = self.index.match(block_hashes, ids)
        held = self.index.held(documents, ids) if documents else {}
        total = len(block_hashes) if prompt_blocks is None else prompt_blocks
        out = {}
        for load in loads:
            c = self.tier_costs
            m = matches[load.replica_id]
            d = held.get(load.replica_id)
            hbm, dram, ssd = m.hbm, m.dram, m.ssd
            if d is not None:
                hbm, dram, ssd = hbm + d.hbm, dram + d.dram, ssd + d.ssd
            compute = max(total - hbm - dram - ssd, 0)
            queued = max(load.ongoing, load.running + load.waiting)
            queue = queued * self.queue_weight * max(total, 1)
            out[load.replica_id] = compute + hbm * c.hbm + dram * c.dram + ssd * c.ssd + queue
        return out

    def rank(
        self,
        loads: list[ReplicaLoad],
        block_hashes: list[bytes] | None = None,
        documents: DocumentEntries = (),
        prompt_blocks: int | None = None,
    ) -> list[str]:
        costs = self.costs(loads, block_hashes or [], documents, prompt_blocks)

        def key(load: ReplicaLoad):
            return (
                costs[load.replica_id],
                max(load.ongoing, load.running + load.waiting),
                -load.kv_free_fraction,
                load.replica_id,
            )

        return [load.replica_id for load in sorted(loads, key=key)]
