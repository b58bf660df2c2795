"""RAG over HTTP with and without document KV reuse: the same `ridgeline bench` rag-docs load (same seed, same
arrivals, same text) against the in-process frontend on 127.0.0.1 over an `AsyncLLM` of the reference target
on the CPU, with the documents in the completions `documents` field (`--document-cache on`: each document's
KV computed once and reused at any position) and inlined as one plain prompt (`off`: prefix caching only).
Each mode gets a fresh server, so neither sees the other's caches.

    python -m benchmarks.rag_served [--requests 48] [--rate 0.75] [--out DIR]

Each request: a fixed system line (the first document), `--docs-per-request` documents drawn from a pool of
`--doc-pool` in random order, a question; prompts fit the checkpoint's 1024 positions (4 x 120 words: about
750 tokens with the rest). The default rate is light for this 2-core CPU (the plain run's TTFT is mostly its
prefill, little queueing; at 1.5 requests/s the numbers were about the same). Other processes on the CPU
inflate the plain run's TTFT far more than the cached run's: measure on an idle machine. Before each run, a
few requests of another seed's pool warm the engine (their documents are never asked for again; the system
line is). Reported per mode: TTFT p50/p90/p99, TPOT p50, goodput under a TTFT SLO of `--slo-factor` x the
document-cached run's TTFT p50, throughput, the engine's document counters; and TTFT(off) / TTFT(on).
Writes benchmarks/results/rag_served_cpu.json (or into --out).
"""

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

from benchmarks.loadgen.client import RequestResult, Target
from benchmarks.loadgen.runner import Load, Run, run_load
from benchmarks.loadgen.stats import percentiles, summarize
from benchmarks.loadgen.workloads import rag_docs_workload
from benchmarks.local_http import serve_in_thread
from benchmarks.results_io import write_result
from benchmarks.spec_acceptance import MODELS

NAME = "ridgeline-ref-target"
MAX_MODEL_LEN = 1024
WARMUP_SEED_OFFSET = 1000  # warm-up requests draw another pool: no measured document is cached by them


@contextlib.contextmanager
def fresh_server(args: argparse.Namespace):
    """A new engine and frontend (empty prefix and document caches); yields (base URL, AsyncLLM)."""
    from engine.async_llm import AsyncLLM
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    llm = AsyncLLM.from_pretrained(
        str(MODELS / NAME),
        device="cpu",
        dtype=args.dtype,
        max_model_len=MAX_MODEL_LEN,
        num_blocks=args.num_blocks,
    )
    try:
        with serve_in_thread(build_frontend(OpenAIServing(llm, NAME))) as url:
            yield url, llm
    finally:
        llm.shutdown()


def _specs(args: argparse.Namespace, seed: int, cached: bool):
    return rag_docs_workload(
        None,
        seed,
        args.docs_per_request,
        args.doc_pool,
        args.doc_len,
        args.question_len,
        args.output_len,
        document_cache=cached,
    )


def _drive(target: Target, load: Load, specs) -> Run:
    run = Run()
    asyncio.run(run_load(target, load, specs, run))
    return run


def measure(args: argparse.Namespace, cached: bool) -> tuple[Run, dict]:
    with fresh_server(args) as (url, llm):
        target = Target(url, NAME, timeout_s=args.timeout)
        warm = _drive(
            target, Load(concurrency=1, requests=args.warmup), _specs(args, args.seed + 1000, cached)
        )
        if not all(r.ok for r in warm.results):
            raise RuntimeError(f"warm-up failed: {[r.error_detail for r in warm.results]}")
        stats = llm.engine.stats
        before = {k: getattr(stats, k) for k in COUNTERS}
        run = _drive(
            target,
            Load(rate=args.rate, requests=args.requests, seed=args.seed),
            _specs(args, args.seed, cached),
        )
        counters = {k: getattr(stats, k) - before[k] for k in COUNTERS}
    return run, counters


COUNTERS = (
    "prompt_tokens_computed",
    "document_hits",
    "document_misses",
    "document_tokens_reused",
    "document_tokens_recomputed",
    "document_fallbacks",
)


def _ms(summary: dict, metric: str, q: str) -> float | None:
    d = summary.get(metric)
    return None if d is None else round(d[q] * 1e3, 1)


def _halves(ok: list[RequestResult]) -> list[float | None]:
    """TTFT p50 of the first and the second half of the requests by arrival: a growing queue shows as a rise;
    the cached run's first half also holds the documents' first computations."""
    ordered = sorted(ok, key=lambda r: r.start)
    half = len(ordered) // 2
    out = []
    for part in (ordered[:half], ordered[half:]):
        p = percentiles([r.ttft_s for r in part if r.ttft_s is not None])
        out.append(None if p is None else round(p["p50"] * 1e3, 1))
    return out


