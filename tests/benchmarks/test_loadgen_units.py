"""`ridgeline bench` pieces without a server: arrival processes have the right rate and dispersion,
workloads are what they say, summaries compute what they claim."""

import json
import statistics

import pytest

from benchmarks.loadgen import workloads
from benchmarks.loadgen.arrivals import arrival_times, gaps
from benchmarks.loadgen.client import RequestResult
from benchmarks.loadgen.stats import percentiles, summarize

N = 20_000


def _cv(xs: list[float]) -> float:
    return statistics.pstdev(xs) / statistics.fmean(xs)


@pytest.mark.parametrize(
    "process, burstiness, cv",
    [("poisson", 1.0, 1.0), ("gamma", 2.0, 2.0), ("gamma", 0.5, 0.5), ("constant", 1.0, 0.0)],
)
def test_arrival_processes_have_the_right_rate_and_dispersion(process, burstiness, cv):
    rate = 5.0
    times = arrival_times(process, rate, N, seed=3, burstiness=burstiness)
    g = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    # the mean gap of N draws is within ~4 standard errors of 1/rate (standard error = cv / rate / sqrt(N))
    assert abs(statistics.fmean(g) - 1 / rate) <= 4 * max(cv, 1e-9) / rate / N**0.5 + 1e-12
    assert abs(_cv(g) - cv) <= 0.06 * max(cv, 0.1)
    if process == "poisson":  # counts in 1 s windows: Poisson, so variance = mean (index of dispersion 1)
        counts = [0] * int(times[-1])
        for t in times:
            if int(t) < len(counts):
                counts[int(t)] += 1
        assert abs(statistics.pvariance(counts) / statistics.fmean(counts) - 1) < 0.1
    assert arrival_times(process, rate, 50, seed=3, burstiness=burstiness) == times[:50]  # seeded


def test_bad_arrival_arguments_are_named():
    for kwargs, field in (
        ({"process": "pareto"}, "arrivals"),
        ({"rate": 0}, "rate"),
        ({"burstiness": -1}, "burstiness"),
    ):
        with pytest.raises(ValueError, match=field):
            next(gaps(**{"process": "gamma", "rate": 1.0, **kwargs}))


def test_rag_reuses_documents_at_the_hit_ratio_and_is_reproducible():
    specs = list(workloads.rag_workload(2000, seed=1, doc_len="40", hit_ratio=0.7))
    reused = sum(s.meta["reused_document"] for s in specs) / len(specs)
    assert abs(reused - 0.7) < 0.03
    docs = {s.prompt.split("\nQuestion:")[0] for s in specs}
    assert len(docs) == len(specs) - sum(s.meta["reused_document"] for s in specs)
    assert [s.prompt for s in workloads.rag_workload(20, seed=1, doc_len="40")] == [
        s.prompt for s in specs[:20]
    ]
    with pytest.raises(ValueError, match="hit_ratio"):
        next(workloads.rag_workload(1, seed=1, hit_ratio=1.5))


def test_chat_turns_belong_to_conversations_and_classes_follow_the_mix():
    specs = list(workloads.chat_workload(12, seed=0, turns=3, slo_mix={"interactive": 1, "batch": 1}))
    assert [(s.conversation, s.turn) for s in specs] == [(c, t) for c in range(4) for t in range(3)]
    assert all(s.messages[0]["role"] == "system" for s in specs if s.turn == 0)
    assert all(len({s.slo_class for s in specs if s.conversation == c}) == 1 for c in range(4))
    mix = [s.slo_class for s in workloads.random_workload(4000, 0, "8", "8", {"interactive": 1, "batch": 3})]
    assert abs(mix.count("interactive") / len(mix) - 0.25) < 0.03


def test_lengths_and_files(tmp_path):
    import random

    rng = random.Random(0)
    assert {workloads.Length("7").draw(rng) for _ in range(5)} == {7}
    assert all(10 <= workloads.Length("uniform:10:20").draw(rng) <= 20 for _ in range(100))
    for bad in ("x", "uniform:1", "zipf:1:2", "-3"):
        with pytest.raises(ValueError, match="length"):
            workloads.Length(bad)
    share = tmp_path / "sharegpt.json"
    share.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "hello there"},
                        {"from": "gpt", "value": "one two three"},
                    ]
                }
            ]
        )
    )
    spec = next(workloads.sharegpt_workload(str(share), 1, 0))
    assert (spec.prompt, spec.max_tokens) == ("hello there", 3)
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"timestamp": 10.5, "input_length": 5, "output_length": 7}\n'
        '{"timestamp": 10.0, "input_length": 3, "output_length": 2}\n'
    )
    specs = list(workloads.trace_workload(str(trace), 0))
    assert [(s.arrival, s.max_tokens, len(s.prompt.split())) for s in specs] == [(0.0, 2, 3), (0.5, 7, 5)]
    trace.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="trace.jsonl:1"):
        list(workloads.trace_workload(str(trace), 0))


def test_summary_goodput_cost_and_errors():
    ok = [
        RequestResult(
            True,
            0.0,
            "interactive",
            ttft_s=0.1 * i,
            e2e_s=0.1 * i + 1.0,
            itl_s=[0.1] * 9,
            prompt_tokens=100,
            completion_tokens=11,
            cost_usd=0.001,
        )
        for i in range(1, 11)
    ]
    failed = [
        RequestResult(False, 0.0, "batch", error="http_429"),
        RequestResult(False, 0.0, None, error="timeout"),
    ]
    s = summarize(ok + failed, 10.0, slo_ttft_s=0.5, slo_tpot_s=0.2)
    assert s["completed"] == 10 and s["errors"] == {"http_429": 1, "timeout": 1}
    assert s["goodput"]["requests"] == 5 and s["goodput"]["request_throughput"] == 0.5  # TTFT 0.1 .. 0.5 s
    assert s["ttft_s"]["p50"] == pytest.approx(0.55) and s["tpot_s"]["mean"] == pytest.approx(0.1)
    assert s["cost"]["dollars"] == pytest.approx(0.01) and s["cost"]["tokens_per_dollar"] == pytest.approx(
        1110 / 0.01
    )
    assert s["by_slo_class"]["batch"]["errors"] == {"http_429": 1}
    without = summarize(
        [RequestResult(True, 0.0, ttft_s=0.1, e2e_s=0.2, completion_tokens=3, prompt_tokens=5)],
        3600.0,
        price_per_hour=2.0,
    )
    assert without["cost"]["dollars"] == pytest.approx(2.0) and without["cost"]["tokens_per_dollar"] == 4.0
    assert percentiles([]) is None and percentiles([1.0, 2.0, 3.0, 4.0])["p50"] == 2.5
