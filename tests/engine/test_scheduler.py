"""The scheduler alone, on model-free requests (tests/engine/scheduler_utils.py): budgets, batch slots,
chunked prefill, preemption and the update step's finishing rules."""

from scheduler_utils import NoStopStrings, create_requests, create_scheduler, run_step

from engine.request import RequestStatus
from engine.scheduler import Sampled


def test_every_step_keeps_the_token_budget_and_the_batch_slots():
    scheduler = create_scheduler(max_num_batched_tokens=16, max_num_seqs=3)
    requests = create_requests(5, prompt_len=20, max_tokens=6)
    for req in requests:
        scheduler.add_request(req)
    steps = 0
    while scheduler.has_unfinished_requests():
        sched = run_step(scheduler)
        assert sched.num_scheduled_tokens <= 16 and len(scheduler.running) <= 3
        steps += 1
        assert steps < 200
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6 for r in requests)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks
    assert scheduler.stats.generated_tokens == 30 and scheduler.stats.prompt_tokens_computed == 100


def test_a_decoding_request_and_a_new_prompt_share_a_step():
    scheduler = create_scheduler()
    first, second = create_requests(2, prompt_len=30)
    scheduler.add_request(first)
    run_step(scheduler)  # first is prefilled and now decodes
    scheduler.add_request(second)
    sched = scheduler.schedule()
    assert {r.request_id: n for r, n in sched.scheduled} == {"r0": 1, "r1": 30}


def test_a_prompt_larger_than_the_budget_is_chunked():
    scheduler = create_scheduler(max_num_batched_tokens=8)
    (req,) = create_requests(1, prompt_len=30, max_tokens=1)
    scheduler.add_request(req)
    chunks = [run_step(scheduler).num_scheduled_tokens for _ in range(4)]
    assert chunks == [8, 8, 8, 6] and req.status == RequestStatus.FINISHED_LENGTH


def test_memory_pressure_preempts_the_last_request_and_keeps_its_tokens():
    scheduler = create_scheduler(num_blocks=4, enable_prefix_caching=False)
    a, b = create_requests(2, prompt_len=32, max_tokens=8)  # 2 blocks each; the 33rd token needs a third
    scheduler.add_request(a)
    scheduler.add_request(b)
    run_step(scheduler)  # both prefilled: the pool is full
    sched = run_step(scheduler)  # a's second token needs a block: b gives its blocks back
    assert [r.request_id for r in sched.preempted] == ["r1"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_output_tokens == 1
    while scheduler.has_unfinished_requests():
        run_step(scheduler)
    assert a.num_output_tokens == b.num_output_tokens == 8 and scheduler.num_preemptions >= 1


def test_priority_preempts_a_preemptible_lower_class_for_a_batch_slot():
    scheduler = create_scheduler(policy="priority", max_num_seqs=2)
    batch = create_requests(1, priority=2, prefix="batch")[0]
    pinned = create_requests(1, priority=2, preemptible=False, prefix="pinned")[0]
    urgent = create_requests(1, priority=0, prefix="urgent")[0]
    scheduler.add_request(batch)
    scheduler.add_request(pinned)
    run_step(scheduler)
    scheduler.add_request(urgent)
    run_step(scheduler)
    assert {r.request_id for r in scheduler.running} == {"pinned0", "urgent0"}
    assert batch.status == RequestStatus.PREEMPTED


def test_update_finishes_at_a_stop_token_and_counts_accepted_drafts():
    scheduler = create_scheduler()
    (req,) = create_requests(1, prompt_len=10, max_tokens=20, stop_token_ids=[42])
    scheduler.add_request(req)
    run_step(scheduler, token=5)
    req.spec_token_ids, req.spec_len = [6, 7, 8], 3
    sched = scheduler.schedule()
    assert sched.scheduled == [(req, 4)]  # the last token and three drafts, verified at once
    # the first two drafts were right, the third was not: the model's own token there is 42, a stop id
    scheduler.update_from_output(sched, [Sampled(req, [6, 7, 42], [None] * 3, 3, 2)], NoStopStrings())
    assert req.output_token_ids == [5, 6, 7, 42] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason == 42
    assert (scheduler.stats.spec_draft_tokens, scheduler.stats.spec_accepted_tokens) == (3, 2)
