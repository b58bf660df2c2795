"""KV precision by age in the engine (issue 23): a decoding request's old blocks move to the low-bit pool and
attention reads them there, exactly as the policy's reference would; nothing leaks under aborts,
preemption, n > 1, prefix hits or speculative decoding; bad policies are named."""

import re

import pytest
import torch

from benchmarks.kv_age_quality import AgedKVReference
from benchmarks.quant_quality import window_logits
from benchmarks.spec_acceptance import MODELS
from engine import LLM
from engine.config import CacheConfig
from engine.kv.age_policy import KVAgePolicy
from engine.kv.coded_pool import bytes_per_coded_block
from engine.kv.pool import bytes_per_block
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from kernels.turboquant import rotation_signs

TARGET = str(MODELS / "ridgeline-ref-target")
POLICY = KVAgePolicy(bits=4, sinks=16, window=32, seed=7)
# a second step down: 2 bits past 64 tokens (blocks are transcoded from their 4-bit codes)
HORIZON = KVAgePolicy(bits=4, sinks=16, window=32, horizon=64, low_bits=2, seed=7)
# 40 tokens: under sinks + window + a block, so the reference codes nothing at prompt positions either
PROMPT = list(range(300, 340))


def greedy(max_tokens: int, logprobs: int | None = 0, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs, **kw)


def token_logprobs(out) -> list[float]:
    o = out.outputs[0]
    return [lp[t] for t, lp in zip(o.token_ids, o.logprobs, strict=True)]


def assert_all_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_used_coded_blocks == 0
    assert not bm.req_blocks and not bm.req_aged


@pytest.fixture(scope="module", params=[POLICY, HORIZON], ids=["4-bit", "4-then-2-bit"])
def aged_run(request):
    policy = request.param
    llm = LLM(TARGET, device="cpu", dtype="float32", num_blocks=64, kv_age_policy=policy)
    seen_coded = []
    step = llm.engine.step

    def counting_step():
        outs = step()
        seen_coded.append(llm.engine.block_manager.num_used_coded_blocks)
        return outs

    llm.engine.step = counting_step
    out = llm.generate([PROMPT], greedy(96))[0]
    return llm, out, seen_coded, policy


