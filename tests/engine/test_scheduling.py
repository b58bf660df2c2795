"""Chunked prefill, preemption, batching and priority never change greedy tokens; budgets hold."""

import torch

from engine import LLM, SamplingParams
from engine.request import EngineRequest, RequestStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(n=4, lengths=(5, 19, 34, 50)):
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(4, 300, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_alone_and_batched_give_the_same_tokens(llama):
    llm = LLM(llama, num_blocks=128)
    prompts = _prompts()
    batched = _tokens(llm, prompts)
    alone = [_tokens(llm, [p])[0] for p in prompts]
    assert batched == alone


def test_chunked_prefill_gives_the_same_tokens(llama):
    prompts = _prompts()
    reference = _tokens(LLM(llama, num_blocks=128), prompts)
    llm = LLM(llama, num_blocks=128, max_num_batched_tokens=8)
    steps_before = llm.engine.stats.steps
    assert _tokens(llm, prompts) == reference
    # 108 prompt tokens at 8 per step cannot take fewer than 14 steps of prefill
    assert llm.engine.stats.steps - steps_before >= 14


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(llama):
    prompts = _prompts(6)
    reference = _tokens(LLM(llama, num_blocks=128), prompts)
    # 6 requests of up to 74 tokens need ~30 blocks at once; 9 blocks force recompute preemption
    llm = LLM(llama, num_blocks=9, enable_prefix_caching=False)
    assert _tokens(llm, prompts) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 9


def test_priority_policy_serves_lower_value_first_and_preempts_for_it(llama):
    llm = LLM(
        llama,
        num_blocks=6,
        scheduling_policy="priority",
        enable_prefix_caching=False,
        max_num_batched_tokens=256,
    )
    engine = llm.engine
    long_params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request(EngineRequest("background", _prompts()[2], long_params, priority=10))
    engine.step()
    engine.add_request(EngineRequest("urgent", _prompts()[3], long_params, priority=0))
    engine.step()  # urgent's 50 tokens need 4 blocks; background holds 3 of 6: it must give way
    states = {r.request_id: r.status for r in engine.scheduler.running + engine.scheduler.waiting}
    assert states["urgent"] == RequestStatus.RUNNING
    assert states["background"] == RequestStatus.PREEMPTED
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["urgent", "background"]


def test_a_higher_class_takes_a_full_batch_slot_from_a_preemptible_lower_one(llama):
    llm = LLM(llama, num_blocks=64, scheduling_policy="priority", max_num_seqs=2)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request(EngineRequest("batch-a", _prompts()[0], params, priority=2))
    engine.add_request(EngineRequest("pinned", _prompts()[1], params, priority=2, preemptible=False))
    engine.step()
    engine.add_request(EngineRequest("interactive", _prompts()[2], params, priority=0))
    engine.step()  # both slots taken: the preemptible batch request gives up its slot, the pinned one keeps it
    running = {r.request_id for r in engine.scheduler.running}
    assert running == {"pinned", "interactive"}
    assert engine.scheduler.waiting[0].request_id == "batch-a"
    assert engine.scheduler.waiting[0].status == RequestStatus.PREEMPTED
    engine.add_request(EngineRequest("interactive-2", _prompts()[3], params, priority=0))
    engine.step()  # nothing left that may be preempted for it: it waits
    assert {r.request_id for r in engine.scheduler.running} == running
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    want = {
        o.request_id: o for o in LLM(llama, num_blocks=64).generate([_prompts()[0]], params)
    }  # the preempted request's tokens are unchanged by the recompute
    assert outs["batch-a"].outputs[0].token_ids == next(iter(want.values())).outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == 64


def test_every_step_second_is_charged_to_the_requests_in_it(llama):
    llm = LLM(llama, num_blocks=64, max_num_batched_tokens=16)
    engine = llm.engine
    busy = engine.stats.busy_seconds
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    spent = engine.stats.busy_seconds - busy
    assert spent > 0
    assert abs(sum(o.compute.seconds for o in outs) - spent) < 1e-9 * max(1.0, spent)
    for prompt, out in zip(prompts, outs, strict=True):
        c = out.compute
        # every prompt token computed once; a decode token per generated position but the last sampled
        assert c.prefill_tokens == len(prompt) and c.decode_tokens == 5
        assert c.prefill_seconds > 0 and c.decode_seconds > 0


def test_fcfs_never_preempts_a_running_request_for_a_newcomer(llama):
    llm = LLM(llama, num_blocks=6, enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request(EngineRequest("first", _prompts()[2], params, priority=10))
    engine.step()
    engine.add_request(EngineRequest("second", _prompts()[3], params, priority=0))
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["first"]


def test_abort_frees_blocks_and_reports_abort(llama):
    llm = LLM(llama, num_blocks=32)
    engine = llm.engine
    engine.add_request(EngineRequest("x", _prompts()[3], GREEDY))
    engine.step()
    assert engine.block_manager.num_free_blocks < 32
    engine.abort_request("x")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.outputs[0].finish_reason) for o in outs] == [("x", True, "abort")]
    assert engine.block_manager.num_free_blocks == 32
    assert not engine.has_unfinished_requests()
