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
