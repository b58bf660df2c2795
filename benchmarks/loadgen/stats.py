"""A run's numbers from its request results: latency distributions (mean, p50, p90, p99), request and token
throughput, goodput under TTFT/TPOT objectives, errors by kind, and tokens per dollar — from the server's
`cost_usd` when every answer carried it, else from a price per hour given for the run."""

import math
from collections import Counter

from benchmarks.loadgen.client import RequestResult


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {
        "mean": sum(v) / len(v),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "min": v[0],
        "max": v[-1],
        "count": len(v),
    }


def _met(r: RequestResult, ttft_s: float | None, tpot_s: float | None) -> bool:
    if ttft_s is not None and (r.ttft_s is None or r.ttft_s > ttft_s):
        return False
    return tpot_s is None or r.tpot_s is None or r.tpot_s <= tpot_s


def summarize(
    results: list[RequestResult],
    duration_s: float,
    *,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    price_per_hour: float | None = None,
) -> dict:
    """`results`: the measured requests (warm-up already left out); `duration_s`: the measured window."""
    ok = [r for r in results if r.ok]
    duration_s = max(duration_s, 1e-9)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    completion = sum(r.completion_tokens or 0 for r in ok)
    out = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": completion / duration_s,
        "total_token_throughput": (prompt + completion) / duration_s,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_prompt_tokens": sum(r.cached_tokens or 0 for r in ok),
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s]),
        "itl_s": percentiles([g for r in ok for g in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
    }
    met = [r for r in ok if _met(r, slo_ttft_s, slo_tpot_s)]
    out["goodput"] = {
        "ttft_slo_s": slo_ttft_s,
        "tpot_slo_s": slo_tpot_s,
        "requests": len(met),
        "request_throughput": len(met) / duration_s,
        "share": len(met) / len(results) if results else None,
    }
    costs = [r.cost_usd for r in ok]
    if ok and all(c is not None for c in costs):
        dollars, source = sum(costs), "server cost_usd"
    elif price_per_hour is not None:
        dollars, source = price_per_hour * duration_s / 3600, f"{price_per_hour} $/h x duration"
    else:
        dollars, source = None, None
    out["cost"] = {
        "dollars": dollars,
        "source": source,
        "tokens_per_dollar": (prompt + completion) / dollars if dollars else None,
        "output_tokens_per_dollar": completion / dollars if dollars else None,
        "goodput_requests_per_dollar": len(met) / dollars if dollars else None,
    }
    classes = sorted({r.slo_class for r in results if r.slo_class})
    if classes:
        out["by_slo_class"] = {
            c: {
                "requests": sum(r.slo_class == c for r in results),
                "completed": sum(r.slo_class == c for r in ok),
                "errors": dict(Counter(r.error for r in results if r.slo_class == c and not r.ok)),
                "ttft_s": percentiles([r.ttft_s for r in ok if r.slo_class == c]),
                "tpot_s": percentiles([r.tpot_s for r in ok if r.slo_class == c and r.tpot_s]),
            }
            for c in classes
        }
    return out
