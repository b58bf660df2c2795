"""Greedy generations equal transformers' `generate`, token for token, with our requests batched."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.tiny_model import ARCHS

NEW_TOKENS = 32


def hf_greedy(path: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare full-length runs
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        out.append(gen[0, len(p) :].tolist())
    return out


def prompts_for(vocab: int, lengths=(3, 11, 20, 33)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_equals_transformers_generate(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(path, num_blocks=128)
    prompts = prompts_for(llm.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert ours == hf_greedy(path, prompts, NEW_TOKENS)
