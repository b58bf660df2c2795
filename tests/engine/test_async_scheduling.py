"""Async scheduling (step N+1 scheduled and launched before step N's tokens are read) is exact: with it on
and off the engine gives the same tokens, logprobs, texts and finish reasons under stops, max_tokens,
chunked prefill, prefix caching, preemption, n > 1, seeded sampling, penalties, drafts and aborts, and it
leaks no KV block. It runs on the CPU backend the same way (placeholders filled from the device tensor of
the step before)."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import EngineRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(n: int = 6, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 9, 70, 33, 5, 51][:n]
    return [torch.randint(4, 300, (k,), generator=gen).tolist() for k in lengths]


def _summary(outs):
    return [
        [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
            for c in o.outputs
        ]
        for o in outs
    ]


def _pair(model: str, **kwargs) -> tuple[LLM, LLM]:
    return LLM(model, async_scheduling=False, **kwargs), LLM(model, async_scheduling=True, **kwargs)


def _count_run_ahead(llm: LLM) -> list[int]:
    """Counts the requests launched while a step sampling their last token was still in flight."""
    seen = [0]
    launch = llm.engine.runner.launch

    def spy(sched):
        seen[0] += sum(
            start >= r.num_tokens for (r, _), start in zip(sched.scheduled, sched.starts, strict=True)
        )
        return launch(sched)

    llm.engine.runner.launch = spy
    return seen


def _assert_idle(llm: LLM, num_blocks: int) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == num_blocks
    assert all(not bm for bm in (engine.block_manager.req_blocks, engine.block_manager.req_block_ids))


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=11, max_tokens=20, ignore_eos=True, n=3),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[200, 201, 77]),
    ],
    ids=["greedy", "logprobs", "seeded-n3", "stop-ids"],
)
def test_outputs_equal_with_and_without_async_scheduling(llama, params):
    sync, ahead = _pair(llama, num_blocks=96, max_num_batched_tokens=48)  # chunked prefill mixes with decodes
    launched_ahead = _count_run_ahead(ahead)
    prompts = _prompts()
    assert _summary(ahead.generate(prompts, params)) == _summary(sync.generate(prompts, params))
    assert launched_ahead[0] > 0  # steps really were scheduled before the tokens of the one before
    _assert_idle(ahead, 96)


def test_stop_strings_and_streaming_text_match(llama):
    sync, ahead = _pair(llama, num_blocks=64)
    prompts = _prompts(3)
    full = sync.generate(prompts, GREEDY)
    stops = [o.outputs[0].text[5:8] for o in full]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[s]) for s in stops]
    want = _summary(sync.generate(prompts, params))
    assert _summary(ahead.generate(prompts, params)) == want
    assert any(c[2] == "stop" for o in want for c in o)
    # streamed: every delta arrives, in order, one step behind at most
    engine = ahead.engine
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"s{i}", p, params[i], stream=True))
    texts: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] = out.outputs[0].text
    assert [texts[f"s{i}"] for i in range(len(prompts))] == [o[0][1] for o in want]
    _assert_idle(ahead, 64)


def test_prefix_caching_and_preemption_match(llama):
    shared = (_prompts(8, seed=9)[4] + _prompts(8, seed=9)[7])[:96]  # six full blocks
    prompts = [shared + p for p in _prompts(6, seed=5)]
    want = _summary(LLM(llama, num_blocks=128, async_scheduling=False).generate(prompts, GREEDY))
    # a pool too small for the batch: requests are preempted, some while their last step is in flight
    for kwargs in (
        dict(num_blocks=128),
        dict(num_blocks=24),
        dict(num_blocks=24, enable_prefix_caching=False),
    ):
        sync, ahead = _pair(llama, **kwargs)
        assert _summary(sync.generate(prompts, GREEDY)) == want
        assert _summary(ahead.generate(prompts, GREEDY)) == want
        if kwargs["num_blocks"] == 24:
            assert ahead.engine.scheduler.num_preemptions > 0
        _assert_idle(ahead, kwargs["num_blocks"])
    sync, ahead = _pair(llama, num_blocks=128)
    for _ in range(2):  # the second time, the prompts' blocks are in the prefix cache
        assert _summary(sync.generate(prompts, GREEDY)) == _summary(ahead.generate(prompts, GREEDY)) == want
    assert ahead.engine.scheduler.prefix_hit_blocks == sync.engine.scheduler.prefix_hit_blocks > 0


def test_drafts_penalties_and_bias_stay_exact(llama):
    """Steps whose next step needs their tokens on the host (verification, penalties) are read first."""
    prompts = [[7, 8, 9, 10] * 8, [100 + i % 13 for i in range(40)], *_prompts(2)]
    want = _summary(LLM(llama, num_blocks=96, async_scheduling=False).generate(prompts, GREEDY))
    spec = LLM(llama, num_blocks=96, async_scheduling=True, speculative_method="ngram")
    assert _summary(spec.generate(prompts, GREEDY)) == want
    assert spec.engine.stats.spec_accepted_tokens > 0
    _assert_idle(spec, 96)
    penalized = SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3, logit_bias={5: 3.0}
    )
    sync, ahead = _pair(llama, num_blocks=96)
    mixed = [penalized, GREEDY, penalized, GREEDY]
    assert _summary(ahead.generate(prompts, mixed)) == _summary(sync.generate(prompts, mixed))


def test_max_tokens_is_never_run_past(llama):
    """A request whose in-flight token may be its last is not scheduled again: no wasted steps."""
    sync, ahead = _pair(llama, num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = _prompts(4)
    assert _summary(ahead.generate(prompts, params)) == _summary(sync.generate(prompts, params))
    assert ahead.engine.stats.scheduled_tokens == sync.engine.stats.scheduled_tokens


def test_abort_mid_overlap_leaks_no_blocks(llama):
    llm = LLM(llama, num_blocks=64, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, n=2)
    for i, p in enumerate(_prompts(4)):
        engine.add_request(EngineRequest(f"a{i}", p, params))
    finished: dict[str, object] = {}
    for step in range(60):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if step in (3, 6):  # decoding, a step in flight holding these requests
            assert engine._in_flight is not None
            engine.abort_request(f"a{step // 3 - 1}")
            engine.abort_request("a-unknown")
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    assert [finished[f"a{i}"].outputs[0].finish_reason for i in range(4)] == [
        "abort",
        "abort",
        "length",
        "length",
    ]
    _assert_idle(llm, 64)
    # the aborted requests' freed blocks were rewritten by the steps after: later outputs are unchanged
    assert _summary(llm.generate(_prompts(4), GREEDY)) == _summary(
        LLM(llama, num_blocks=64, async_scheduling=False).generate(_prompts(4), GREEDY)
    )
