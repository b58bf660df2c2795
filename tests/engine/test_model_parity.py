"""Our forward pass equals transformers' for every supported family (fp32, tight tolerance)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLMEngine, SamplingParams
from engine.request import EngineRequest
from engine.tiny_model import ARCHS

ATOL = 1e-4


def _our_logits(engine: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits for all prompts, scheduled together as one flattened batch."""
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=1)))
    sched = engine.scheduler.schedule()
    assert len(sched.scheduled) == len(prompts)
    inputs = engine.runner.prepare(sched)
    logits = engine.model.compute_logits(engine.runner.forward(inputs))
    qs = inputs.attn.query_start_loc_cpu
    return [logits[qs[i] : qs[i + 1]] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(tiny_model, arch):
    path = tiny_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = LLMEngine.from_pretrained(path, num_blocks=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, engine.model_config.vocab_size, (n,), generator=gen).tolist() for n in (1, 7, 16, 45)
    ]  # one token, odd, exactly one block, past the sliding window
    ours = _our_logits(engine, prompts)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got.float().cpu(), want, atol=ATOL, rtol=0)  # the engine may run on a GPU


def test_logits_match_with_chunks_and_cached_context(tiny_model):
    """Logits of a prompt computed in three chunks over the paged cache equal the one-shot forward."""
    path = tiny_model("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = LLMEngine.from_pretrained(path, num_blocks=64, max_num_batched_tokens=13)
    prompt = torch.randint(
        0, engine.model_config.vocab_size, (37,), generator=torch.Generator().manual_seed(2)
    ).tolist()
    pieces = []
    forward = engine.runner.forward

    def recording_forward(inputs):
        hidden = forward(inputs)
        pieces.append(engine.model.compute_logits(hidden))
        return hidden

    engine.runner.forward = recording_forward
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=1)))
    while engine.has_unfinished_requests():
        engine.step()
    assert [p.shape[0] for p in pieces] == [13, 13, 11]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(torch.cat(pieces).float().cpu(), want, atol=ATOL, rtol=0)
