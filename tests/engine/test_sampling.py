"""Sampling semantics: seeds, n, stop strings and ids, EOS, max_tokens, logprobs, filters."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.request import EngineRequest
from engine.sampler import apply_filters

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42]]


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(llama, num_blocks=128)


def _greedy(llm, prompt, max_tokens=24):
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return out[0].outputs[0]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate([PROMPTS[1], PROMPTS[0]], [noisy, params])[1].outputs[0].token_ids
    other_seed = (
        llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
    )
    assert alone == again == batched
    assert other_seed != alone


def test_n_returns_n_completions(llm):
    out = llm.generate(
        PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    greedy = llm.generate(PROMPTS[0], SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_string_ends_the_text_before_it(llm):
    full = _greedy(llm, PROMPTS[0])
    stop = full.text[6:9]
    cut = full.text.find(stop)
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (full.text[:cut], "stop", stop)
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    kept = llm.generate(
        PROMPTS[0],
        SamplingParams(
            temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True
        ),
    )[0]
    assert kept.outputs[0].text == full.text[: cut + len(stop)]


def test_stop_token_id_ends_the_sequence_and_is_kept(llm):
    full = _greedy(llm, PROMPTS[1])
    stop_id = full.token_ids[5]
    k = full.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]))[
        0
    ].outputs[0]
    assert out.token_ids == full.token_ids[: k + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_eos_stops_unless_ignored(tiny_model, llm):
    full = _greedy(llm, PROMPTS[0])
    eos = full.token_ids[3]
    k = full.token_ids.index(eos)
    same_weights_new_eos = LLM(tiny_model("llama", eos_token_id=eos), num_blocks=64)
    stopped = same_weights_new_eos.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert stopped.outputs[0].token_ids == full.token_ids[: k + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", None)
    ignored = same_weights_new_eos.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    )[0]
    assert ignored.outputs[0].token_ids == full.token_ids
    assert ignored.outputs[0].finish_reason == "length"


def test_logprobs_are_the_model_log_softmax(llama, llm):
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    )[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0] + out.token_ids])).logits[0].log_softmax(-1)
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(PROMPTS[0]) - 1 + i]
        top = row.topk(3)
        assert list(entry) == top.indices.tolist()  # greedy: the sampled token is the top-1
        for tok, val in entry.items():
            assert math.isclose(val, row[tok].item(), abs_tol=1e-4)
        total += entry[token]
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-6)


def test_filters_that_keep_one_token_equal_greedy(llm):
    want = _greedy(llm, PROMPTS[1], 12).token_ids
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        got = (
            llm.generate(
                PROMPTS[1], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, **params)
            )[0]
            .outputs[0]
            .token_ids
        )
        assert got == want, params


def test_top_k_samples_only_from_the_top_k(llm):
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=5.0, top_k=2, seed=5, max_tokens=30, ignore_eos=True, logprobs=2),
    )[0].outputs[0]
    # the entry holds the sampled token plus the top 2: two entries means the sample was one of them
    assert all(len(entry) == 2 for entry in out.logprobs)
    # and at temperature 5 the second-best token is drawn sometimes
    assert any(
        max(entry, key=entry.get) != tok for tok, entry in zip(out.token_ids, out.logprobs, strict=True)
    )


def test_apply_filters_keeps_the_documented_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    kept = apply_filters(
        logits,
        top_k=torch.tensor([4, 2, 4]),
        top_p=torch.tensor([0.8, 1.0, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.4]),
    ).isfinite()
    assert kept.tolist() == [
        [True, True, False, False],  # top_p 0.8: 0.5 + 0.3 reaches it
        [True, True, False, False],  # top_k 2
        [True, True, False, False],  # min_p 0.4 of 0.5 = 0.2
    ]


def test_streamed_outputs_grow_to_the_final_only_output(llm):
    """stream=True reports every step (cumulative); stream=False (LLM.generate) only the end: same text."""
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    final = llm.generate(PROMPTS[1], params)[0].outputs[0]
    engine = llm.engine
    engine.add_request(EngineRequest("streamed", PROMPTS[1], params, stream=True))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0] for o in engine.step()]
    assert len(seen) == 20
    assert [len(c.token_ids) for c in seen] == list(range(1, 21))
    assert all(final.text.startswith(c.text) for c in seen)
    assert (seen[-1].text, seen[-1].token_ids, seen[-1].finish_reason) == (
        final.text,
        final.token_ids,
        "length",
    )
