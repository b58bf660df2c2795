"""Speculative decoding as served: the reference target on a decode replica, drafts from the reference draft
on a CPU draft worker (pipelined, or each step waiting for its drafts) or by prompt lookup, against no
speculation — over HTTP through the real Ray Serve app on this machine.

    python -m benchmarks.spec_served [--requests 12] [--max-tokens 64]

Requests go one at a time (greedy, held-out prompts as in benchmarks/spec_acceptance.py); reported per mode:
end-to-end seconds per request and the decode pool's drafted / accepted tokens and verify steps, read from
the app's /metrics, and whether every answer equals the one without speculation.
"""

import argparse
import os
import re
import time

import httpx

from benchmarks.results_io import write_result
from benchmarks.spec_acceptance import MODELS, heldout_prompts

PORT = 8197
COUNTERS = (
    "ridgeline_spec_draft_tokens_total",
    "ridgeline_spec_accepted_tokens_total",
    "ridgeline_spec_verifications_total",
)


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        name: sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)) for name in COUNTERS
    }


def ask(url: str, prompt: list[int], max_tokens: int) -> list[int]:
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=120,
        json={
            "model": "m",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    import ray
    from ray import serve

    from services.app import ServeConfig, build_app

    target, draft = str(MODELS / "ridgeline-ref-target"), str(MODELS / "ridgeline-ref-draft")
    prompts = heldout_prompts(target, args.requests + 2, args.prompt_tokens)
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    decode = {"num_cpus": 1, "engine": {"num_blocks": 1024}}
    drafts = {"model": draft, "num_cpus": 1, "deadline_s": 2.0, "engine": {"num_blocks": 1024}}
    modes = {
        "plain": {},
        "ngram": {"spec": "ngram"},
        "draft_pipelined": {"spec": "draft", "draft": drafts},
        "draft_waiting": {"spec": "draft", "draft": {**drafts, "wait_s": 1.0}},
    }
    results, reference = {}, None
    for mode, options in modes.items():
        config = ServeConfig(
            model=target,
            served_model_name="m",
            mode="aggregated",
            decode=decode,
            num_speculative_tokens=args.k,
            **options,
        )
        serve.run(build_app(config), name=mode, route_prefix=f"/{mode}")
        url = f"http://127.0.0.1:{PORT}/{mode}"

        for p in prompts[-2:]:  # warm-up
            ask(url, p, args.max_tokens)
        before = counters(url)
        start = time.perf_counter()
        answers = [ask(url, p, args.max_tokens) for p in prompts[: args.requests]]
        seconds = time.perf_counter() - start
        after = counters(url)
        drafted, accepted, verifies = (after[n] - before[n] for n in COUNTERS)
        reference = reference or answers
        results[mode] = {
            "seconds_per_request": round(seconds / args.requests, 4),
            "identical_to_plain": sum(a == b for a, b in zip(answers, reference, strict=True)),
            "drafted": drafted,
            "accepted": accepted,
            "verify_steps": verifies,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "mean_accepted_length": round(accepted / verifies, 3) if verifies else None,
        }
        results[mode]["speedup_vs_plain"] = round(
            results["plain"]["seconds_per_request"] / results[mode]["seconds_per_request"], 3
        )
        print(mode, results[mode], flush=True)
        serve.delete(mode)
    path = write_result(
        "spec_served_cpu",
        {
            "target": "ridgeline-ref-target",
            "draft": "ridgeline-ref-draft",
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "num_speculative_tokens": args.k,
            "results": results,
            "note": "sequential greedy requests over HTTP through Ray Serve, aggregated mode, 1 decode replica (1 CPU) "
            "and 1 draft worker (1 CPU) on a 2-core machine that also runs the proxy, ingress and client",
        },
    )
    print(path)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
