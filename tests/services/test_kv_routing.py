"""KV-aware routing end to end: replicas report KV event batches in their routing stats, the Serve router
keeps an exact index and sends each prompt where its prefix already is."""

import asyncio

import httpx
import pytest
from ray_helpers import MODEL, POOL, app_config

from engine.kv.block_hash import hash_extra, prompt_block_hashes, update_block_hashes
from engine.request import Request
from engine.sampling_params import SamplingParams
from services.kv_feed import KVEventFeed
from services.messages.kv_feed import KVFeedReport

SYSTEMS = [[(17 * s + 3 * t) % 300 + 5 for t in range(48)] for s in range(4)]  # 3 blocks each
REQUESTS = [SYSTEMS[(i * 7) % 4] + [(11 * i + t) % 300 + 5 for t in range(9)] for i in range(24)]


def test_prompt_block_hashes_equal_the_engine_s():
    extra = hash_extra("model", "bfloat16", "salt")
    request = Request("r", list(range(5, 75)), SamplingParams(), hash_extra=extra)
    update_block_hashes(request, 16)
    assert (
        prompt_block_hashes(list(range(5, 75)), 16, extra) == request.block_hashes
        and len(request.block_hashes) == 4
    )


def test_event_feed_numbers_batches_and_snapshots():
    from engine.kv.events import KVEventLog

    log = KVEventLog()
    held = {"hbm": [b"a"]}
    feed = KVEventFeed(log, lambda: held, keep=2, snapshot_every=3)
    first = feed.report()
    assert first == KVFeedReport(0, [], (0, {"hbm": [b"a"]}))
    for name in (b"b", b"c", b"d"):
        log.record("stored", "hbm", name)
        out = feed.report()
    assert out.seq == 3 and [seq for seq, _ in out.batches] == [2, 3]  # only the last 2 kept
    assert out.batches[-1][1] == [("stored", "hbm", [b"d"])] and out.snapshot is not None  # every 3rd report


async def _hit_rate(url: str) -> float:
    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        r = await client.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    cached = 0
    async with httpx.AsyncClient(timeout=120) as client:
        for start in range(0, len(REQUESTS), 3):  # three at a time, as concurrent users
            cached += sum(await asyncio.gather(*(one(client, p) for p in REQUESTS[start : start + 3])))
            # routing stats (every 0.5 s: two periods) carry the new blocks to the router
            await asyncio.sleep(1.0)
    return cached / sum(len(p) for p in REQUESTS)


async def _hit_rates(urls: dict[str, str]) -> dict[str, float]:
    """The same workload against each app at once (each app's replicas are its own): one run's wall time."""
    rates = await asyncio.gather(*(_hit_rate(url) for url in urls.values()))
    return dict(zip(urls, rates, strict=True))


@pytest.mark.ray
def test_kv_aware_router_over_http_hits_more_shared_prefixes_than_least_loaded(deploy, llama):
    pool = {**POOL, "replicas": 3, "engine": {"num_blocks": 48, "max_model_len": 256}}
    apps = deploy.many(
        {
            f"route-{router}": app_config(llama, mode="aggregated", decode=pool, router=router)
            for router in ("least_loaded", "kv_aware")
        }
    )
    urls = {router: apps[f"route-{router}"] for router in ("least_loaded", "kv_aware")}
    rates = asyncio.run(_hit_rates(urls))
    print("prefix hit rates", rates)
    assert rates["kv_aware"] > rates["least_loaded"], rates
    assert rates["kv_aware"] > 0.4, rates
    # the router's decisions are metrics of the frontend process (where the router runs)
    metrics = httpx.get(f"{urls['kv_aware']}/metrics", timeout=30).text
    matched = [
        line
        for line in metrics.splitlines()
        if line.startswith('ridgeline_router_matched_blocks_total{policy="kv_aware",tier="hbm"}')
    ]
    assert matched and float(matched[0].split()[-1]) > 0, matched
