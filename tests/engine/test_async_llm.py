"""AsyncLLM: concurrent async streams equal the offline engine; abandoned streams free their blocks."""

import asyncio
import threading
import time

import pytest

from engine import LLM, SamplingParams
from engine.async_llm import AsyncLLM, EngineDeadError, EngineStalledError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [40] * 20]


@pytest.fixture(scope="module")
def async_llm(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64)
    yield llm
    llm.shutdown()


async def _collect(llm, rid, prompt, params=GREEDY):
    outs = [o async for o in llm.generate(rid, prompt, params)]
    return outs


def test_concurrent_streams_equal_offline_generate(llama, async_llm):
    want = [o.outputs[0].token_ids for o in LLM(llama, num_blocks=64).generate(PROMPTS, GREEDY)]

    async def main():
        return await asyncio.gather(*(_collect(async_llm, f"c{i}", p) for i, p in enumerate(PROMPTS)))

    results = asyncio.run(main())
    assert [r[-1].outputs[0].token_ids for r in results] == want
    assert all(r[-1].finished and not any(o.finished for o in r[:-1]) for r in results)
    assert [len(o.outputs[0].token_ids) for o in results[0]] == list(range(1, 13))


def test_abandoned_stream_is_aborted_and_frees_its_blocks(async_llm):
    free = async_llm.engine.block_manager.num_free_blocks
    generated = async_llm.engine.stats.generated_tokens
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = async_llm.generate("abandoned", [7] * 30, long)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()  # what a client disconnect does to the response generator

    asyncio.run(main())
    engine = async_llm.engine
    for _ in range(500):  # the abort lands before the engine's next step, which then forgets the request
        if (
            async_llm.num_unfinished() == 0
            and not engine.has_unfinished_requests()
            and engine.block_manager.num_free_blocks == free
        ):
            break
        time.sleep(0.01)
    assert async_llm.num_unfinished() == 0
    assert engine.block_manager.num_free_blocks == free
    assert not engine.has_unfinished_requests()
    assert engine.stats.generated_tokens - generated < 100  # aborted, not run to 400


def test_bad_request_raises_value_error_at_once(async_llm):
    async def main():
        async for _ in async_llm.generate("bad", [], GREEDY):
            pass

    with pytest.raises(ValueError, match="^prompt: must not be empty"):
        asyncio.run(main())
    assert async_llm.num_unfinished() == 0


def test_a_consumer_whose_event_loop_closed_does_not_stop_the_engine(async_llm):
    """Its request is aborted when delivery fails; other requests keep being served."""
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def start_and_leave():
        stream = async_llm.generate("orphan", [11] * 10, long)
        await anext(stream)  # the loop then closes with the stream still registered

    asyncio.run(start_and_leave())
    outs = asyncio.run(asyncio.wait_for(_collect(async_llm, "after-orphan", PROMPTS[0]), timeout=60))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
    for _ in range(500):
        if async_llm.num_unfinished() == 0 and not async_llm.engine.has_unfinished_requests():
            break
        time.sleep(0.01)
    assert async_llm.num_unfinished() == 0 and not async_llm.engine.has_unfinished_requests()


def test_requests_cancelled_at_any_moment_never_stop_the_loop(async_llm):
    """Cancelling while the add command is queued or running used to settle a cancelled future and kill
    the engine thread silently, with no error and a passing health check."""
    engine = async_llm.engine
    free = engine.block_manager.num_free_blocks
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def one(i: int):
        async def consume():
            async for _ in async_llm.generate(f"storm-{i}", [5 + i % 7] * 24, long):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.0005 * (i % 20))  # before, during and after the add ran
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def main():
        await asyncio.gather(*(one(i) for i in range(60)))

    asyncio.run(main())
    for _ in range(500):
        if (
            async_llm.num_unfinished() == 0
            and not engine.has_unfinished_requests()
            and engine.block_manager.num_free_blocks == free
        ):
            break
        time.sleep(0.01)
    async_llm.check_health()  # alive, not stalled
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished_requests()
    outs = asyncio.run(asyncio.wait_for(_collect(async_llm, "after-storm", PROMPTS[0]), timeout=60))
    assert outs[-1].finished


def test_an_undo_reverts_a_command_whose_caller_was_cancelled(async_llm):
    engine = async_llm.engine
    free = engine.block_manager.num_free_blocks

    async def main():
        call = asyncio.create_task(
            async_llm.call(
                lambda e: e.kv_handoff.reserve("reserved-then-cancelled", 64),
                undo=lambda e, _: e.kv_handoff.free_reserved("reserved-then-cancelled"),
            )
        )
        await asyncio.sleep(0)  # submitted; cancelled before or while it runs
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)

    asyncio.run(main())
    for _ in range(500):
        if engine.block_manager.num_free_blocks == free:
            break
        time.sleep(0.01)
    assert engine.block_manager.num_free_blocks == free


def test_a_failed_step_fails_waiting_requests_and_the_health_check(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=32)
    try:
        llm.check_health()

        def broken_step():
            raise RuntimeError("device lost")

        llm.engine.step = broken_step

        async def main():
            return [o async for o in llm.generate("doomed", [5, 6, 7], GREEDY)]

        with pytest.raises(EngineDeadError, match="device lost"):
            asyncio.run(main())
        with pytest.raises(EngineDeadError, match="device lost"):
            llm.check_health()
        with pytest.raises(EngineDeadError):  # later requests fail at once instead of hanging
            asyncio.run(main())
    finally:
        llm.shutdown()


def test_the_watchdog_calls_a_hung_step_stalled(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=32, stall_timeout_s=0.3)
    release = threading.Event()
    step = llm.engine.step

    def hung_step():
        release.wait(30)
        return step()

    llm.engine.step = hung_step

    async def main():
        return [o async for o in llm.generate("hung", [5, 6, 7], GREEDY)]

    try:
        result = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        result.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                llm.check_health()
            except EngineStalledError as e:
                assert "stalled" in str(e)
                break
            time.sleep(0.05)
        else:
            raise AssertionError("a step hung for 10 s and check_health kept passing")
        release.set()
        result.join(timeout=30)
        llm.check_health()  # it came round again: healthy
    finally:
        release.set()
        llm.shutdown()
