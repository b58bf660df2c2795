"""The engine's GPU path (Triton backend, CUDA graphs) gives the CPU reference path's greedy tokens."""

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (3, 21, 40)]  # 3 rows: padded to 4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_greedy_equals_cpu_reference(tiny_model, arch, enforce_eager):
    path = tiny_model(arch)
    cpu = LLM(path, device="cpu", num_blocks=64).generate(_prompts(), GREEDY)
    gpu_llm = LLM(path, device="cuda", num_blocks=64, max_num_seqs=8, enforce_eager=enforce_eager)
    assert gpu_llm.engine.runner.backend.name == "triton"
    assert (gpu_llm.engine.runner.graphs is None) == enforce_eager
    gpu = gpu_llm.generate(_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_gpu_chunked_prefill_and_prefix_hits_match(tiny_model):
    path = tiny_model("llama")
    prompts = _prompts()
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", num_blocks=64).generate(prompts, GREEDY)]
    llm = LLM(path, device="cuda", num_blocks=64, max_num_seqs=8, max_num_batched_tokens=16)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want
    again = llm.generate(prompts, GREEDY)  # second time: prefix hits, then graphs
    assert [o.outputs[0].token_ids for o in again] == want
    assert again[2].num_cached_tokens == 32


def test_bf16_on_gpu_stays_close_to_fp32(tiny_model):
    path = tiny_model("llama")
    prompt = _prompts()[2]
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    ref = LLM(path, device="cuda", num_blocks=64, enforce_eager=True).generate(prompt, one)[0].outputs[0]
    half = LLM(path, device="cuda", num_blocks=64, dtype="bfloat16").generate(prompt, one)[0].outputs[0]
    common = set(ref.logprobs[0]) & set(half.logprobs[0])
    assert len(common) >= 3
    assert max(abs(ref.logprobs[0][t] - half.logprobs[0][t]) for t in common) < 0.1


def _verify_graph_replays(llm) -> list[int]:
    """Counts graph replays of verification shapes (more than one token a sequence)."""
    graphs = llm.engine.runner.graphs
    seen = [0]
    replay = graphs.replay

    def spy(num_seqs, query_len):
        seen[0] += query_len > 1
        return replay(num_seqs, query_len)

    graphs.replay = spy
    return seen


def test_gpu_verify_graphs_equal_eager(tiny_model):
    """Verification of k drafts replays a captured (batch, 1 + k) graph and gives eager's tokens. Batched,
    requests draft different lengths (eager); alone, each verify step has one shape (a graph)."""
    path = tiny_model("llama")
    prompts = [[7, 8, 9, 10] * 8, [100 + i % 13 for i in range(40)], *_prompts()]
    spec = dict(
        device="cuda", num_blocks=64, max_num_seqs=8, speculative_method="ngram", num_speculative_tokens=3
    )
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", num_blocks=64).generate(prompts, GREEDY)]
    eager = LLM(path, enforce_eager=True, **spec)
    graphed = LLM(path, **spec)
    assert sorted(graphed.engine.runner.graphs.sizes) == [1, 2, 3, 4]
    replays = _verify_graph_replays(graphed)
    assert [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)] == want
    assert [o.outputs[0].token_ids for o in graphed.generate(prompts, GREEDY)] == want
    assert [graphed.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts] == want
    assert replays[0] > 0 and graphed.engine.stats.spec_accepted_tokens > 0


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True, logprobs=2, n=2),
    ],
    ids=["greedy", "seeded-logprobs"],
)
def test_gpu_async_scheduling_equals_sync(tiny_model, params):
    path = tiny_model("llama")
    options = dict(device="cuda", num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32)
    sync = LLM(path, async_scheduling=False, **options).generate(_prompts(), params)
    ahead_llm = LLM(path, **options)
    assert ahead_llm.engine.async_scheduling  # the default on a GPU
    ahead = ahead_llm.generate(_prompts(), params)
    summary = lambda outs: [[(c.token_ids, c.logprobs) for c in o.outputs] for o in outs]  # noqa: E731
    assert summary(ahead) == summary(sync)
    assert ahead_llm.engine.block_manager.num_free_blocks == 64


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_gpu_piecewise_graphs_equal_cpu_for_mixed_steps(tiny_model, arch):
    """Prefill chunks packed with decodes (variable lengths) replay the piecewise graphs and give the CPU
    reference's tokens; eager on the GPU gives them too."""
    path = tiny_model(arch)
    prompts = [*_prompts(), [5 + i % 50 for i in range(90)]]
    want = [o.outputs[0].token_ids for o in LLM(path, device="cpu", num_blocks=64).generate(prompts, GREEDY)]
    options = dict(device="cuda", num_blocks=64, max_num_seqs=8, max_num_batched_tokens=24)
    graphed = LLM(path, cuda_graph_max_tokens=512, **options)
    runner = graphed.engine.runner.piecewise
    assert runner is not None and runner.buckets == [8, 16, 24]
    replays = [0]
    run = runner.run

    def spy(input_ids, positions, attn):
        replays[0] += 1
        return run(input_ids, positions, attn)

    runner.run = spy
    assert [o.outputs[0].token_ids for o in graphed.generate(prompts, GREEDY)] == want
    assert replays[0] > 0
    eager = LLM(path, enforce_eager=True, cuda_graph_max_tokens=512, **options)
    assert eager.engine.runner.piecewise is None
    assert [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])  # qkv bias and a shared expert in qwen2_moe
