"""Piecewise graphs' layout (static buffers, token buckets, attention between the pieces) on the CPU, where
the pieces run eagerly: mixed steps give the plain forward's hidden states and the same greedy tokens.
The GPU test (captured and replayed) is in test_gpu_engine.py."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kv.pool import layer_views
from engine.piecewise_graphs import PiecewiseGraphRunner, token_buckets
from engine.request import EngineRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, 300, (n,), generator=gen).tolist() for n in (3, 45, 19, 70, 8)]


def _attach(llm: LLM, max_tokens: int) -> PiecewiseGraphRunner:
    engine = llm.engine
    runner = PiecewiseGraphRunner(
        engine.model,
        layer_views(engine.kv_pool),
        engine.runner.backend,
        engine.config.cache.block_size,
        max_tokens,
        engine.device,
    )
    engine.runner.piecewise = runner
    return runner


def test_token_buckets_cover_every_count_with_bounded_padding():
    buckets = token_buckets(1000)
    assert buckets[0] == 8 and buckets[-1] == 1000 and buckets == sorted(set(buckets))
    for t in range(1, 1001):
        b = next(b for b in buckets if b >= t)
        assert b - t < max(t, 256)


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])  # q/k norms; MoE rows
def test_mixed_steps_match_the_plain_forward(tiny_model, arch):
    path = tiny_model(arch)
    options = dict(num_blocks=96, max_num_batched_tokens=40, async_scheduling=False)
    want = LLM(path, **options).generate(_prompts(), GREEDY)
    llm = LLM(path, **options)
    runner = _attach(llm, 40)
    # one mixed step checked in depth: hidden states of a padded bucket equal the plain forward's
    engine = llm.engine
    for p in _prompts()[:3]:
        engine.add_request(EngineRequest(engine.new_request_id("pw"), p, GREEDY))
    engine.step()  # prefill chunks
    sched = engine.scheduler.schedule()
    assert len({n for _, n in sched.scheduled}) > 1  # a decode beside a prefill chunk: variable lengths
    inputs = engine.runner.prepare(sched)
    assert next(b for b in runner.buckets if b >= len(inputs.input_ids)) > len(inputs.input_ids)  # padded
    pieces = engine.runner.forward(inputs).clone()
    engine.runner.piecewise = None
    plain = engine.runner.forward(inputs)
    torch.testing.assert_close(pieces, plain, rtol=1e-5, atol=1e-5)
    engine.runner.piecewise = runner
    engine._update(engine.runner.launch(sched), 0.0)  # the step, as the engine runs it
    while engine.has_unfinished_requests():
        engine.step()
    got = llm.generate(_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert engine.block_manager.num_free_blocks == 96
