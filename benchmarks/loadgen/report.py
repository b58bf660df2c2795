"""Where a run's numbers go: a summary table on the terminal (rich), JSON (config, summary, every request)
and CSV (one row per request) files, and PNG plots — latency CDFs for a run, throughput and goodput against
the offered rate for a sweep."""

import csv
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.loadgen.client import RequestResult

LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E"))


def table(summary: dict, title: str) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    for col in ("metric", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for key, name in LATENCIES:
        d = summary.get(key)
        if d:
            t.add_row(f"{name} (ms)", *(f"{d[k] * 1000:.1f}" for k in ("mean", "p50", "p90", "p99")))
    good = summary["goodput"]
    rows = [
        ("requests completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"),
        ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("output tokens/s", f"{summary['output_token_throughput']:.1f}"),
        ("total tokens/s", f"{summary['total_token_throughput']:.1f}"),
        (
            f"goodput (req/s, TTFT<={good['ttft_slo_s']} s, TPOT<={good['tpot_slo_s']} s)",
            f"{good['request_throughput']:.2f}",
        ),
    ]
    cost = summary["cost"]
    if cost["tokens_per_dollar"]:
        rows.append((f"tokens per dollar ({cost['source']})", f"{cost['tokens_per_dollar']:,.0f}"))
    for name, value in rows:
        t.add_row(name, value, "", "", "")
    return t


def print_summary(summary: dict, title: str, console: Console | None = None) -> None:
    (console or Console()).print(table(summary, title))


def write_json(path: Path, config: dict, summary: dict, results: list[RequestResult], **extra) -> None:
    path.write_text(
        json.dumps(
            {
                "config": config,
                "summary": summary,
                **extra,
                "requests": [{k: v for k, v in asdict(r).items() if k != "text"} for r in results],
            },
            indent=2,
        )
        + "\n"
    )


def write_csv(path: Path, results: list[RequestResult]) -> None:
    fields = [
        "start",
        "slo_class",
        "ok",
        "error",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in results:
            writer.writerow([getattr(r, k) for k in fields])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(path: Path, results: list[RequestResult], title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ok = [r for r in results if r.ok]
    series = {
        "ttft_s": [r.ttft_s for r in ok],
        "tpot_s": [r.tpot_s for r in ok if r.tpot_s],
        "itl_s": [g for r in ok for g in r.itl_s],
        "e2e_s": [r.e2e_s for r in ok],
    }
    for ax, (key, name) in zip(axes, LATENCIES, strict=True):
        values = sorted(v * 1000 for v in series[key])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl_s" else "fraction of gaps")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, points: list[tuple[float, dict]], title: str) -> None:
    plt = _pyplot()
    rates = [rate for rate, _ in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(rates, [s["request_throughput"] for _, s in points], "o-", label="throughput")
    left.plot(rates, [s["goodput"]["request_throughput"] for _, s in points], "s-", label="goodput")
    left.plot(rates, rates, ":", color="gray", label="offered")
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("req/s")
    left.legend()
    left.grid(alpha=0.3)
    for q in ("p50", "p90", "p99"):
        right.plot(
            rates,
            [(s["ttft_s"] or {}).get(q, float("nan")) * 1000 for _, s in points],
            "o-",
            label=f"TTFT {q}",
        )
    right.set_xlabel("offered rate (req/s)")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(a: dict, b: dict) -> Table:
    """Two runs' summaries side by side, with B / A."""
    t = Table(title="B / A", show_header=True, header_style="bold")
    for col in ("metric", "A", "B", "B / A"):
        t.add_column(col, justify="right" if col != "metric" else "left")

    def row(name: str, va, vb) -> None:
        if va is None or vb is None:
            return
        ratio = f"{vb / va:.3f}" if va else "-"
        t.add_row(name, f"{va:.4g}", f"{vb:.4g}", ratio)

    for key, name in LATENCIES:
        for q in ("p50", "p90", "p99"):
            row(f"{name} {q} (s)", (a.get(key) or {}).get(q), (b.get(key) or {}).get(q))
    for key in ("request_throughput", "output_token_throughput", "total_token_throughput"):
        row(key, a.get(key), b.get(key))
    row("goodput (req/s)", a["goodput"]["request_throughput"], b["goodput"]["request_throughput"])
    row("tokens per dollar", a["cost"]["tokens_per_dollar"], b["cost"]["tokens_per_dollar"])
    row("failed", a.get("failed"), b.get("failed"))
    return t
