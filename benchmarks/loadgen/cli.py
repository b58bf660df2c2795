"""`ridgeline bench`: load a server, print the summary, write JSON, CSV and plots.

ridgeline bench --url http://127.0.0.1:8000 --workload rag --rate 4 --duration 60
ridgeline bench --url ... --rates 1,2,4,8 --duration 30          # a sweep: throughput/goodput vs rate
ridgeline bench --url ... --concurrency 16 --requests 500          # closed loop
ridgeline bench --url ... --workload rag-docs --document-cache off  # the same RAG load, documents inlined
ridgeline bench compare A.json B.json                              # ratios B / A
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.loadgen import report, workloads
from benchmarks.loadgen.client import Target
from benchmarks.loadgen.runner import Load, Run, run_load
from benchmarks.loadgen.stats import summarize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ridgeline bench",
        description="Load an OpenAI-compatible server "
        "(Ridgeline, vLLM, SGLang) and report latency, goodput and tokens per dollar.",
    )
    p.add_argument("--url", required=True, help="the server's base URL (http://HOST:PORT, without /v1)")
    p.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workload", default="random", choices=workloads.WORKLOADS)
    p.add_argument("--dataset", default=None, help="sharegpt: a ShareGPT JSON file; trace: a JSONL trace")
    p.add_argument(
        "--input-len", default="256", help="random: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MED:S"
    )
    p.add_argument("--output-len", default="128", help="as --input-len")
    p.add_argument("--doc-len", default="512", help="rag, rag-docs: document length (words)")
    p.add_argument("--question-len", default="32", help="rag, rag-docs: question length (words)")
    p.add_argument("--hit-ratio", type=float, default=0.7, help="rag: share of requests reusing a document")
    p.add_argument(
        "--docs-per-request",
        type=int,
        default=4,
        help="rag-docs: documents per request, drawn without replacement from the pool, in random order",
    )
    p.add_argument(
        "--doc-pool", type=int, default=16, help="rag-docs: documents in the pool (made from the seed)"
    )
    p.add_argument(
        "--document-cache",
        default="on",
        choices=["on", "off"],
        help="rag-docs: on sends the documents in the completions 'documents' field (Ridgeline's document KV "
        "reuse); off sends the same text as one plain prompt",
    )
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--system-len", type=int, default=64, help="chat: system prompt length (words)")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests (conversations) per second")
    p.add_argument("--rates", default=None, help="a sweep: comma-separated rates, one run each")
    p.add_argument("--arrivals", default="poisson", choices=["poisson", "gamma", "constant"])
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma: coefficient of variation of the gaps"
    )
    p.add_argument(
        "--concurrency", type=int, default=None, help="closed loop users (with --rate: an in-flight cap)"
    )
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests (conversations)")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds at the start left out of the numbers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slo-mix", default=None, help="SLO classes sent as x-slo-class: interactive=0.2,batch=0.8"
    )
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request's TTFT objective")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: a request's TPOT objective")
    p.add_argument(
        "--price-per-hour",
        type=float,
        default=None,
        help="$ per hour of the server, for tokens per dollar when it reports no cost_usd",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-ignore-eos", action="store_true", help="let outputs stop at EOS (lengths then vary)")
    p.add_argument(
        "--json-schema",
        default=None,
        help="a JSON schema file: every output is constrained to it (response_format json_schema, strict); "
        "a request then ends when its document is complete",
    )
    p.add_argument("--out", default=None, help="output directory (default: bench-results/<time>)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        mix = {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"slo-mix: got {text!r}, want name=weight,name=weight") from None
    if any(w < 0 for w in mix.values()) or not sum(mix.values()):
        raise ValueError(f"slo-mix: weights must be >= 0 and not all 0, got {text!r}")
    return mix


def _specs(args, seed: int):
    mix = _mix(args.slo_mix)
    n = None  # workloads are endless; the run's bounds cut them
    if args.workload == "random":
        return workloads.random_workload(n, seed, args.input_len, args.output_len, mix)
    if args.workload == "rag":
        return workloads.rag_workload(
            n, seed, args.doc_len, args.question_len, args.output_len, args.hit_ratio, mix
        )
    if args.workload == "rag-docs":
        return workloads.rag_docs_workload(
            n,
            seed,
            args.docs_per_request,
            args.doc_pool,
            args.doc_len,
            args.question_len,
            args.output_len,
            args.document_cache == "on",
            mix,
        )
    if args.workload == "chat":
        return workloads.chat_workload(
            n, seed, args.turns, args.input_len, args.output_len, args.system_len, mix
        )
    if not args.dataset:
        raise ValueError(f"dataset: --workload {args.workload} needs --dataset PATH")
    if args.workload == "sharegpt":
        return workloads.sharegpt_workload(args.dataset, n, seed, mix)
    return workloads.trace_workload(args.dataset, seed, mix)


def _model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _one(args, target: Target, rate: float | None, out: Path, name: str, console: Console) -> dict:
    load = Load(
        rate=rate,
        arrivals=args.arrivals,
        burstiness=args.burstiness,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
    )
    if args.workload == "trace" and rate is None and args.concurrency is None:
        load.rate = 1.0  # the trace's own timestamps set the arrivals; the rate is unused
    load.check()
    run = Run()
    config = {
        "url": args.url,
        "model": target.model,
        "workload": args.workload,
        "rate": rate,
        "arrivals": args.arrivals,
        "burstiness": args.burstiness,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "slo_mix": args.slo_mix,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "hit_ratio": args.hit_ratio if args.workload == "rag" else None,
        **(
            {
                "doc_len": args.doc_len,
                "question_len": args.question_len,
                "docs_per_request": args.docs_per_request,
                "doc_pool": args.doc_pool,
                "document_cache": args.document_cache,
            }
            if args.workload == "rag-docs"
            else {}
        ),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=args.no_progress,
    ) as progress:
        task = progress.add_task(name, total=args.requests, status="")
        errors = 0

        def on_result(r) -> None:
            nonlocal errors
            errors += not r.ok
            progress.update(task, advance=1, status=f"errors {errors}" if errors else "")

        try:
            asyncio.run(run_load(target, load, _specs(args, args.seed), run, on_result))
        except KeyboardInterrupt:
            run.interrupted = True
    measured = run.measured(args.warmup)
    summary = summarize(
        measured,
        run.window_s(args.warmup),
        slo_ttft_s=_s(args.slo_ttft_ms),
        slo_tpot_s=_s(args.slo_tpot_ms),
        price_per_hour=args.price_per_hour,
    )
    summary["interrupted"] = run.interrupted
    summary["warmup_requests"] = len(run.results) - len(measured)
    report.write_json(out / f"{name}.json", config, summary, run.results)
    report.write_csv(out / f"{name}.csv", run.results)
    report.plot_latency_cdfs(
        out / f"{name}_latency_cdf.png", measured, f"{args.workload} @ {rate or 'closed loop'}"
    )
    report.print_summary(
        summary,
        f"{name}: {args.workload}, " + (f"{rate} req/s" if rate else f"{args.concurrency} users"),
        console,
    )
    if run.interrupted:
        raise KeyboardInterrupt
    return summary


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    if args.rate is not None and args.rates is not None:
        raise ValueError("rate, rates: give one")
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    target = Target(
        args.url,
        args.model or _model(args.url, args.api_key),
        args.api_key,
        args.timeout,
        not args.no_ignore_eos,
        json.loads(Path(args.json_schema).read_text()) if args.json_schema else None,
    )
    try:
        if args.rates is None:
            _one(args, target, args.rate, out, "result", console)
        else:
            rates = [float(r) for r in args.rates.split(",")]
            points = []
            for rate in rates:
                points.append((rate, _one(args, target, rate, out, f"rate_{rate:g}", console)))
            (out / "sweep.json").write_text(
                json.dumps({"rates": rates, "summaries": [s for _, s in points]}, indent=2) + "\n"
            )
            report.plot_sweep(out / "sweep.png", points, f"{args.workload} sweep, {target.model}")
    except KeyboardInterrupt:
        console.print(f"interrupted: partial results in {out}")
        return 130
    console.print(f"results in {out}")
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ridgeline bench compare", description="B / A for two runs' results")
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    a, b = (json.loads(Path(x).read_text())["summary"] for x in (args.a, args.b))
    Console().print(report.compare(a, b))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            return compare_main(argv[1:])
        return run(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
