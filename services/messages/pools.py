"""Pools and what a worker is told about its place in one: a pool as the registry and /v1/pools describe
it, the KV tiers below a worker's HBM, and where its drafts come from."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PoolDescription:
    name: str
    role: str  # prefill | decode | aggregated | draft
    device: str
    replicas: int
    num_cpus: float
    price_per_hour: float
    price_is_default: bool
    num_gpus: float = 0.0
    autoscaling: dict | None = None
    weight_dtype: str = "auto"
    kv_dtype: str = "auto"
    kv_age_policy: dict | None = (
        None  # KV precision by age (engine/kv/age_policy.py fields), if the pool has one
    )
    router: str | None = None
    kv_memory: str = "replica"
    kv_dram_blocks: int = 0
    kv_ssd_blocks: int = 0
    model: str | None = None  # a draft pool's checkpoint

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TierSettings:
    """The KV tiers below a worker's HBM: a DRAM pool (and an SSD slab) in the replica, or the node's KV
    memory service (`service`); `policy` is each SLO priority's lowest tier."""

    dram_blocks: int
    ssd_dir: str | None = None
    ssd_blocks: int = 0
    service: bool = False
    staging_blocks: int = 64  # service mode: host blocks staged for offload
    use_shm: bool = True  # service mode: copy through shared memory on the same host
    policy: dict[int, str] = field(default_factory=dict)


@dataclass
class DraftSettings:
    """A decode worker's draft pool: proposals older than `deadline_s` are dropped; a step waits up to
    `wait_s` for its own (0: pipelined); `pool` names the pool its drafts are charged to."""

    pool_handle: Any  # the DraftWorker deployment's handle
    deadline_s: float = 0.5
    wait_s: float = 0.0
    pool: str = "draft"