def test_gpu_skinny_gemm_everywhere_equals_cpu_reference(tiny_model, arch, monkeypatch):
    from engine import gemm_tuning

    monkeypatch.setattr(gemm_tuning, "MIN_GAIN", -100.0)  # the kernel wins every (shape, rows) point
    path = tiny_model(arch)
    cpu = LLM(path, device="cpu", num_blocks=64).generate(_prompts(), GREEDY)
    llm = LLM(path, device="cuda", num_blocks=64, max_num_seqs=8)
    table = llm.engine.gemm_table
    assert table and all(row["chosen"] for row in table)
    gpu = llm.generate(_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in gpu] == [o.outputs[0].token_ids for o in cpu]


def test_gpu_fp8_weights_stay_close_to_bf16(tiny_model):
    """W8A8 prefill on the FP8 tensor cores and e4m3 decode GEMMs give bf16's next-token distribution
    within quantization error (the tiny random model: logprobs, not tokens)."""
    from kernels.fp8 import supports_fp8

    if not supports_fp8(torch.device("cuda")):
        pytest.fail("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    path = tiny_model("llama")
    prompt = _prompts()[2]
    one = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5)
    ref = LLM(path, device="cuda", num_blocks=64, dtype="bfloat16").generate(prompt, one)[0].outputs[0]
    fp8 = LLM(path, device="cuda", num_blocks=64, dtype="bfloat16", quantization="fp8")
    out = fp8.generate(prompt, one)[0].outputs[0]
    common = set(ref.logprobs[0]) & set(out.logprobs[0])
    assert len(common) >= 3
    assert max(abs(ref.logprobs[0][t] - out.logprobs[0][t]) for t in common) < 0.15


@pytest.mark.parametrize("mode", ["graphs", "piecewise", "eager", "graphs-horizon"])
def test_gpu_kv_aging_equals_cpu_reference(tiny_model, mode):
    """KV precision by age on the GPU: decode graphs (and piecewise graphs for mixed steps, and eager) read
    the low-bit pool with the mixed-format kernel; the CPU's torch path decodes the codes by the
    reference. Same tokens, close logprobs, and both pools empty at the end. (An fp8 pool is not compared
    this way: the CPU and the GPU engine calibrate their own KV scales, so their caches differ before aging;
    an fp8 case here failed on an H100 at 7cfebae.)"""
    from engine.kv.age_policy import KVAgePolicy

    path = tiny_model("llama")
    prompts = [*_prompts(), [5 + i % 50 for i in range(90)]]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=0)
    horizon = {"horizon": 48, "low_bits": 2} if mode == "graphs-horizon" else {}
    policy = KVAgePolicy(bits=4, sinks=16, window=16, **horizon)
    opts = dict(num_blocks=64, kv_age_policy=policy, max_num_batched_tokens=24)
    want = LLM(path, device="cpu", **opts).generate(prompts, params)
    extra = {"piecewise": {"cuda_graph_max_tokens": 512}, "eager": {"enforce_eager": True}}.get(
        mode, {"cuda_graph_max_tokens": 0}
    )  # graphs: decode and verify graphs only
    llm = LLM(path, device="cuda", max_num_seqs=8, **opts, **extra)
    got = llm.generate(prompts, params)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        lp = lambda o: [d[t] for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]  # noqa: E731
        assert max(abs(a - b) for a, b in zip(lp(w), lp(g), strict=True)) < 5e-3
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == 64 and bm.num_used_coded_blocks == 0
