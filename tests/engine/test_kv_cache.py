"""The KV pool: block-major layout, sized from a memory budget, layers as strided views."""

import pytest
import torch

from engine import LLM
from engine.kv.pool import bytes_per_block, layer_views


def test_pool_is_sized_from_the_memory_budget(llama):
    llm = LLM(llama, kv_cache_memory_bytes=1_000_000)
    cfg, pool = llm.engine.model_config, llm.engine.kv_pool
    per_block = bytes_per_block(cfg, 16, torch.float32)
    assert per_block == cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    assert pool.shape == (1_000_000 // per_block, cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    assert llm.engine.block_manager.num_blocks == pool.shape[0]


def test_a_block_across_all_layers_is_one_contiguous_region(llama):
    pool = LLM(llama, num_blocks=8).engine.kv_pool
    assert pool.is_contiguous()
    block = pool[3]
    assert (
        block.is_contiguous()
        and block.data_ptr() == pool.data_ptr() + 3 * pool.stride(0) * pool.element_size()
    )
    views = layer_views(pool)
    views[1][3, 0, 5] = 7.0  # layer 1, block 3, K, slot 5
    assert pool[3, 1, 0, 5].eq(7.0).all()


def test_a_budget_too_small_for_one_block_is_an_error(llama):
    with pytest.raises(ValueError, match=r"^kv_cache_memory_bytes: budget 100 B holds no KV block"):
        LLM(llama, kv_cache_memory_bytes=100)


def test_a_fresh_pool_holds_no_garbage(llama):
    """Padded reads of unwritten slots meet zeros, never NaN left in recycled memory."""
    for _ in range(3):
        junk = torch.full((2_000_000,), float("nan"))  # dirty the allocator's free memory
        del junk
        pool = LLM(llama, num_blocks=64).engine.kv_pool
        assert torch.isfinite(pool).all()