def row(run: Run, counters: dict, slo_ttft_s: float) -> dict:
    s = summarize(run.results, run.window_s(0.0), slo_ttft_s=slo_ttft_s)
    ok: list[RequestResult] = [r for r in run.results if r.ok]
    return {
        "requests": s["requests"],
        "completed": s["completed"],
        "errors": s["errors"],
        "ttft_ms": {q: _ms(s, "ttft_s", q) for q in ("p50", "p90", "p99", "mean")},
        "ttft_ms_p50_by_half": _halves(ok),
        "tpot_ms_p50": _ms(s, "tpot_s", "p50"),
        "e2e_ms_p50": _ms(s, "e2e_s", "p50"),
        "goodput": {
            "ttft_slo_ms": round(slo_ttft_s * 1e3, 1),
            "requests": s["goodput"]["requests"],
            "share": s["goodput"]["share"],
            "requests_per_s": round(s["goodput"]["request_throughput"], 3),
        },
        "throughput": {
            "requests_per_s": round(s["request_throughput"], 3),
            "output_tokens_per_s": round(s["output_token_throughput"], 2),
            "total_tokens_per_s": round(s["total_token_throughput"], 1),
        },
        "duration_s": round(s["duration_s"], 2),
        "prompt_tokens_mean": round(s["prompt_tokens"] / len(ok), 1) if ok else None,
        "cached_prompt_tokens": s["cached_prompt_tokens"],  # usage: prefix hits and reused document tokens
        "engine": counters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=0.75, help="Poisson arrivals, requests per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs-per-request", type=int, default=4)
    parser.add_argument("--doc-pool", type=int, default=16)
    parser.add_argument("--doc-len", default="120", help="words per document")
    parser.add_argument("--question-len", default="16", help="words")
    parser.add_argument("--output-len", default="16", help="tokens per answer (ignore_eos)")
    parser.add_argument("--warmup", type=int, default=3, help="requests of another pool before each run")
    parser.add_argument("--slo-factor", type=float, default=2.0, help="TTFT SLO = this x cached TTFT p50")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = {}
    for mode in ("on", "off"):
        t0 = time.perf_counter()
        runs[mode] = measure(args, cached=mode == "on")
        done = len(runs[mode][0].results)
        print(f"document cache {mode}: {done} requests in {time.perf_counter() - t0:.0f} s", flush=True)
    on_ttft = summarize(runs["on"][0].results, 1.0)["ttft_s"]
    if on_ttft is None:
        raise RuntimeError(f"no request completed with the document cache on: {runs['on'][0].results[:3]}")
    slo_s = args.slo_factor * on_ttft["p50"]
    rows = {mode: row(run, counters, slo_s) for mode, (run, counters) in runs.items()}
    ratios = {
        q: round(rows["off"]["ttft_ms"][q] / rows["on"]["ttft_ms"][q], 2)
        for q in ("p50", "p90", "p99")
        if rows["off"]["ttft_ms"][q] and rows["on"]["ttft_ms"][q]
    }
    payload = {
        "model": NAME,
        "load": {
            "workload": "rag-docs",
            "requests": args.requests,
            "rate_rps": args.rate,
            "arrivals": "poisson",
            "seed": args.seed,
            "docs_per_request": args.docs_per_request,
            "doc_pool": args.doc_pool,
            "doc_len_words": args.doc_len,
            "question_len_words": args.question_len,
            "output_tokens": args.output_len,
            "warmup_requests": args.warmup,
            "dtype": args.dtype,
            "max_model_len": MAX_MODEL_LEN,
            "num_blocks": args.num_blocks,
        },
        "ttft_slo": f"{args.slo_factor:g} x the document-cached run's TTFT p50 = {slo_s * 1e3:.0f} ms",
        "results": {"document_cache_on": rows["on"], "document_cache_off": rows["off"]},
        "ttft_off_over_on": ratios,
        "wall_s": round(time.perf_counter() - started, 1),
        "note": "in-process HTTP frontend (uvicorn on 127.0.0.1) over one AsyncLLM of the reference target "
        "on the CPU, load generator in the same process (2 cores shared); one fresh server per mode. on: "
        "the system line and the documents in the completions 'documents' field (each document's KV "
        "computed once, reused at any position; the pool's default recompute of each document's first 16 "
        "tokens); off: the same text as one plain prompt (prefix caching still on: it hits only where an "
        "earlier prompt had the same leading documents). The pool's documents are first computed in the on "
        "run's first requests (no pre-warming), so its TTFT includes those misses. Nothing else ran on the "
        "CPU (other load inflates the off run's TTFT most).",
    }
    path = write_result("rag_served_cpu", payload, None if args.out is None else Path(args.out))
    print(
        json.dumps({k: payload[k] for k in ("ttft_slo", "results", "ttft_off_over_on", "wall_s")}, indent=1)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
