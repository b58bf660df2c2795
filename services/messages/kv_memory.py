"""What the node's KV memory service (services/kv_memory/service.py) tells its clients: who it is, its block
layout, and the shared-memory pool a client on the same host may read directly."""

from dataclasses import dataclass

from services.transport import KVLayout


@dataclass(frozen=True)
class SharedMemoryPool:
    """KV blocks in a /dev/shm file that processes on one host map (services/kv_memory/shm.py): the
    service's DRAM tier, or a writer's staging pool. `incarnation`: the service's (a restarted service's
    pool is a new file); None for a staging pool."""

    path: str
    host: str
    capacity_blocks: int
    block_bytes: int
    incarnation: str | None = None


@dataclass(frozen=True)
class KVMemoryInfo:
    name: str
    incarnation: str  # new each time the actor (re)starts
    pid: int
    layout: KVLayout
    transport: str
    shm: SharedMemoryPool | None  # None: only the transport reaches the DRAM tier
    policy: dict[int, str]  # priority -> the lowest tier blocks of that class may live in