def test_decode_reads_aged_blocks_as_the_policy_reference_does(aged_run):
    """Teacher-forced through a torch reference that reads each block at the bits the policy gives it at
    each query position, the aged engine's tokens get the logprobs the engine reported; the 16-bit engine's
    differ by far more, so the comparison can tell aging from none."""
    llm, out, seen_coded, policy = aged_run
    assert max(seen_coded) == (40 + 96 - 32) // 16 - 1  # every block past the sink and older than the window
    if policy.horizon is not None:  # those past the horizon in the 2-bit pool
        assert llm.engine.block_manager.coded_cached[1] and llm.engine.stats.kv_blocks_aged > max(seen_coded)
    tokens = out.outputs[0].token_ids
    aged = token_logprobs(out)

    plain = LLM(TARGET, device="cpu", dtype="float32", num_blocks=64, max_num_batched_tokens=256)
    plain_out = plain.generate([PROMPT], greedy(96))[0]
    engine = plain.engine
    cfg = engine.model_config
    signs = rotation_signs(POLICY.seed, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    layer_of = {view.data_ptr(): i for i, view in enumerate(engine.runner.kv_caches)}
    engine.runner.backend = AgedKVReference(policy, signs, layer_of, 16)
    logprobs = torch.log_softmax(window_logits(plain, PROMPT + tokens[:-1]).float(), -1)
    ref = [logprobs[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(tokens)]

    err = max(abs(a - r) for a, r in zip(aged, ref, strict=True))
    assert err < 2e-3, err
    # the 16-bit engine's tokens drift from the aged ones' once blocks are coded: compare while they agree
    plain_tokens, plain_lp = plain_out.outputs[0].token_ids, token_logprobs(plain_out)
    n = next((i for i, t in enumerate(plain_tokens) if t != tokens[i]), 96)
    drift = max((abs(a - p) for a, p in zip(aged[:n], plain_lp[:n], strict=True)), default=0.0)
    assert n < 96 or drift > 10 * err, (n, drift, err)


def test_an_fp8_recent_side_ages_as_the_reference_does():
    """An e4m3 pool under the age policy: recent blocks read with the layer's scales, older ones encoded from
    their e4m3 values. Teacher-forced through the reference given the engine's scales, the logprobs agree;
    the same reference without the e4m3 rounding agrees far less (as would codes made from the e4m3 bytes
    without their scales)."""
    llm = LLM(
        TARGET, device="cpu", dtype="float32", num_blocks=64, kv_age_policy=POLICY, kv_cache_dtype="fp8"
    )
    out = llm.generate([PROMPT], greedy(64))[0]
    assert llm.engine.stats.kv_blocks_aged > 0
    assert_all_free(llm)
    tokens, aged = out.outputs[0].token_ids, token_logprobs(out)
    scales = llm.engine.kv_format.scales
    plain = LLM(TARGET, device="cpu", dtype="float32", num_blocks=64, max_num_batched_tokens=256)
    engine = plain.engine
    cfg = engine.model_config
    signs = rotation_signs(POLICY.seed, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    layer_of = {view.data_ptr(): i for i, view in enumerate(engine.runner.kv_caches)}
    errors = []
    for base_scales in (scales, None):
        engine.runner.backend = AgedKVReference(POLICY, signs, layer_of, 16, base_scales=base_scales)
        logprobs = torch.log_softmax(window_logits(plain, PROMPT + tokens[:-1]).float(), -1)
        ref = [logprobs[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(tokens)]
        errors.append(max(abs(a - r) for a, r in zip(aged, ref, strict=True)))
    # 6e-3: the fp8 engine without aging is 4.6e-3 from this reference at its first tokens already
    assert errors[0] < 6e-3 and errors[1] > 5 * errors[0], errors


def test_blocks_return_to_both_pools(aged_run):
    llm, _, _, _ = aged_run
    assert_all_free(llm)
    # the released 16-bit blocks keep their hashes: the same prompt hits them, and decodes the same tokens
    again = llm.generate([PROMPT], greedy(96))[0]
    assert again.num_cached_tokens == 32
    assert again.outputs[0].token_ids == aged_run[1].outputs[0].token_ids
    assert_all_free(llm)


def test_capacity_split_follows_the_fraction(tiny_model):
    path = tiny_model("llama")
    budget = 4 * 2**20
    policy = KVAgePolicy(bits=4, sinks=0, window=16)
    llm = LLM(path, device="cpu", kv_cache_memory_bytes=budget, kv_age_policy=policy, kv_coded_fraction=0.5)
    bm, cfg = llm.engine.block_manager, llm.engine.model_config
    base = bytes_per_block(cfg, 16, llm.engine.kv_pool.dtype)
    coded = bytes_per_coded_block(cfg, 16, 4)
    assert bm.num_blocks == (budget // 2) // base and bm.num_coded_blocks == (budget // 2) // coded
    assert llm.engine.coded_kv.pools[0].codes.shape[0] == bm.num_coded_blocks
    # a row: head_dim 4-bit codes and an fp32 norm (12 B here, against 64 B of fp32)
    assert coded == cfg.num_layers * 2 * 16 * cfg.num_kv_heads * (cfg.head_dim // 2 + 4)
    # by default the split follows the longest request (512 tokens: 48 kept 16-bit, 464 coded) and keeps a
    # prefill chunk's worth of 16-bit blocks
    auto = LLM(
        path, device="cpu", kv_cache_memory_bytes=budget, kv_age_policy=policy, max_num_batched_tokens=256
    )
    bm = auto.engine.block_manager
    want = 464 * coded / (464 * coded + 48 * base)
    assert bm.num_coded_blocks * coded == pytest.approx(budget * want, abs=coded)
    assert bm.num_blocks * 16 >= 256 + 16
    # ... and a longer chunk takes 16-bit room from the coded pools, up to half the budget (past that, chunks
    # shrink to the free blocks)
    options = dict(device="cpu", kv_cache_memory_bytes=budget, kv_age_policy=policy)
    chunky = LLM(path, max_num_batched_tokens=4000, **options).engine.block_manager
    assert chunky.num_blocks * 16 >= 4000 + 16 and chunky.num_blocks > bm.num_blocks
    assert (
        LLM(path, max_num_batched_tokens=4096, **options).engine.block_manager.num_blocks
        == (budget // 2) // base
    )


def test_a_tight_16bit_pool_admits_what_it_holds_and_preempts_nobody(tiny_model):
    """Three 40-token prompts fit 10 16-bit blocks, but not their sinks, windows and open blocks at 120 tokens
    (5 blocks each): two run, the third waits for one to finish, and no decode loses its blocks to a prompt."""
    path = tiny_model("llama")
    policy = KVAgePolicy(bits=3, sinks=16, window=32)
    llm = LLM(path, device="cpu", num_blocks=10, num_coded_blocks=40, kv_age_policy=policy, max_num_seqs=4)
    engine, most = llm.engine, 0
    for i in range(3):
        engine.add_request(EngineRequest(f"t{i}", list(range(10 + i, 50 + i)), greedy(80, logprobs=None)))
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    assert most == 2 and engine.scheduler.num_preemptions == 0
    assert_all_free(llm)


def test_aborts_preemption_n_and_spec_leak_nothing(tiny_model):
    path = tiny_model("llama")
    policy = KVAgePolicy(bits=3, sinks=16, window=32)
    # a coded pool of 4 blocks fills, aging waits, and the 16-bit tails grow past the pool: preemption
    llm = LLM(path, device="cpu", num_blocks=10, num_coded_blocks=4, kv_age_policy=policy, max_num_seqs=4)
    prompts = [list(range(10 + i, 50 + i)) for i in range(3)]
    outs = llm.generate(prompts, greedy(80, logprobs=None))
    assert all(len(o.outputs[0].token_ids) == 80 for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)
    # n > 1: the samples share the prompt's blocks, which stay 16-bit; their own tail blocks age
    outs = llm.generate([prompts[0]], greedy(60, logprobs=None, n=2))
    assert [len(c.token_ids) for c in outs[0].outputs] == [60, 60]
    assert_all_free(llm)
    # an abort mid-decode, after blocks aged
    engine = llm.engine
    engine.add_request(EngineRequest("a", prompts[1], greedy(120, logprobs=None)))
    while engine.block_manager.num_used_coded_blocks == 0:
        engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(llm)

    spec = LLM(
        path, device="cpu", num_blocks=64, kv_age_policy=policy, speculative_method="ngram",
        num_speculative_tokens=3,
    )  # fmt: skip
    out = spec.generate([list(range(5, 20)) * 4], greedy(70, logprobs=None))[0]
    assert len(out.outputs[0].token_ids) == 70
    assert spec.engine.stats.spec_verifications > 0
    assert_all_free(spec)


def test_triton_mixed_format_kernels_match_the_torch_path(tiny_model, monkeypatch):
    """The engine on the Triton backend (interpreted here) reads codes with the mixed-format kernels; the
    torch backend decodes them by the reference. Small step budgets pack one request's decodes with the
    other's prefill chunks, whose context holds coded blocks too (the varlen coded kernel). Same tokens,
    close logprobs. (Not with an fp8 pool here: the interpreter rounds to e4m3 unlike torch, so the two
    backends' caches differ before aging; tests/kernels covers the kernels' e4m3 side.)"""
    import engine.attention.triton_backend as triton_backend

    path = tiny_model("llama")
    # a horizon too: the third format's columns (the kernels' own tests cover every width pair)
    policy = KVAgePolicy(bits=4, sinks=16, window=16, horizon=32, low_bits=2)
    opts = dict(device="cpu", dtype="float32", num_blocks=32, kv_age_policy=policy, max_num_batched_tokens=24)
    prompts = [list(range(40, 90)), list(range(100, 200))]
    a = LLM(path, attention_backend="torch", **opts).generate(prompts, greedy(24))
    varlen_steps = []
    kernel = triton_backend.coded_prefill_attention

    def spy(q, *args, **kwargs):
        varlen_steps.append(args[7].tolist())  # query_start_loc
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "coded_prefill_attention", spy)
    b = LLM(path, attention_backend="triton", **opts).generate(prompts, greedy(24))
    # some step packed a one-token decode with a prefill chunk over coded blocks
    assert any(
        any(y - x == 1 for x, y in zip(s, s[1:], strict=False)) and s[-1] > len(s) for s in varlen_steps
    )
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        diff = max(abs(u - v) for u, v in zip(token_logprobs(x), token_logprobs(y), strict=True))
        assert diff < 1e-3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"kv_age_policy": KVAgePolicy(bits=4, window=64, horizon=136, low_bits=2)},
            "kv_age_policy.horizon: got 136",
        ),
        ({"kv_age_policy": KVAgePolicy(window=40)}, "kv_age_policy.window: got 40"),
        ({"kv_age_policy": POLICY, "kv_coded_fraction": 1.0}, "kv_coded_fraction"),
        ({"kv_age_policy": POLICY, "num_coded_blocks": 8}, "only with num_blocks"),
        ({"kv_age_policy": {"bits": 4, "windw": 64}}, "unknown field(s) ['windw']"),
        ({"kv_age_policy": {"bits": "4"}}, "kv_age_policy.bits"),
        ({"kv_age_policy": {"bits": 5}}, "kv_age_policy.bits"),
    ],
)
def test_bad_policies_are_named(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CacheConfig(**options)


def test_a_dict_policy_is_taken():
    cache = CacheConfig(kv_age_policy={"bits": 3, "sinks": 0, "window": 64})
    assert cache.kv_age_policy == KVAgePolicy(bits=3, sinks=0, window=64)


def test_models_the_codec_cannot_take_are_refused(tiny_model):
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(tiny_model("mistral"), device="cpu", num_blocks=8, kv_age_policy=POLICY)
    with pytest.raises(ValueError, match="head_dim"):
        LLM(tiny_model("llama", head_dim=24), device="cpu", num_blocks=8, kv_age_policy=POLICY)


def test_a_later_turn_reuses_aged_blocks_where_its_policy_holds_them_coded(tiny_model):
    """Multi-turn: the first turn's old blocks were aged and their 16-bit originals reused, so the second
    turn (history + a new message) finds them as coded copies, at positions its policy codes anyway."""
    path = tiny_model("llama")
    llm = LLM(path, device="cpu", num_blocks=8, num_coded_blocks=40, kv_age_policy=KVAgePolicy(window=32))
    bm = llm.engine.block_manager
    first = llm.generate([PROMPT], greedy(100, logprobs=None))[0]
    assert bm.coded_cached  # aged copies of cached blocks stay findable after the request
    history = PROMPT + first.outputs[0].token_ids  # 140 tokens: 8 full blocks
    hits_seen = []
    lookup = bm.get_computed_blocks

    def spy(request, coded_ok=()):
        hits, n = lookup(request, coded_ok)
        plain_hits, _ = lookup(request)  # without the policy's permission
        hits_seen.append(([b.block_id >= bm.num_blocks for b in hits], coded_ok, len(plain_hits)))
        return hits, n

    bm.get_computed_blocks = spy
    second = llm.generate([history + list(range(60, 90))], greedy(20, logprobs=None))[0]
    coded_hits, coded_ok, num_plain_hits = hits_seen[0]
    assert second.num_cached_tokens == 8 * 16 and any(coded_hits)
    assert all(i in coded_ok[0] for i, c in enumerate(coded_hits) if c)  # never outside the policy's range
    assert coded_ok == [range(1, (170 - 32) // 16)]
    # without permission the prefix stops at the first block whose 16-bit original is gone
    assert num_plain_hits == coded_hits.index(True)
    assert_all_free(llm)


def test_an_slo_class_keeps_its_own_window(tiny_model):
    """kv_age_windows: priority 0 (interactive) keeps 64 recent tokens at full precision where the pool's
    policy keeps 16; its requests age fewer blocks, and a bad window is named."""
    path = tiny_model("llama")
    policy = KVAgePolicy(bits=4, sinks=16, window=16)
    engine = LLM(path, device="cpu", num_blocks=64, kv_age_policy=policy, kv_age_windows={0: 64}).engine
    prompt = list(range(40, 90))
    for rid, priority in (("interactive", 0), ("batch", 2)):
        engine.add_request(EngineRequest(rid, prompt, greedy(50, logprobs=None), priority=priority))
    coded = {}
    age = engine.block_manager.age

    def spy(request, blocks):
        coded[request.request_id] = blocks
        return age(request, blocks)

    engine.block_manager.age = spy
    while engine.has_unfinished_requests():
        engine.step()
    # context 100 at the last step: blocks 1 .. (100 - window) // 16 - 1 are coded
    assert coded["interactive"] == [range(1, (99 - 64) // 16)] and coded["batch"] == [
        range(1, (99 - 16) // 16)
    ]
    assert engine.block_manager.num_used_coded_blocks == 0
    with pytest.raises(ValueError, match=r"kv_age_windows: priority 0 got 40"):
        CacheConfig(kv_age_policy=policy, kv_age_windows={0: 40})
    with pytest.raises(ValueError, match="kv_age_windows: needs a kv_age_policy"):
        CacheConfig(kv_age_windows={0: 64})
    for name, value in (("kv_coded_fraction", 0.7), ("num_coded_blocks", 8)):
        with pytest.raises(ValueError, match=f"{name}: needs a kv_age_policy"):
            CacheConfig(num_blocks=8, **{name: value})
