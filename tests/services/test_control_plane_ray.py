"""The control plane with the deployed app on a local Ray: pools and workers in the registry (embedded
actor and a real etcd on 127.0.0.1), /v1/pools, a killed worker leaving the registry and the router's
choices, an etcd restart during serving, and the dollars of a run adding up."""

import asyncio
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray_helpers import MODEL, POOL, app_config, pool_stats, wait_pools_idle

from control_plane.registry import keys
from control_plane.registry_etcd import open_registry

pytestmark = pytest.mark.ray


def _wait(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def _pools(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/pools", timeout=30)
    assert r.status_code == 200, r.text
    return {p["name"]: p for p in r.json()["data"]}


def _complete(url: str, n: int, max_tokens: int = 6) -> list[dict]:
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": [(13 * i + t) % 300 + 5 for t in range(20 + 5 * i)],
                            "max_tokens": max_tokens,
                            "ignore_eos": True,
                        },
                    )
                    for i in range(n)
                )
            )
        for r in rs:
            assert r.status_code == 200, r.text
        return [r.json() for r in rs]

    return asyncio.run(main())


def _stream_tokens(url: str, first: int) -> int:
    """Completion tokens of a streamed request (96 asked); a 200 stream that broke would count fewer."""
    tokens = 0
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": [first] * 24,
            "max_tokens": 96,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line and '"choices": []' in line:
                tokens = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
    return tokens


def _etcd_keys(url: str, prefix: str) -> dict[str, dict]:
    async def main():
        reg = open_registry(url)
        try:
            return (await reg.get_prefix(prefix))[0]
        finally:
            await reg.close()

    return asyncio.run(main())


def test_pools_endpoint_and_the_dollars_of_a_run_add_up(deploy, llama):
    prices = {"prefill": 3.6, "decode": 1.8}
    url = deploy(
        "cost",
        **app_config(
            llama,
            prefill={**POOL, "price_per_hour": prices["prefill"], "device": "cpu"},
            decode={**POOL, "price_per_hour": prices["decode"], "kv_dtype": "auto"},
            admission=True,
        ),
    )  # (8 short requests: far from any target)
    _wait(
        lambda: all(len(p["workers"]) == 1 and p["registered"] for p in _pools(url).values()),
        30,
        "both pools and their workers registered",
    )
    pools = _pools(url)
    assert set(pools) == {"prefill", "decode"}
    for name, pool in pools.items():
        assert (pool["role"], pool["device"], pool["price_per_hour"]) == (name, "cpu", prices[name])
        assert pool["weight_dtype"] == "auto" and pool["kv_dtype"] == "auto" and pool["replicas"] == 1
        worker = pool["workers"][0]
        assert worker["pool"] == name and worker["transport"] in ("nixl", "ray")
        assert not {"pid", "host", "node_ip", "metrics_url"} & set(
            worker
        )  # only with expose_worker_addresses

    busy = {
        d: next(iter(pool_stats("cost", d, 1).values()))["busy_seconds"]
        for d in ("PrefillWorker", "DecodeWorker")
    }
    answers = _complete(url, 8)
    after = wait_pools_idle("cost", {"PrefillWorker": 1, "DecodeWorker": 1})
    spent = sum(
        (next(iter(after[d].values()))["busy_seconds"] - busy[d]) * prices[pool] / 3600
        for d, pool in (("PrefillWorker", "prefill"), ("DecodeWorker", "decode"))
    )
    charged = sum(a["usage"]["cost_usd"] for a in answers)
    assert spent > 0 and abs(charged - spent) <= 1e-6 * spent + 1e-12  # every engine second was charged
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    counted = {
        m[0]: float(m[1])
        for m in re.findall(
            r'ridgeline_cost_dollars_total\{model="tiny-llama",pool="(\w+)",slo_class="standard"\} (\S+)',
            metrics,
        )
    }
    assert set(counted) == {"prefill", "decode"} and abs(sum(counted.values()) - charged) <= 1e-6 * charged
    tokens = {
        m[0]: float(m[1])
        for m in re.findall(
            r'ridgeline_compute_tokens_total\{kind="prefill",model="tiny-llama",pool="(\w+)",slo_class="standard"\} (\S+)',
            metrics,
        )
    }
    assert tokens["prefill"] >= sum(a["usage"]["prompt_tokens"] for a in answers)


def test_etcd_registry_a_killed_worker_leaves_and_an_etcd_restart_does_not_stop_serving(deploy, llama, etcd):
    app = "etcdapp"
    url = deploy(
        app,
        **app_config(
            llama,
            mode="aggregated",
            decode={**POOL, "replicas": 2},
            registry=etcd.url,
            registry_ttl_s=2.0,
            expose_worker_addresses=True,
        ),
    )  # the pid to kill
    workers_prefix = keys.workers(app)
    _wait(lambda: len(_etcd_keys(etcd.url, workers_prefix)) == 2, 30, "both workers in etcd")
    assert keys.pool(app, "decode") in _etcd_keys(etcd.url, keys.app(app))
    _wait(lambda: len(_pools(url)["decode"]["workers"]) == 2, 15, "the frontend's view has both")
    victim = _pools(url)["decode"]["workers"][0]
    _complete(url, 4)

    streams = ThreadPoolExecutor(4).map(
        lambda i: _stream_tokens(url, 5 + i), range(4)
    )  # in flight at the kill
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    gone = _wait(
        lambda: keys.worker(app, "decode", victim["replica"]) not in _etcd_keys(etcd.url, workers_prefix),
        2.0 + 5,
        "the killed worker leaves etcd",
    )
    print(f"killed worker left etcd {gone:.2f} s after SIGKILL (TTL 2 s)")
    _wait(
        lambda: victim["replica"] not in {w["replica"] for w in _pools(url)["decode"]["workers"]},
        10,
        "the frontend's view drops it",
    )
    assert list(streams) == [96] * 4  # streams on the killed worker migrated and finished (serving's rules)
    _complete(url, 6)  # the router no longer sends anything to it: every request is answered
    # Serve replaces the replica; the new one registers itself
    _wait(lambda: len(_etcd_keys(etcd.url, workers_prefix)) == 2, 60, "the replacement registers")

    etcd.stop()
    try:
        _complete(url, 6)  # served from the last known state while etcd is down
        assert len(_pools(url)["decode"]["workers"]) == 2
    finally:
        etcd.start(wipe=True)  # etcd came back empty: workers and pools must register again
    _wait(
        lambda: (
            len(_etcd_keys(etcd.url, workers_prefix)) == 2
            and keys.pool(app, "decode") in _etcd_keys(etcd.url, keys.app(app))
        ),
        30,
        "workers and pools registered again",
    )
    _complete(url, 4)
