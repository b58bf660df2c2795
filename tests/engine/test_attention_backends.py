"""Both attention backends behind one interface give the same tokens (Triton runs interpreted on CPU)."""

import pytest
import torch

from engine import LLM, SamplingParams


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding window 24 < context
def test_triton_backend_equals_torch_backend(tiny_model, arch):
    path = tiny_model(arch)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (2, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # a 16-token budget splits the 30-token prompt over two steps: mixed prefill + decode steps happen
    options = dict(num_blocks=32, max_num_batched_tokens=16, enforce_eager=True)
    want = LLM(path, attention_backend="torch", **options).generate(prompts, params)
    triton_llm = LLM(path, attention_backend="triton", **options)
    got = triton_llm.generate(prompts, params)
    assert triton_llm.engine.runner.backend.name == "triton"
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
