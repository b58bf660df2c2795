"""Same-node GPU→GPU block copies through CUDA IPC, the data path the NIXL transport takes when owner and
puller share a host and both pools live on GPUs (NIXL stays the control path: metadata, release
notifications). The owner exports its pool once (torch's CUDA IPC handle); a puller maps it once per
owner and copies blocks with device copies (cudaMemcpy / peer copies), one per run of consecutive ids.
"""

import os
import socket

import torch
from torch.multiprocessing.reductions import reduce_tensor

from services.transport import block_copy


def host_id() -> str:
    """Same value in every process of one machine (and boot), different across machines."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


def export_pool(pool: torch.Tensor) -> dict:
    """What a puller on this host needs to map the pool: picklable, made once per pool."""
    rebuild, args = reduce_tensor(pool)
    return {"host": host_id(), "pid": os.getpid(), "rebuild": rebuild, "args": args}


def open_pool(export: dict) -> torch.Tensor:
    """Map an owner's pool into this process (keep the result: mapping is the expensive part)."""
    return export["rebuild"](*export["args"])


def copy_blocks(
    src_pool: torch.Tensor, src_ids: list[int], dst_pool: torch.Tensor, dst_ids: list[int]
) -> None:
    """dst_pool[dst_ids] = src_pool[src_ids] on the destination GPU, then wait for the copies."""
    block_copy.copy_blocks(src_pool, src_ids, dst_pool, dst_ids)
