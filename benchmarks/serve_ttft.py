"""Time to first token, disaggregated (prefill pool -> KV handoff -> decode pool) vs aggregated (one pool),
over HTTP against the real Ray Serve app on this machine.

    python -m benchmarks.serve_ttft [--requests 30] [--prompt-tokens 96] [--max-tokens 16]

Requests go one at a time (no queueing), streaming, greedy; TTFT = first content chunk, and the second
token's arrival is reported too, since disaggregation moves the KV handoff between the first and second.
"""

import argparse
import json
import os
import statistics
import time

import httpx

from benchmarks.results_io import write_result


def one(url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                arrivals.append(time.perf_counter() - t0)
    return {
        "ttft_s": arrivals[0],
        "second_token_s": arrivals[1],
        "e2e_s": arrivals[-1],
        "tpot_s": (arrivals[-1] - arrivals[0]) / max(len(arrivals) - 1, 1),
    }


def summarize(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = sorted(s[key] for s in samples)
        out[key] = {
            "mean": statistics.mean(values),
            "p50": values[len(values) // 2],
            "p90": values[int(len(values) * 0.9)],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    import ray
    from ray import serve

    from engine.tiny_model import cached_tiny_model
    from services.app import ServeConfig, build_app

    model = args.model or str(cached_tiny_model())
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8199})
    pool = {"num_cpus": 0.5, "engine": {"num_blocks": 256}}
    results = {}
    for mode in ("aggregated", "disaggregated"):
        config = ServeConfig(
            model=model, served_model_name="m", mode=mode, prefill=pool, decode=pool, kv_transport="nixl"
        )
        serve.run(build_app(config), name=mode, route_prefix=f"/{mode}")
        url = f"http://127.0.0.1:8199/{mode}"
        for i in range(5):  # warm-up
            one(url, "m", [7 + i] * args.prompt_tokens, args.max_tokens)
        samples = [
            one(url, "m", [(11 * i + j) % 300 + 4 for j in range(args.prompt_tokens)], args.max_tokens)
            for i in range(args.requests)
        ]
        results[mode] = summarize(samples)
        print(mode, {k: round(v["p50"] * 1e3, 2) for k, v in results[mode].items()}, "ms (p50)", flush=True)
        serve.delete(mode)
    ratios = {
        k: results["disaggregated"][k]["p50"] / results["aggregated"][k]["p50"] for k in results["aggregated"]
    }
    print("disaggregated / aggregated (p50):", {k: round(v, 2) for k, v in ratios.items()})
    path = write_result(
        "serve_ttft_cpu",
        {
            "model": os.path.basename(model),
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "transport": "nixl",
            "results": results,
            "disaggregated_over_aggregated_p50": ratios,
            "note": "sequential streaming requests over HTTP through Ray Serve; 1 prefill + 1 decode replica vs "
            "1 aggregated replica, tiny model on CPU",
        },
    )
    print(path)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
