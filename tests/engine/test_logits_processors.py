"""Penalties, logit_bias and min_tokens (engine/logits_processors.py): the batched device code against a
row-by-row reference of OpenAI's and vLLM's definitions, against HF transformers' processors, and in the
engine's greedy generation against transformers' generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from engine import LLM, SamplingParams
from engine.logits_processors import LogitsRow, apply_logits_processing
from engine.request import Request

V = 50


def request(prompt, output, eos=(0,), **params) -> Request:
    r = Request("r", list(prompt), SamplingParams(**params), eos_token_ids=frozenset(eos))
    r.output_token_ids = list(output)
    return r


def reference_row(logits: torch.Tensor, r: Request, drafts: list[int]) -> torch.Tensor:
    """One row, written from the definitions, token by token."""
    p, x = r.params, logits.clone()
    output = r.output_token_ids + drafts
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(r.eos_token_ids) | set(p.stop_token_ids):
            x[t] = float("-inf")
    for t in set(r.prompt_token_ids + output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def test_a_mixed_batch_equals_the_row_by_row_reference():
    g = torch.Generator().manual_seed(0)
    rows = [
        LogitsRow(request([1, 2, 3], [4, 4, 5], presence_penalty=0.7, frequency_penalty=-0.4), []),
        LogitsRow(request([1, 2], []), []),  # nothing asked: untouched
        LogitsRow(request([7, 8, 9], [9, 10], repetition_penalty=1.8), [11, 9]),  # a draft position
        LogitsRow(request([3], [5], logit_bias={6: 5.0, 7: -100.0}, min_tokens=4, stop_token_ids=[8]), []),
        LogitsRow(
            request([2, 2], [3, 3, 3], repetition_penalty=0.6, frequency_penalty=2.0, logit_bias={3: 1.5}),
            [3],
        ),
    ]
    logits = torch.randn(len(rows), V, generator=g) * 3
    got = apply_logits_processing(logits, rows)
    for i, row in enumerate(rows):
        assert torch.allclose(got[i], reference_row(logits[i], row.request, row.drafts), atol=1e-5), i
    assert torch.equal(got[1], logits[1])
    assert got[3, 0] == float("-inf") and got[3, 8] == float("-inf")  # EOS and a stop id before min_tokens


def test_nothing_asked_returns_the_same_tensor():
    logits = torch.randn(2, V)
    assert apply_logits_processing(logits, [LogitsRow(request([1], [2]), [])] * 2) is logits


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(1)
    prompt, output = [3, 9, 9, 14], [20, 3, 31]
    logits = torch.randn(1, V, generator=g) * 4
    ours = apply_logits_processing(logits, [LogitsRow(request(prompt, output, repetition_penalty=1.35), [])])
    hf = RepetitionPenaltyLogitsProcessor(1.35)(torch.tensor([prompt + output]), logits.clone())
    assert torch.allclose(ours, hf, atol=1e-6)


def test_min_tokens_holds_back_eos_even_when_biased_to_it(llama):
    llm = LLM(llama, num_blocks=64, max_model_len=128)
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=5, logit_bias={eos: 100.0})
    (out,) = llm.generate(["Hello there"], params)
    assert out.outputs[0].token_ids[-1] == eos and len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "engine, hf",
    [
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"min_tokens": 30}, {"min_new_tokens": 30}),
    ],
)
def test_greedy_generation_with_penalties_equals_transformers_generate(llama, engine, hf):
    """The engine's batched path in a real decode loop against HF's own processors."""
    llm = LLM(llama, num_blocks=64, max_model_len=128)
    model = AutoModelForCausalLM.from_pretrained(llama, torch_dtype=torch.float32)
    prompts = ["The quick brown fox", "Hello"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, **engine))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([out.prompt_token_ids])
        want = model.generate(
            ids, do_sample=False, max_new_tokens=30, eos_token_id=llm.tokenizer.eos_token_id, **hf
        )[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == want, prompt


def test_frequency_penalty_stops_greedy_repeats(llama):
    llm = LLM(llama, num_blocks=64, max_model_len=128)
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (base,) = llm.generate(["Hello"], plain)
    (penalized,) = llm.generate(
        ["Hello"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=2.0)
    )
    tokens = base.outputs[0].token_ids
    assert len(set(tokens)) < len(tokens), "the tiny model's greedy output should repeat itself"
    fewer = penalized.outputs[0].token_ids
    assert max(fewer.count(t) for t in fewer) < max(tokens.count(t) for t in tokens)


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", float("nan")),
        ("repetition_penalty", 0.0),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {3: 101.0}),
        ("min_tokens", -1),
    ],
)
def test_out_of_range_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_over_max_tokens_and_ids_past_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={V: 1.0}).check_vocab(V)


def test_speculative_decoding_with_penalties_equals_plain_decoding(llama):
    """Each verified draft position counts the drafts before it: spec decoding changes no token."""
    params = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, frequency_penalty=0.3, repetition_penalty=1.2
    )
    prompts = ["one two one two one two one two", "Hello"]
    plain = LLM(llama, num_blocks=128).generate(prompts, params)
    spec_llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=4)
    spec = spec_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert spec_llm.engine.stats.spec_draft_tokens > 0, "no draft was verified: the test proves nothing"
