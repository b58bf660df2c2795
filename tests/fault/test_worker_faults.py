"""Faults in a running app (1 prefill + 2 decode replicas on local Ray), judged by what the client sees:
a corrupted KV transfer, a prefill replica killed after handing out a handle, an abandoned handle, and a
decode replica killed mid-stream."""

import json
import os
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray_helpers import MODEL, app_config, pool_stats, wait_pools_idle

from engine import LLM, SamplingParams
from services.worker_protocol import WorkerRequest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "faults"
ENGINE = {"num_blocks": 512, "max_model_len": 512}
POOLS = {"PrefillWorker": 1, "DecodeWorker": 2}
PROMPT = "A prompt long enough to fill a couple of KV blocks before the first token is sampled"


@pytest.fixture(scope="module")
def url(deploy, llama):
    pool = {"num_cpus": 0.25, "engine": ENGINE}
    return deploy(
        APP,
        **app_config(
            llama,
            kv_transport="nixl",
            kv_lease_s=2.0,
            kv_pull_timeout_s=3.0,
            prefill=pool,
            # each decode replica's first pull lands corrupted (tests/services/fragile_workers.py)
            decode={**pool, "replicas": 2, "worker_cls": "fragile_workers:CorruptingDecodeWorker"},
        ),
    )


@pytest.fixture(scope="module")
def reference(llama):
    return LLM(llama, **ENGINE)


def greedy(reference, prompt: str, n: int) -> list[int]:
    return (
        reference.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
    )


def total(stats: dict[str, dict], key: str) -> int:
    return sum(s[key] for s in stats.values())


def kill_replica(deployment: str, replica: str, pid: int) -> None:
    """Kill the replica's actor process, as a node failure would, and wait until the process is gone."""
    ray.kill(
        ray.get_actor(f"SERVE_REPLICA::{APP}#{deployment}#{replica}", namespace="serve"), no_restart=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # ray.kill returns before the process has exited
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{deployment} replica {replica} (pid {pid}) still alive 30 s after ray.kill")


def wait_replicas(deployment: str, count: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pool_stats(APP, deployment, count)
            return
        except Exception:  # noqa: BLE001 - replicas still restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_corrupted_transfer_is_detected_and_retried(url, reference):
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.json()["choices"][0]["token_ids"] == greedy(reference, PROMPT, 16)
    decode = pool_stats(APP, "DecodeWorker", 2)
    assert total(decode, "kv_pull_failures") == 1  # the first pull landed corrupted and was caught
    assert total(decode, "kv_pulls") == 1 and total(decode, "kv_recomputes") == 0  # the retry verified


def test_prefill_killed_after_handing_out_kv_decode_recomputes(url, reference):
    prefill = serve.get_deployment_handle("PrefillWorker", app_name=APP)
    decode = serve.get_deployment_handle("DecodeWorker", app_name=APP)
    stats = pool_stats(APP, "DecodeWorker", 2)
    before, failures = total(stats, "kv_recomputes"), total(stats, "kv_pull_failures")
    prompt_ids = reference.tokenizer.encode(PROMPT)
    req = WorkerRequest(
        "killed-prefill", prompt_ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    first = prefill.prefill.remote(req).result(timeout_s=30)
    assert first.kv_handle is not None
    (owner,) = pool_stats(APP, "PrefillWorker", 1).values()
    assert owner["replica"] == first.delta.worker
    kill_replica("PrefillWorker", owner["replica"], owner["pid"])
    req.kv_handle, req.output_token_ids = first.kv_handle, first.delta.token_ids
    tokens = list(first.delta.token_ids)
    for delta in decode.options(stream=True).generate.remote(req):
        tokens += delta.token_ids
    assert tokens == greedy(reference, PROMPT, 12)
    stats = pool_stats(APP, "DecodeWorker", 2)
    assert total(stats, "kv_recomputes") == before + 1
    assert total(stats, "kv_pull_failures") == failures + 1  # an unreachable owner is not asked again
    wait_replicas("PrefillWorker", 1)


def test_abandoned_handle_is_reclaimed_by_its_lease(url, reference):
    wait_replicas("PrefillWorker", 1)
    prefill = serve.get_deployment_handle("PrefillWorker", app_name=APP)
    req = WorkerRequest(
        "abandoned",
        reference.tokenizer.encode(PROMPT),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    )
    first = prefill.prefill.remote(req).result(timeout_s=30)
    (held,) = pool_stats(APP, "PrefillWorker", 1).values()
    assert held["held_leases"] == 1 and held["kv_free_blocks"] == held["kv_total_blocks"] - len(
        first.kv_handle.block_ids
    )
    stats = wait_pools_idle(APP, POOLS, timeout=20)  # nobody pulls: the 2 s lease must free the blocks
    assert total(stats["PrefillWorker"], "kv_leases_reclaimed") == 1


def test_decode_killed_mid_stream_requests_migrate(url, reference):
    wait_replicas("PrefillWorker", 1)
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    want = [
        o.outputs[0].token_ids
        for o in reference.generate(
            prompts, SamplingParams(temperature=0, max_tokens=440, ignore_eos=True, logprobs=1)
        )
    ]
    started = [threading.Event() for _ in prompts]
    results: list[dict] = [{} for _ in prompts]

    def stream(i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": prompts[i],
            "max_tokens": 440,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
            "logprobs": 1,
        }
        text, errors, chunks, logprobs = "", [], 0, []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                text += "".join(c["text"] for c in chunk["choices"])
                logprobs += [lp for c in chunk["choices"] for lp in c["logprobs"]["token_logprobs"]]
                chunks += 1
                if chunks == 3:
                    started[i].set()
        started[i].set()
        results[i].update(text=text, errors=errors, logprobs=logprobs)

    before = pool_stats(APP, "DecodeWorker", 2)
    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(60)
    stats = pool_stats(APP, "DecodeWorker", 2)
    busy = [s for s in stats.values() if s["unfinished"]]
    assert busy, "streams finished before a replica could be killed"
    spread = sorted(after["requests"] - before[name]["requests"] for name, after in stats.items())
    assert spread[0] >= 2 and sum(spread) == 8, f"least-loaded routing should spread 8 streams: {spread}"
    kill_replica("DecodeWorker", busy[0]["replica"], busy[0]["pid"])
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a stream hung"
    for i, res in enumerate(results):
        assert res["errors"] == []
        assert res["text"] == reference.tokenizer.decode(want[i]), f"stream {i} differs from the reference"
        # a migrated stream keeps one logprob per token: the new worker resumes with the ones already sent
        assert len(res["logprobs"]) == 440, f"stream {i}: {len(res['logprobs'])} logprobs for 440 tokens"
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    migrated = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("ridgeline_request_migrations_total")
    ]
    assert migrated and migrated[0] >= 1
    wait_replicas("DecodeWorker", 2)
