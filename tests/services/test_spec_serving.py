"""Speculative decoding served on Ray: prompt lookup inside the decode workers, and a draft model on CPU
draft workers; greedy answers equal the plain ones, drafts are accepted, and a killed draft worker never
stalls decode."""

import asyncio
import os
import re
import signal

import httpx
import pytest
import ray
from ray_helpers import MODEL, app_config, pool_stats

pytestmark = pytest.mark.ray
PROMPTS = [[7, 8, 9, 10] * 6, [100 + i % 13 for i in range(40)], [(31 * i) % 300 + 5 for i in range(30)]]


def _greedy(url: str, max_tokens: int = 24, costs: list | None = None) -> list[list[int]]:
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": p,
                            "max_tokens": max_tokens,
                            "temperature": 0,
                            "ignore_eos": True,
                            "return_token_ids": True,
                        },
                    )
                    for p in PROMPTS
                )
            )
        for r in rs:
            assert r.status_code == 200, r.text
        if costs is not None:
            costs.extend(r.json()["usage"]["cost_usd"] for r in rs)
        return [r.json()["choices"][0]["token_ids"] for r in rs]

    return asyncio.run(main())


def _spec_stats(app: str) -> tuple[int, int]:
    stats = pool_stats(app, "DecodeWorker", 1)
    return (
        sum(s["spec_draft_tokens"] for s in stats.values()),
        sum(s["spec_accepted_tokens"] for s in stats.values()),
    )


def _reference(llama: str, max_tokens: int) -> list[list[int]]:
    """The engine without speculation (the serving path's parity with it is tested elsewhere)."""
    from engine import LLM, SamplingParams

    outs = LLM(llama, num_blocks=256).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    return [o.outputs[0].token_ids for o in outs]


def _kill_app(llama: str, wait_s: float) -> dict:
    return app_config(
        llama,
        mode="aggregated",
        spec="draft",
        draft={
            "model": llama,
            "num_cpus": 0.25,
            "deadline_s": 2.0,
            "wait_s": wait_s,
            "engine": {"num_blocks": 256},
        },
    )


@pytest.fixture(scope="module")
def apps(deploy, llama):
    """Every app of the module, deployed at once (each test uses its own apps, none shared between tests)."""
    # the draft model is the target itself here (same tokenizer, tiny): its greedy drafts are all right; steps
    # wait for their drafts, so every step is drafted however slow this machine's draft calls are
    draftspec = app_config(
        llama,
        spec="draft",
        num_speculative_tokens=3,
        draft={
            "model": llama,
            "num_cpus": 0.25,
            "deadline_s": 5.0,
            "wait_s": 5.0,
            "engine": {"num_blocks": 256},
        },
    )
    return deploy.many(
        {
            "ngram": app_config(llama, mode="aggregated", spec="ngram"),
            "draftspec": draftspec,
            **{f"draftkill{int(wait_s)}": _kill_app(llama, wait_s) for wait_s in (0.0, 1.0)},
        }
    )


def test_ngram_and_draft_model_speculation_keep_greedy_answers(apps, llama):
    ngram = apps["ngram"]
    assert _greedy(ngram) == _reference(llama, 24)
    drafted, accepted = _spec_stats("ngram")
    assert drafted > 0 and accepted > 0
    draft = apps["draftspec"]
    costs: list[float] = []
    assert _greedy(draft, 48, costs) == _reference(llama, 48)
    drafted, accepted = _spec_stats("draftspec")
    assert drafted > 0 and accepted / drafted > 0.9
    # the draft pool's engine time is charged to the requests at its price, beside the decode pool's
    metrics = httpx.get(f"{draft}/metrics", timeout=30).text
    dollars = {
        pool: float(v)
        for pool, v in re.findall(
            r'ridgeline_cost_dollars_total\{model="tiny-llama",pool="(\w+)",slo_class="standard"\} (\S+)',
            metrics,
        )
    }
    assert dollars.get("draft", 0) > 0 and dollars.get("decode", 0) > 0
    assert sum(costs) == pytest.approx(sum(dollars.values()), rel=1e-6)
    pools = {p["name"]: p for p in httpx.get(f"{draft}/v1/pools", timeout=30).json()["data"]}
    assert (
        pools["draft"]["role"] == "draft"
        and pools["draft"]["device"] == "cpu"
        and pools["draft"]["price_per_hour"] > 0
    )


@pytest.mark.parametrize("wait_s", [0.0, 1.0], ids=["pipelined", "waiting"])
def test_a_killed_draft_worker_never_stalls_decode(apps, wait_s):
    app = f"draftkill{int(wait_s)}"
    url = apps[app]
    before = _greedy(url)
    prefix = f"SERVE_REPLICA::{app}#DraftWorker#"
    name = next(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )
    pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    assert _greedy(url) == before  # answered, unchanged, while the draft pool is gone
