"""SLO classes under overload on the served app: `ridgeline serve`'s default deployment (local Ray on
127.0.0.1, 1 prefill + 1 decode replica, admission on, the default SLO table) driven by `ridgeline bench`'s
load generator.

0. The TTFT of one request at a time (the floor any class's target is held against).
1. The sustainable rate: a closed loop of `--users` users sending standard requests back to back; its
   completed requests per second are what the app sustains.
2. Open-loop Poisson arrivals at each `--multipliers` times that rate, with an SLO-class mix, for
   `--duration` seconds.

Reported per run and class: counts by status (200, 429, 5xx, timeouts, streams cut off), TTFT p50/p99 of
the served requests against the class's target, the share shed (429), and 5xx overall.

    python -m benchmarks.slo_overload_served [--model DIR] [--duration 20] [--multipliers 5,10]
        [--ttft-ms interactive=1500,standard=5000 --name slo_overload_served_cpu_scaled]
"""

import argparse
import asyncio
import dataclasses
import os
import statistics
import time

from benchmarks.results_io import write_result
from engine.envs import default_model_path, local_cluster_env

MIX = {"interactive": 0.2, "standard": 0.3, "batch": 0.5}
SETTLE_S = 5.0  # the in-flight limit starts at max_inflight: requests sent after this see it settled


