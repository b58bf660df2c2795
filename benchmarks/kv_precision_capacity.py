"""Concurrency at a fixed KV budget (issue 23's "served" capacity): the most requests of one shape the engine
runs at once without preempting any, with bf16 KV, e4m3 KV and aged low-bit KV, through the real engine.

    python -m benchmarks.kv_precision_capacity [--budget-mib 24] [--prompt 900] [--output 100] [--requests 96]

The reference target (6 layers, 2 KV heads, head_dim 64, 1,024 positions) on the CPU, the same KV budget for
every format (the aged pools split by the engine's default, sized for the longest request), --requests
distinct prompts of --prompt tokens decoding --output more, all added at once: the most requests running at
once while all were decoding, and the preemptions it took. Tokens/s is the CPU's (it says nothing about a
GPU); the counts are the pools' and the scheduler's, the same on any device.
Writes benchmarks/results/kv_precision_capacity_cpu.json (rows: policy, max_concurrent, capacity_vs_bf16,
preemptions, tokens_per_s_cpu).
"""

import argparse
import time
from pathlib import Path

from benchmarks.results_io import write_result
from benchmarks.spec_acceptance import MODELS
from engine import LLM, SamplingParams
from engine.kv.age_policy import KVAgePolicy
from engine.request import EngineRequest

FORMATS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "4-bit aged (sinks 16, window 128)": {"kv_age_policy": KVAgePolicy(bits=4, sinks=16, window=128)},
    "4-bit, 2-bit past 384": {
        "kv_age_policy": KVAgePolicy(bits=4, sinks=16, window=128, horizon=384, low_bits=2),
    },
}


def run(llm: LLM, count: int, prompt: int, output: int) -> dict:
    """`count` requests added at once: the most running at once while all were decoding, preemptions, and
    output tokens/s (CPU)."""
    engine = llm.engine
    for i in range(count):
        ids = [10 + (i * 7 + j * 13 + i * j) % 8000 for j in range(prompt)]
        engine.add_request(
            EngineRequest(f"c{i}", ids, SamplingParams(max_tokens=output, temperature=0, ignore_eos=True))
        )
    before, peak = engine.scheduler.num_preemptions, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        running = engine.scheduler.running
        if all(r.num_computed_tokens >= r.num_prompt_tokens for r in running):
            peak = max(peak, len(running))
    seconds = time.perf_counter() - t0
    return {
        "max_concurrent": peak,
        "preemptions": engine.scheduler.num_preemptions - before,
        "tokens_per_s_cpu": round(count * output / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-mib", type=float, default=24.0)
    parser.add_argument("--prompt", type=int, default=900)
    parser.add_argument("--output", type=int, default=100)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = str(MODELS / "ridgeline-ref-target")
    budget = int(args.budget_mib * 2**20)
    rows = []
    for name in args.formats:
        options = FORMATS[name]
        llm = LLM(
            model,
            device="cpu",
            dtype="bfloat16",
            kv_cache_memory_bytes=budget,
            max_num_seqs=256,
            max_num_batched_tokens=2048,
            enable_prefix_caching=False,
            **options,
        )
        pools = llm.engine.kv_pool_formats()
        rows.append(
            {
                "policy": name,
                **run(llm, args.requests, args.prompt, args.output),
                "pools": {k: {"blocks": v[0], "block_bytes": v[2]} for k, v in pools.items()},
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]["max_concurrent"]
    for r in rows:
        r["capacity_vs_bf16"] = round(r["max_concurrent"] / base, 3) if base else None
    path = write_result(
        "kv_precision_capacity_cpu",
        {
            "model": "ridgeline-ref-target (6 layers, 2 KV heads, head_dim 64)",
            "budget_bytes": budget,
            "prompt_tokens": args.prompt,
            "output_tokens": args.output,
            "requests": args.requests,
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(path)


if __name__ == "__main__":
    main()
