"""Speculative decoding in the engine: drafts verified in one pass never change greedy outputs, keep the
sampling distribution exact (chi-square), respect stops and budgets, and leak no KV blocks."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampling_params import SamplingParams as Params
from engine.spec.drafter import NgramDrafter, make_drafter
from engine.spec.verify import verify

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
# chi-square critical values at alpha = 0.001 (from the chi-square table), by degrees of freedom
CHI2_CRIT_001 = {7: 24.32}


def _prompts():
    gen = torch.Generator().manual_seed(4)
    randoms = [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (5, 19, 34, 50)]
    return randoms + [[7, 8, 9, 10] * 10, [100 + i % 13 for i in range(60)]]  # repetitive: drafts hit


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_outputs_are_identical_with_drafts_and_fewer_steps(llama):
    prompts = _prompts()
    plain = LLM(llama, num_blocks=128)
    reference = _tokens(plain.generate(prompts, GREEDY))
    llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=4)
    assert _tokens(llm.generate(prompts, GREEDY)) == reference  # batched
    assert [_tokens(llm.generate([p], GREEDY))[0] for p in prompts] == reference  # alone
    stats = llm.engine.stats
    assert stats.spec_accepted_tokens > 0 and stats.spec_draft_tokens >= stats.spec_accepted_tokens
    # accepted-length accounting: every token streamed came from a step's sample or an accepted draft
    assert stats.generated_tokens == stats.sample_events + stats.spec_accepted_tokens == 2 * len(prompts) * 40
    assert llm.engine.block_manager.num_free_blocks == 128
    alone = LLM(llama, num_blocks=128)
    steps = LLM(llama, num_blocks=128, speculative_method="ngram")
    alone.generate([prompts[4]], GREEDY)
    steps.generate([prompts[4]], GREEDY)
    assert steps.engine.stats.steps < alone.engine.stats.steps  # accepted drafts saved whole steps


def test_drafts_respect_stop_tokens_max_tokens_and_preemption(llama):
    prompts = _prompts()
    for params in (
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[371, 116]),
    ):
        want = _tokens(LLM(llama, num_blocks=128).generate(prompts, params))
        got = _tokens(LLM(llama, num_blocks=128, speculative_method="ngram").generate(prompts, params))
        assert got == want
    # a pool too small for the batch: preemption (and dropped drafts) never change tokens or leak blocks
    small = LLM(llama, num_blocks=12, enable_prefix_caching=False, speculative_method="ngram")
    assert _tokens(small.generate(prompts, GREEDY)) == _tokens(
        LLM(llama, num_blocks=128).generate(prompts, GREEDY)
    )
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.block_manager.num_free_blocks == 12


def test_sampled_requests_with_drafts_finish_with_their_budget(llama):
    llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=3)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, ignore_eos=True, seed=3, logprobs=2)
    outs = llm.generate(_prompts(), params)
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 30 and len(c.logprobs) == 30
        assert all(t in lp for t, lp in zip(c.token_ids, c.logprobs, strict=True))
    again = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=3).generate(
        _prompts(), params
    )
    assert _tokens(again) == _tokens(outs)  # seeded: reproducible


def _request(params: Params) -> Request:
    return Request("r", [1, 2, 3], params)


@pytest.mark.parametrize("drafts", [[2, 5], [0, 0], [7, 3]])
def test_rejection_sampling_keeps_the_target_distribution(drafts):
    """First emitted token ~ p0 whatever the drafts; given the first draft was kept, the next ~ p1."""
    V, N = 8, 20_000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=gen) * 1.5
    p = logits.softmax(dim=-1)
    request = _request(Params(temperature=1.0, seed=11))
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(N):
        tokens, accepted = verify(logits, drafts, request)
        assert len(tokens) == accepted + 1 and tokens[:accepted] == drafts[:accepted]
        first[tokens[0]] += 1
        if tokens[0] == drafts[0]:
            second[tokens[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        expected = counts.sum() * probs
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_CRIT_001[V - 1], (chi2, counts.tolist(), expected.tolist())


def test_greedy_verification_accepts_the_argmax_prefix():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 9, 1]):
        logits[row, best] = 5.0
    request = _request(Params(temperature=0.0))
    assert verify(logits, [3, 4, 9], request) == ([3, 4, 9, 1], 3)  # all right: plus the bonus
    assert verify(logits, [3, 7, 9], request) == ([3, 4], 1)  # the first miss is replaced by the argmax
    assert verify(logits, [0, 4, 9], request) == ([3], 0)


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    drafter = NgramDrafter(ngram_min=1, ngram_max=3)
    request = Request("r", [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7], Params())
    assert drafter.propose(request, 2) == [9, 2]  # "5 6 7" last seen before 9 2 (latest match wins)
    assert drafter.propose(request, 0) == []
    assert drafter.propose(Request("r", [1, 2, 3, 4], Params()), 3) == []  # nothing repeats
    with pytest.raises(ValueError, match="ngram_min"):
        NgramDrafter(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="speculative_method"):
        make_drafter("eagle")


def test_a_draft_model_in_process_never_changes_outputs(tiny_model, llama):
    prompts = _prompts()
    reference = _tokens(LLM(llama, num_blocks=128).generate(prompts, GREEDY))
    # the target drafting for itself: its greedy drafts are the answer (up to float ties between batch shapes)
    same = LLM(llama, num_blocks=128, speculative_model=llama, num_speculative_tokens=3)
    assert _tokens(same.generate(prompts, GREEDY)) == reference
    stats = same.engine.stats
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens / stats.spec_draft_tokens > 0.9
    assert stats.spec_verifications > 0.9 * stats.steps - 2 * len(prompts)  # every decode step was drafted
    # another model (other weights, same tokenizer): many drafts fail, outputs stay the target's
    other = LLM(
        llama, num_blocks=128, speculative_model=tiny_model("llama", seed=1), num_speculative_tokens=3
    )
    assert _tokens(other.generate(prompts, GREEDY)) == reference
    stats = other.engine.stats
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens < stats.spec_draft_tokens
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, ignore_eos=True, seed=3)
    sampled = _tokens(other.generate(prompts, params))
    assert all(len(t) == 20 for t in sampled)
    for llm in (same, other):
        assert llm.engine.block_manager.num_free_blocks == 128
        draft = llm.engine.drafter.engine
        assert not draft.has_unfinished_requests() and draft.device == llm.engine.device


def test_bad_speculative_config_is_named(llama):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(llama, num_blocks=16, speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative_method"):
        LLM(llama, num_blocks=16, speculative_method="medusa")
    with pytest.raises(ValueError, match="speculative_model"):
        LLM(llama, num_blocks=16, speculative_method="draft_model")
    with pytest.raises(ValueError, match="speculative_model"):
        LLM(llama, num_blocks=16, speculative_method="ngram", speculative_model=llama)


def test_speculative_logprobs_equal_plain_decoding(llama):
    """Logprobs of verified drafts are the target's, one per token, as without speculation."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = _prompts()[-2:]  # repetitive: drafts hit
    plain = [o.outputs[0] for o in LLM(llama, num_blocks=128).generate(prompts, params)]
    spec_llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=4)
    spec = [o.outputs[0] for o in spec_llm.generate(prompts, params)]
    for s, p in zip(spec, plain, strict=True):
        assert s.token_ids == p.token_ids and len(s.logprobs) == len(s.token_ids)
        for got, want in zip(s.logprobs, p.logprobs, strict=True):
            assert got.keys() == want.keys()
            assert all(abs(got[t] - want[t]) < 1e-4 for t in want)
    assert spec_llm.engine.stats.spec_accepted_tokens > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_verify_steps_padded_to_one_shape_keep_greedy_outputs(llama, backend):
    """Requests that drafted different lengths get padding rows (earlier positions' queries, no K/V
    written) so a verify step has one (batch, 1 + k) shape, as CUDA graphs replay it; the decode kernel
    (Triton, interpreted here) and the reference take it, and greedy outputs do not change."""
    prompts = _prompts()[3:] + [[5, 6, 7] * 6]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = _tokens(LLM(llama, num_blocks=128).generate(prompts, params))
    llm = LLM(llama, num_blocks=128, speculative_method="ngram", attention_backend=backend)
    runner = llm.engine.runner
    runner.pad_verify_steps = True
    shapes = []
    prepare = runner.prepare

    def spy(sched):
        inputs = prepare(sched)
        lens = {n for _, n in sched.scheduled}
        if len(lens) > 1 and inputs.attn.uniform_query_len:
            shapes.append((len(sched.scheduled), inputs.attn.uniform_query_len))
        return inputs

    runner.prepare = spy
    assert _tokens(llm.generate(prompts, params)) == want
    assert shapes  # some steps were padded to one shape
    assert llm.engine.block_manager.num_free_blocks == 128
