"""TTFT and TPOT with and without a JSON schema under the same `ridgeline bench` load, on `ridgeline serve`'s
default app (local Ray on 127.0.0.1, 1 prefill + 1 decode replica, the reference target model).

The same closed loop (`--users` users, `--requests` requests, random prompts of the same lengths) runs twice:
plain, then with every request constrained by a JSON schema (response_format json_schema, strict); each run
(and each warm-up) draws its own prompts, so neither finds the other's in the prefix cache. A
constrained request ends when its document is complete, so its output is shorter than max_tokens: TPOT is
per token either way. Every constrained output is checked: it must parse and match the schema's shape.

    python -m benchmarks.structured_output_serving [--users 4] [--requests 24]
"""

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from benchmarks.loadgen.client import Target
from benchmarks.loadgen.runner import Load, Run, run_load
from benchmarks.loadgen.stats import percentiles
from benchmarks.loadgen.workloads import random_workload
from benchmarks.results_io import write_result
from benchmarks.slo_overload_served import start_app
from engine.envs import default_model_path

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "customer": {"type": "string", "maxLength": 24},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "status", "items", "gift"],
    "additionalProperties": False,
}


def _pct(values: list[float], q: str) -> float | None:
    return (percentiles(values) or {}).get(q)


def _valid(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(doc, dict)
        and set(doc) == set(SCHEMA["required"])
        and isinstance(doc["order_id"], int)
        and doc["status"] in SCHEMA["properties"]["status"]["enum"]
        and isinstance(doc["items"], list)
        and isinstance(doc["gift"], bool)
    )


def measure(target: Target, args: argparse.Namespace, seed: int) -> dict:
    run = Run()
    load = Load(concurrency=args.users, requests=args.requests, seed=seed)
    specs = random_workload(None, seed, args.input_len, args.output_len)
    asyncio.run(run_load(target, load, specs, run))
    ok = [r for r in run.results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    out = {
        "requests": len(run.results),
        "ok": len(ok),
        "errors": sorted({r.error for r in run.results if not r.ok and r.error}),
        "ttft_p50_s": _pct(ttft, "p50"),
        "ttft_p99_s": _pct(ttft, "p99"),
        "tpot_p50_s": _pct(tpot, "p50"),
        "tpot_p99_s": _pct(tpot, "p99"),
        "output_tokens_mean": statistics.fmean(r.completion_tokens or 0 for r in ok) if ok else None,
        "wall_s": run.wall_s,
    }
    if target.json_schema is not None:
        out["outputs_matching_schema"] = sum(_valid(r.text) for r in ok)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the reference target")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--input-len", default="64")
    parser.add_argument("--output-len", default="160")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    url = start_app(model, args.port, [], admission=False)
    plain = Target(url, "ridgeline-ref-target", ignore_eos=True)
    warm = argparse.Namespace(**{**vars(args), "requests": args.users})
    constrained = Target(url, plain.model, ignore_eos=True, json_schema=SCHEMA)
    measure(plain, warm, args.seed + 100)  # compiles, caches and the first grammar compile are not measured
    measure(constrained, warm, args.seed + 101)
    rows = {
        "plain": measure(plain, args, args.seed),
        "json_schema": measure(constrained, args, args.seed + 1),
    }
    for name in ("ttft_p50_s", "tpot_p50_s"):
        a, b = rows["plain"][name], rows["json_schema"][name]
        rows[f"{name.removesuffix('_s')}_ratio_schema_to_plain"] = round(b / a, 3) if a and b else None
    path = write_result(
        "structured_output_serving_cpu",
        {
            "what": "ridgeline serve's default app (1 prefill + 1 decode on local Ray), reference target; the "
            "same ridgeline bench closed loop plain and with every request under a JSON schema",
            "load": vars(args) | {"model": model},
            "schema": SCHEMA,
            "rows": rows,
        },
        None if args.out is None else Path(args.out),
    )
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
