"""Prefix caching: shared full blocks are reused, counted, isolated by cache_salt, and evicted LRU."""

import torch

from engine import LLM, SamplingParams
from engine.kv.block_hash import hash_block, hash_extra, update_block_hashes
from engine.kv.block_manager import BlockManager
from engine.request import Request

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _ids(n, seed):
    return torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_shared_prefix_computes_only_the_uncached_suffix(llama):
    shared, tail_a, tail_b = _ids(40, 1), _ids(9, 2), _ids(11, 3)
    cold = LLM(llama, num_blocks=64, enable_prefix_caching=False)
    want = cold.generate(shared + tail_b, GREEDY)[0].outputs[0].token_ids

    llm = LLM(llama, num_blocks=64)
    llm.generate(shared + tail_a, GREEDY)
    before = llm.engine.stats.prompt_tokens_computed
    out = llm.generate(shared + tail_b, GREEDY)[0]
    # 40 shared tokens = 2 full blocks of 16 (32 tokens) + 8 in a partial block, which is not shared
    assert out.num_cached_tokens == 32
    assert llm.engine.stats.prompt_tokens_computed - before == len(shared + tail_b) - 32
    assert out.outputs[0].token_ids == want


def test_identical_prompt_recomputes_only_its_last_block(llama):
    prompt = _ids(48, 4)  # exactly 3 blocks
    llm = LLM(llama, num_blocks=64)
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32  # the last token's logits are needed, so block 3 is recomputed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_cache_salt_isolates_tenants(llama):
    prompt = _ids(40, 5)
    llm = LLM(llama, num_blocks=64)
    llm.generate(prompt, GREEDY, cache_salt="tenant-a")
    other = llm.generate(prompt, GREEDY, cache_salt="tenant-b")[0]
    same = llm.generate(prompt, GREEDY, cache_salt="tenant-a")[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 32


def test_generated_tokens_become_cacheable(llama):
    """A follow-up turn that extends prompt + answer hits blocks filled during decode."""
    llm = LLM(llama, num_blocks=64)
    prompt = _ids(20, 6)
    answer = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    follow_up = prompt + answer.outputs[0].token_ids + _ids(5, 7)
    out = llm.generate(follow_up, GREEDY)[0]
    assert out.num_cached_tokens == 48  # 50 computed tokens -> 3 full blocks


def _request(rid, tokens, block_size=4):
    req = Request(rid, tokens, SamplingParams(), hash_extra=b"x")
    update_block_hashes(req, block_size)
    return req


def test_block_hashes_chain_and_cover_full_blocks_only():
    req = _request("a", list(range(10)))
    assert len(req.block_hashes) == 2
    assert req.block_hashes[0] == hash_block(None, [0, 1, 2, 3], b"x")
    assert req.block_hashes[1] == hash_block(req.block_hashes[0], [4, 5, 6, 7], b"x")
    assert hash_block(None, [0, 1, 2, 3], b"y") != req.block_hashes[0]
    assert hash_extra("m", "bf16", None) != hash_extra("m", "bf16", "salt")


def test_block_manager_shares_refcounts_and_evicts_least_recent():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = _request("a", list(range(9)))
    assert bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    assert bm.num_free_blocks == 3

    b = _request("b", list(range(8)) + [99, 98])
    hits, n = bm.get_computed_blocks(b)
    assert n == 8 and [blk.block_id for blk in hits] == bm.block_ids("a")[:2]
    assert bm.allocate_slots(b, 2, hits)
    assert [bm.blocks[i].ref_cnt for i in bm.block_ids("a")] == [2, 2, 1]
    assert bm.num_free_blocks == 2

    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    # freed blocks stay findable until reused...
    assert bm.get_computed_blocks(_request("c", list(range(9))))[1] == 8
    # ...and reuse evicts them: taking all six overwrites the cached ones
    d = _request("d", [7] * 24)
    assert bm.allocate_slots(d, 24)
    assert bm.get_computed_blocks(_request("e", list(range(9))))[1] == 0
    assert not bm.allocate_slots(_request("f", [1] * 4), 4)  # full: refused, nothing changed
    assert bm.num_free_blocks == 0