def start_app(model: str, port: int, slo_classes: list[dict], admission: bool = True) -> str:
    os.environ.update(local_cluster_env())  # before ray is imported: it reads some of them at import
    import ray
    from ray import serve

    from services.app import ServeConfig, build_app

    classes = {"slo_classes": slo_classes} if slo_classes else {}  # none: the default table
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ServeConfig(model=model, admission=admission, **classes)),
        name="ridgeline",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def drive(
    url: str,
    model: str,
    rate: float | None,
    users: int | None,
    duration_s: float,
    seed: int,
    mix: dict | None,
    input_len: str,
    output_len: str,
    timeout_s: float,
):
    from benchmarks.loadgen.client import Target
    from benchmarks.loadgen.runner import Load, Run, run_load
    from benchmarks.loadgen.workloads import random_workload

    run = Run()
    load = Load(rate=rate, concurrency=users, duration_s=duration_s, seed=seed)
    specs = random_workload(None, seed, input_len, output_len, slo_mix=mix)
    asyncio.run(run_load(Target(url, model, timeout_s=timeout_s), load, specs, run))
    return run


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(run, targets_s: dict[str, float]) -> dict:
    by_class = {}
    for cls in sorted({r.slo_class for r in run.results}):
        rs = [r for r in run.results if r.slo_class == cls]
        ok = [r for r in rs if r.ok]
        ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
        status: dict[str, int] = {"200": len(ok)}
        for r in rs:
            if not r.ok:
                status[r.error or "unknown"] = status.get(r.error or "unknown", 0) + 1
        target = targets_s[cls]
        settled = sorted(r.ttft_s for r in ok if r.ttft_s is not None and r.start >= SETTLE_S)
        by_class[cls] = {
            "sent": len(rs),
            "status": status,
            "shed_429": status.get("http_429", 0),
            "shed_fraction": status.get("http_429", 0) / len(rs),
            "ttft_target_s": target,
            "ttft_p50_s": _quantile(ttfts, 0.5),
            "ttft_p99_s": _quantile(ttfts, 0.99),
            "ttft_within_target_share_of_served": (sum(t <= target for t in ttfts) / len(ttfts))
            if ttfts
            else None,
            f"after_{SETTLE_S:g}s": {
                "served": len(settled),
                "ttft_p50_s": _quantile(settled, 0.5),
                "ttft_p99_s": _quantile(settled, 0.99),
            },
        }
    errors_5xx = sum(n for c in by_class.values() for k, n in c["status"].items() if k.startswith("http_5"))
    return {"requests": len(run.results), "wall_s": run.wall_s, "http_5xx": errors_5xx, "by_class": by_class}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default=None, help="default: the reference target (what `ridgeline serve` serves)"
    )
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument(
        "--users", type=int, default=4, help="closed-loop users measuring the sustainable rate"
    )
    parser.add_argument("--capacity-duration", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--multipliers", default="5,10")
    parser.add_argument("--input-len", default="uniform:48:160")
    parser.add_argument("--output-len", default="uniform:8:32")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ttft-ms",
        default=None,
        help="class=ms,... TTFT targets replacing the default table's "
        "(e.g. interactive=1500,standard=5000 for a machine whose idle TTFT is near 0.5 s)",
    )
    parser.add_argument("--name", default="slo_overload_served_cpu", help="results file name")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    from control_plane.slo import DEFAULT_SLO_TABLE

    classes = [dataclasses.asdict(c) for c in DEFAULT_SLO_TABLE.by_name.values()]
    for item in args.ttft_ms.split(",") if args.ttft_ms else []:
        name, ms = item.split("=")
        next(c for c in classes if c["name"] == name)["ttft_ms"] = float(ms)
    url = start_app(model, args.port, classes)
    targets = {c["name"]: c["ttft_ms"] / 1000 for c in classes}
    served = os.path.basename(os.path.normpath(model))
    drive(
        url,
        served,
        None,
        args.users,
        5.0,
        args.seed + 99,
        None,
        args.input_len,
        args.output_len,
        args.timeout,
    )
    idle = drive(
        url, served, None, 1, 10.0, args.seed + 98, None, args.input_len, args.output_len, args.timeout
    )
    idle_ttft = sorted(r.ttft_s for r in idle.results if r.ok and r.ttft_s is not None)
    print(f"one request at a time: TTFT p50 {_quantile(idle_ttft, 0.5):.3f} s")
    capacity_run = drive(
        url,
        served,
        None,
        args.users,
        args.capacity_duration,
        args.seed,
        None,
        args.input_len,
        args.output_len,
        args.timeout,
    )
    done = [r for r in capacity_run.results if r.ok]
    sustainable = len(done) / capacity_run.wall_s
    print(
        f"sustainable: {sustainable:.2f} req/s ({len(done)} in {capacity_run.wall_s:.1f} s, {args.users} users)"
    )
    runs = {}
    for m in (float(x) for x in args.multipliers.split(",")):
        time.sleep(5.0)  # what the last run left in flight drains
        run = drive(
            url,
            served,
            m * sustainable,
            None,
            args.duration,
            args.seed + int(m),
            MIX,
            args.input_len,
            args.output_len,
            args.timeout,
        )
        runs[f"{m:g}x"] = {"offered_rps": m * sustainable, **summarize(run, targets)}
        s = runs[f"{m:g}x"]
        print(f"{m:g}x ({m * sustainable:.1f} req/s): {s['requests']} requests, 5xx {s['http_5xx']}")
        for cls, c in s["by_class"].items():
            p50, p99 = c["ttft_p50_s"], c["ttft_p99_s"]
            late = c[f"after_{SETTLE_S:g}s"]
            print(
                f"  {cls:12s} sent {c['sent']:4d} {c['status']} shed {c['shed_fraction']:.0%} TTFT p50 "
                f"{p50 if p50 is None else round(p50, 3)} p99 {p99 if p99 is None else round(p99, 3)} s "
                f"(target {c['ttft_target_s']:g} s); after {SETTLE_S:g} s: p50 {late['ttft_p50_s']} "
                f"p99 {late['ttft_p99_s']}"
            )
    path = write_result(
        args.name,
        {
            "what": "ridgeline serve's default app (1 prefill + 1 decode, admission, default SLO classes) on local "
            "Ray, 127.0.0.1; sustainable rate from a closed loop, then Poisson at multiples of it with a "
            "class mix; ridgeline bench's load generator in the same process",
            "args": vars(args),
            "model": model,
            "mix": MIX,
            "slo_targets_s": targets,
            "idle_ttft_p50_s": _quantile(idle_ttft, 0.5),
            "sustainable_rps": sustainable,
            "runs": runs,
        },
    )
    print(path)
    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
