"""The console: the engine's periodic stats line (vLLM's shape), quiet while idle, from the AsyncLLM loop;
and configure_logging."""

import asyncio
import logging
import sys
import time

import pytest

from engine import SamplingParams
from engine.async_llm import AsyncLLM
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest
from engine.stat_logger import StatLogger, configure_logging

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = list(range(10, 58))  # 48 tokens: 3 full blocks of 16


class Clock:
    """Time the test moves by hand, so the averages are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(engine: LLMEngine, rid: str, prompt: list[int]) -> None:
    engine.run([EngineRequest(rid, prompt, GREEDY, stream=False)])


def test_a_line_per_interval_with_throughput_queue_kv_and_prefix_hits(llama, caplog):
    engine = LLMEngine.from_pretrained(llama, num_blocks=64)
    clock = Clock()
    stats = StatLogger(engine, interval_s=10.0, name="decode r1", clock=clock)
    run(engine, "a", PROMPT)
    run(engine, "b", PROMPT)  # 32 of its 48 tokens come from the prefix cache
    clock.now += 5.0
    assert stats.maybe_log() is None  # not due yet
    clock.now += 5.0
    with caplog.at_level(logging.INFO, logger="ridgeline.stats"):
        line = stats.maybe_log()
    # prompt tokens computed: 48 + 16, generated: 2 x 8, over 10 s; 2 of the 4 looked-up blocks hit
    assert line == (
        "decode r1: Avg prompt throughput: 6.4 tokens/s, Avg generation throughput: 1.6 tokens/s, "
        "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 50.0%"
    )
    assert [r.getMessage() for r in caplog.records] == [line]


def test_running_requests_and_kv_usage_are_reported(llama):
    engine = LLMEngine.from_pretrained(llama, num_blocks=64)
    clock = Clock()
    stats = StatLogger(engine, interval_s=1.0, name="engine", clock=clock)
    engine.add_request(EngineRequest("r", PROMPT, GREEDY))
    engine.step()  # the prompt is computed and its first token sampled: 3 of 64 blocks held while it runs
    clock.now += 2.0
    assert stats.maybe_log() == (
        "engine: Avg prompt throughput: 24.0 tokens/s, Avg generation throughput: 0.5 tokens/s, "
        "Running: 1 reqs, Waiting: 0 reqs, KV cache usage: 4.7%, Prefix cache hit rate: 0.0%"
    )


def test_an_idle_engine_logs_one_line_after_its_work_then_nothing(llama):
    engine = LLMEngine.from_pretrained(llama, num_blocks=64)
    clock = Clock()
    stats = StatLogger(engine, interval_s=10.0, clock=clock)
    clock.now += 10.0
    assert stats.maybe_log() is None  # never had work
    run(engine, "a", PROMPT)
    clock.now += 10.0
    assert "Avg prompt throughput: 4.8 tokens/s" in (stats.maybe_log() or "")
    clock.now += 10.0
    assert "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0" in (stats.maybe_log() or "")
    for _ in range(3):
        clock.now += 10.0
        assert stats.maybe_log() is None


def test_interval_zero_never_logs(llama):
    engine = LLMEngine.from_pretrained(llama, num_blocks=64)
    clock = Clock()
    stats = StatLogger(engine, interval_s=0, clock=clock)
    run(engine, "a", PROMPT)
    clock.now += 1e6
    assert stats.maybe_log() is None
    with pytest.raises(ValueError, match="stats_interval_s: got -1"):
        StatLogger(engine, interval_s=-1)


def test_the_async_engine_loop_logs_stats_while_it_works(llama, caplog):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64, stats_interval_s=0.05, name="prefill r7")

    async def generate() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        async for _ in llm.generate("s", PROMPT, params):
            await asyncio.sleep(0.01)  # a slow consumer: the request runs for several intervals

    try:
        with caplog.at_level(logging.INFO, logger="ridgeline.stats"):
            asyncio.run(generate())
            deadline = time.monotonic() + 10
            while not any("prefill r7: Avg prompt throughput" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no stats line from the engine loop"
                time.sleep(0.02)
    finally:
        llm.shutdown()


def test_configure_logging_sets_the_level_once_and_refuses_unknown_levels(capsys):
    configure_logging("warning")
    configure_logging("debug")
    log = logging.getLogger("ridgeline")
    assert log.level == logging.DEBUG
    assert sum(type(h).__name__ == "_ConsoleHandler" for h in log.handlers) == 1
    logging.getLogger("ridgeline.test").debug("to the console")
    assert "DEBUG ridgeline.test: to the console" in capsys.readouterr().err
    assert logging.getLogger("engine.kv.offload").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(ValueError, match="log_level: got 'loud', allowed debug, info, warning, error"):
        configure_logging("loud")
    configure_logging("info")
    assert sys.stderr is not None
