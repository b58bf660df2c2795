"""SLO classes under overload: the same seeded arrivals of interactive and long batch requests against
the OpenAI frontend over HTTP (in-process engine, 127.0.0.1), served twice in one run:

- `no_classes`: first come first served, no admission control (a server without SLO classes);
- `slo_classes`: priority scheduling with preemption of batch, and admission control (429 + Retry-After).

    python -m benchmarks.slo_overload [--model DIR] [--duration 6] [--batch-rate 20] [--interactive-rate 4]

Reported per class: TTFT percentiles, the share that met the class's TTFT target, rejections, and goodput
(requests per second that completed within their TTFT target).
"""

import argparse
import asyncio
import random
import statistics
import time

import httpx

from benchmarks.results_io import write_result
from control_plane.admission import AdmissionController
from control_plane.slo import SLOClass, SLOTable

MODEL = "tiny-llama"
TABLE = SLOTable(
    [
        SLOClass("interactive", 0, ttft_ms=500, tpot_ms=200, preemptible=False),
        SLOClass("standard", 1, ttft_ms=2000, tpot_ms=500),
        SLOClass("batch", 2, ttft_ms=1000, tpot_ms=1000),
    ]
)


def arrivals(seed: int, duration_s: float, rates: dict[str, float]) -> list[tuple[float, str]]:
    """Poisson arrivals per class, merged in time order."""
    rng = random.Random(seed)
    out = []
    for cls, rate in rates.items():
        t = rng.expovariate(rate)
        while t < duration_s:
            out.append((t, cls))
            t += rng.expovariate(rate)
    return sorted(out)


async def one(
    client: httpx.AsyncClient, cls: str, header: str | None, prompt: list[int], max_tokens: int
) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    async with client.stream(
        "POST", "/v1/completions", json=body, headers={"x-slo-class": header} if header else {}
    ) as r:
        if r.status_code != 200:
            await r.aread()
            return {"class": cls, "status": r.status_code, "ttft_s": None}
        ttft = None
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text": ""' not in line:
                ttft = time.perf_counter() - start
        return {"class": cls, "status": 200, "ttft_s": ttft, "e2e_s": time.perf_counter() - start}


async def drive(url: str, schedule: list[tuple[float, str]], with_classes: bool, lengths: dict) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0, tasks = time.perf_counter(), []
        for i, (at, cls) in enumerate(schedule):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            prompt_len, max_tokens = lengths[cls]
            prompt = [(37 * i + t) % 300 + 5 for t in range(prompt_len)]
            tasks.append(
                asyncio.create_task(one(client, cls, cls if with_classes else None, prompt, max_tokens))
            )
        return await asyncio.gather(*tasks)


def summarize(results: list[dict], duration_s: float) -> dict:
    out = {}
    for cls in sorted({r["class"] for r in results}):
        rs = [r for r in results if r["class"] == cls]
        ok = [r["ttft_s"] for r in rs if r["status"] == 200]
        target = TABLE.by_name[cls].ttft_ms / 1000
        met = sum(1 for t in ok if t <= target)
        q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else ok * 99
        out[cls] = {
            "sent": len(rs),
            "completed": len(ok),
            "rejected_429": sum(r["status"] == 429 for r in rs),
            "ttft_target_s": target,
            "ttft_p50_s": q[49] if ok else None,
            "ttft_p90_s": q[89] if ok else None,
            "ttft_p99_s": q[98] if ok else None,
            "met_target": met,
            "met_target_share": met / len(rs),
            "goodput_rps": met / duration_s,
        }
    return out


def run_config(
    model: str, schedule, duration_s: float, with_classes: bool, lengths: dict, max_num_seqs: int
) -> dict:
    from benchmarks.local_http import serve_in_thread
    from engine.async_llm import AsyncLLM
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    llm = AsyncLLM.from_pretrained(
        model,
        num_blocks=512,
        max_model_len=512,
        max_num_seqs=max_num_seqs,
        scheduling_policy="priority" if with_classes else "fcfs",
    )
    app = build_frontend(
        OpenAIServing(llm, MODEL, slo_table=TABLE, admission=AdmissionController() if with_classes else None)
    )
    try:
        with serve_in_thread(app) as url:
            start = time.perf_counter()
            results = asyncio.run(drive(url, schedule, with_classes, lengths))
            wall = time.perf_counter() - start
    finally:
        llm.shutdown()
    return {
        "wall_s": wall,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "by_class": summarize(results, duration_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--batch-rate", type=float, default=20.0)
    parser.add_argument("--interactive-rate", type=float, default=4.0)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        from engine.tiny_model import cached_tiny_model

        args.model = str(cached_tiny_model())
    lengths = {"interactive": (32, 16), "batch": (96, 160)}
    schedule = arrivals(
        args.seed, args.duration, {"batch": args.batch_rate, "interactive": args.interactive_rate}
    )
    configs = {
        name: run_config(args.model, schedule, args.duration, with_classes, lengths, args.max_num_seqs)
        for name, with_classes in (("no_classes", False), ("slo_classes", True))
    }
    for name, c in configs.items():
        for cls, s in c["by_class"].items():
            print(
                f"{name:12s} {cls:12s} sent {s['sent']:3d} done {s['completed']:3d} 429 {s['rejected_429']:3d} "
                f"TTFT p50 {s['ttft_p50_s'] or 0:.3f} s p99 {s['ttft_p99_s'] or 0:.3f} s "
                f"met {s['met_target_share']:.0%} goodput {s['goodput_rps']:.2f}/s"
            )
    path = write_result(
        "slo_overload_cpu",
        {
            "what": "interactive + long batch requests, Poisson, over HTTP on 127.0.0.1 (in-process engine, tiny "
            "model); the same arrivals with and without SLO classes (priority + preemption + admission)",
            "args": vars(args),
            "lengths": lengths,
            "slo_classes": {n: c.__dict__ for n, c in TABLE.by_name.items()},
            "configs": configs,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
