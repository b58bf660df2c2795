"""The engine side of disaggregation: a prefill engine holds a request's KV, a decode engine adopts copied
blocks and continues. Outputs equal a single engine's, greedy and seeded."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest

PROMPTS = [[5, 9, 13, 2, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [8, 3, 99]]


def run(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    return outs


def copy_block(prefill: LLMEngine, decode: LLMEngine, src: int, dst: int) -> None:
    """One block's KV as it is, from whichever pool holds it (16-bit or coded) to the same one."""
    k = prefill.block_manager.pool_of(src)
    if k < 0:
        decode.kv_pool[dst] = prefill.kv_pool[src]
        return
    a, b = prefill.coded_kv.pools[k], decode.coded_kv.pools[k]
    assert decode.block_manager.pool_of(dst) == k and a.format == b.format
    b.raw[dst - b.first_id] = a.raw[src - a.first_id]


def handoff(prefill: LLMEngine, decode: LLMEngine, rid: str, prompt: list[int], params: SamplingParams):
    """Prefill one token holding the KV, copy the blocks, resume on the decode engine (coded blocks go to its
    coded pool of the same width, as a transport puts them)."""
    first_params = SamplingParams(**{**params.__dict__, "max_tokens": 1})
    prefill.add_request(EngineRequest(rid, prompt, first_params, hold_kv=True))
    (first,) = run(prefill)
    src = prefill.kv_handoff.held(rid)
    coded = [prefill.block_manager.pool_of(b) for b in src]
    reserved = decode.kv_handoff.reserve(rid, len(prompt), prompt, coded=coded)
    dst, skip = reserved.block_ids, reserved.num_cached_blocks
    assert len(src) == len(dst) == -(-len(prompt) // prefill.block_manager.block_size)
    for s, d in zip(src[skip:], dst[skip:], strict=True):  # cached blocks already hold this KV
        copy_block(prefill, decode, s, d)
    prefill.kv_handoff.release(rid)
    decode.add_request(
        EngineRequest(
            rid, prompt, params, output_token_ids=first.outputs[0].token_ids, kv_computed_tokens=len(prompt)
        )
    )
    (out,) = run(decode)
    return out


@pytest.fixture
def engines(llama):
    return (
        LLMEngine.from_pretrained(llama, num_blocks=64, enable_prefix_caching=False),
        LLMEngine.from_pretrained(llama, num_blocks=64, enable_prefix_caching=False),
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_handoff_equals_one_engine(llama, engines, params):
    prefill, decode = engines
    want = [o.outputs[0] for o in LLM(llama, num_blocks=64).generate(PROMPTS, params)]
    for i, prompt in enumerate(PROMPTS):
        got = handoff(prefill, decode, f"r{i}", prompt, params).outputs[0]
        assert got.token_ids == want[i].token_ids
        assert got.text == want[i].text
    # every block returned on both sides
    assert prefill.block_manager.num_free_blocks == decode.block_manager.num_free_blocks == 64


def test_decode_computes_only_new_tokens(engines):
    prefill, decode = engines
    handoff(prefill, decode, "r", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert decode.stats.prompt_tokens_computed == 0
    assert (
        decode.stats.scheduled_tokens == 3
    )  # the first token (from prefill) and two more; the 4th is sampled


def test_held_blocks_stay_until_released(engines):
    prefill, _ = engines
    prefill.add_request(EngineRequest("r", PROMPTS[0], SamplingParams(max_tokens=1), hold_kv=True))
    run(prefill)
    held = prefill.kv_handoff.held("r")
    assert len(held) == 2 and prefill.block_manager.num_free_blocks == 62
    prefill.kv_handoff.release("r")
    assert prefill.block_manager.num_free_blocks == 64


def test_aborted_hold_request_frees_blocks(engines):
    prefill, _ = engines
    prefill.add_request(EngineRequest("r", PROMPTS[0], SamplingParams(max_tokens=1), hold_kv=True))
    prefill.abort_request("r")
    run(prefill)
    assert prefill.block_manager.num_free_blocks == 64 and prefill.kv_handoff.held("r") == []


def test_free_reserved_returns_blocks(engines):
    _, decode = engines
    assert len(decode.kv_handoff.reserve("r", 40).block_ids) == 3
    decode.kv_handoff.free_reserved("r")
    assert decode.block_manager.num_free_blocks == 64


def test_reserve_fails_cleanly_when_memory_is_short(engines):
    _, decode = engines
    assert decode.kv_handoff.reserve("big", 64 * 16 + 1) is None
    assert decode.block_manager.num_free_blocks == 64


def test_bad_handoff_arguments(engines):
    _, decode = engines
    with pytest.raises(ValueError, match="kv_computed_tokens"):
        decode.add_request(
            EngineRequest("r", PROMPTS[1], SamplingParams(), output_token_ids=[4], kv_computed_tokens=3)
        )
    decode.kv_handoff.reserve("r2", 3)
    with pytest.raises(ValueError, match="kv_computed_tokens"):
        decode.add_request(
            EngineRequest("r2", PROMPTS[1], SamplingParams(), output_token_ids=[4], kv_computed_tokens=4)
        )
    with pytest.raises(ValueError, match="n:"):
        decode.add_request(EngineRequest("r3", PROMPTS[1], SamplingParams(n=2), output_token_ids=[4]))
    with pytest.raises(ValueError, match="max_tokens"):
        decode.add_request(
            EngineRequest("r4", PROMPTS[1], SamplingParams(max_tokens=1), output_token_ids=[4])
        )
    with pytest.raises(ValueError, match="num_tokens"):
        decode.kv_handoff.reserve("r5", 0)
    assert torch.all(decode.kv_pool == 0)  # nothing was computed by rejected requests


def test_decode_reuses_its_cached_prefix_and_pulls_only_the_rest(llama):
    prefill = LLMEngine.from_pretrained(llama, num_blocks=64)
    decode = LLMEngine.from_pretrained(llama, num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    shared = list(range(40, 72))  # two full blocks
    first, second = shared + [5, 6, 7], shared + [9, 10, 11, 12, 13]
    handoff(prefill, decode, "a", first, params)
    reserved = decode.kv_handoff.reserve("probe", len(second), second)
    assert reserved.num_cached_blocks == 2  # the shared blocks stayed cached after "a" finished
    decode.kv_handoff.free_reserved("probe")
    got = handoff(prefill, decode, "b", second, params).outputs[0].token_ids
    want = LLM(llama, num_blocks=64).generate([second], params)[0].outputs[0].token_ids
    assert got == want


def test_cache_salt_keeps_tenants_apart_on_reuse(llama):
    decode = LLMEngine.from_pretrained(llama, num_blocks=64)
    prompt = list(range(40, 75))
    decode.add_request(EngineRequest("warm", prompt, SamplingParams(max_tokens=1), cache_salt="tenant-a"))
    run(decode)
    assert (
        decode.kv_handoff.reserve("same", len(prompt), prompt, cache_salt="tenant-a").num_cached_blocks == 2
    )
    assert (
        decode.kv_handoff.reserve("other", len(prompt), prompt, cache_salt="tenant-b").num_cached_blocks == 0
    )


def test_handoff_into_an_aging_decode_pool_equals_one_aging_engine(llama):
    """A 16-bit prefill pool hands a long prompt's KV to a decode pool with a KV age policy: the decode side
    ages the adopted blocks from its first step, exactly as one aging engine does."""
    from engine.kv.age_policy import KVAgePolicy

    aging = {"kv_age_policy": KVAgePolicy(bits=4, sinks=16, window=16), "num_blocks": 64}
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = [5 + i % 70 for i in range(70)]
    want = LLM(llama, **aging).generate([prompt], params)[0].outputs[0].token_ids
    prefill = LLMEngine.from_pretrained(llama, num_blocks=64)
    decode = LLMEngine.from_pretrained(llama, **aging)
    got = handoff(prefill, decode, "r", prompt, params).outputs[0].token_ids
    assert got == want
    assert decode.stats.kv_blocks_aged >= (70 + 30 - 16) // 16 - 1
    assert decode.block_manager.num_free_blocks == 64 and decode.block_manager.num_used_coded_blocks == 0


def test_an_aging_prefill_pool_hands_its_coded_blocks_over_as_they_are(llama):
    """A prefill pool with a KV age policy codes a long prompt's old blocks while it computes the prompt in
    chunks; the decode pool takes them coded, into its own pool of that width, and goes on exactly as one
    aging engine does. Nothing stays allocated on either side."""
    from engine.kv.age_policy import KVAgePolicy

    aging = {
        "kv_age_policy": KVAgePolicy(bits=4, sinks=16, window=16),
        "num_blocks": 64,
        "max_num_batched_tokens": 32,
    }
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompt = [5 + i % 70 for i in range(100)]
    want = LLM(llama, **aging).generate([prompt], params)[0].outputs[0].token_ids
    prefill = LLMEngine.from_pretrained(llama, **aging)
    decode = LLMEngine.from_pretrained(llama, **aging)
    prefill.add_request(EngineRequest("probe", prompt, SamplingParams(max_tokens=1), hold_kv=True))
    run(prefill)
    held = [prefill.block_manager.pool_of(b) for b in prefill.kv_handoff.held("probe")]
    assert held.count(0) >= 2, held  # the chunks before the last one were aged
    prefill.kv_handoff.release("probe")
    prefill.block_manager.reset_prefix_cache()
    got = handoff(prefill, decode, "r", prompt, params).outputs[0].token_ids
    assert got == want
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == 64 and engine.block_manager.num_used_coded_blocks == 0
    # the adopted coded blocks were cached as coded copies, never as 16-bit prefix blocks
    bm = decode.block_manager
    assert bm.coded_cached[0] and all(b.block_id < bm.num_blocks for b in bm.cached.values())


def test_reserving_coded_blocks_is_checked(llama):
    from engine.kv.age_policy import KVAgePolicy

    decode = LLMEngine.from_pretrained(llama, kv_age_policy=KVAgePolicy(bits=4, window=16), num_blocks=8)
    with pytest.raises(ValueError, match="coded: got 1 entries, allowed one per block"):
        decode.kv_handoff.reserve("r", 40, coded=[0])
    with pytest.raises(ValueError, match=r"coded: pool indices allowed -1..0"):
        decode.kv_handoff.reserve("r", 40, coded=[0, 1, -1])
    free = decode.block_manager.num_coded_blocks  # one more than the coded pool has: that one is 16-bit
    big = decode.kv_handoff.reserve("big", 16 * (free + 1), coded=[0] * (free + 1))
    assert [decode.block_manager.pool_of(b) for b in big.block_ids] == [0] * free + [-1]
    decode.kv_handoff.free_reserved("big")
    reserved = decode.kv_handoff.reserve("r", 40, coded=[-1, 0, 0])
    assert [decode.block_manager.pool_of(b) for b in reserved.block_ids] == [-1, 0, 0]
    decode.kv_handoff.free_reserved("r")
    assert decode.block_manager.num_used_coded_blocks == 0 and decode.block_manager.num_free_blocks == 8
