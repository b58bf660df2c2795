"""The paged KV pool: one block-major tensor per worker, sized from a memory budget.

Layout [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]: one block across all layers is one
contiguous region (one NIXL descriptor, one copy for a tier move); each layer reads a strided view.
"""

import torch

from engine.config import CacheConfig
from engine.models import ModelConfig

CPU_DEFAULT_BUDGET = 512 * 2**20


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def kv_budget_bytes(cache: CacheConfig, device: torch.device) -> int:
    """The bytes the KV pools may take: kv_cache_memory_bytes, else what leaves the device's memory in use
    at gpu_memory_utilization of its total (CUDA), else CPU_DEFAULT_BUDGET."""
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - (1 - cache.gpu_memory_utilization) * total)
    return CPU_DEFAULT_BUDGET


def num_blocks_for(cache: CacheConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = kv_budget_bytes(cache, device)
    num = budget // bytes_per_block(cfg, cache.block_size, dtype)
    if num < 1:
        raise ValueError(
            f"kv_cache_memory_bytes: budget {budget} B holds no KV block of "
            f"{bytes_per_block(cfg, cache.block_size, dtype)} B"
        )
    return num


def allocate_kv_pool(
    num_blocks: int, cfg: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
    # zeroed, not empty: a masked read of an unwritten slot (batched CPU decode pads to the longest
    # sequence) must meet finite values, since NaN * 0 is still NaN
    return torch.zeros(shape, dtype=dtype, device=device)


def layer_views(pool: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: [num_blocks, 2, block_size, kv_heads, head_dim], strided views into the pool."""
    return [pool[:, i] for i in range(pool.shape[1])]
