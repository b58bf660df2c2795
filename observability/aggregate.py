"""One /metrics for the whole app: the frontend's own metrics plus every worker replica's `ridgeline_*`
families, fetched from the metrics endpoints the workers publish in the registry, each sample labelled
with its `replica`. A worker that does not answer within the timeout is left out of that scrape (and
counted in ridgeline_metrics_scrape_failures_total)."""

import asyncio
import urllib.request

from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_FAILURES = Counter(
    "ridgeline_metrics_scrape_failures_total",
    "Worker metrics endpoints that did not answer a frontend scrape in time",
    ["replica"],
)


def _fetch(url: str, timeout_s: float, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as r:  # noqa: S310 - URLs from our own registry
        return r.read().decode()


class _Families:
    """Collector yielding already-built families (what generate_latest renders)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def merge(texts: dict[str | None, str]) -> bytes:
    """Exposition texts by replica (None: the frontend itself, whose families are all kept) into one."""
    merged: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            if replica is not None and not family.name.startswith("ridgeline_"):
                continue  # a worker's process metrics would collide with the frontend's
            into = merged.setdefault(family.name, family)
            samples = family.samples
            if replica is not None:
                samples = [s._replace(labels={**s.labels, "replica": replica}) for s in samples]
            if into is family:
                family.samples = list(samples)
            else:
                into.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([f for f in merged.values() if f.samples]))
    return generate_latest(registry)


async def app_metrics(workers: dict[str, str], timeout_s: float = 2.0, token: str | None = None) -> bytes:
    """workers: replica -> its metrics URL (token: the bearer token they require, the app's API key). The
    frontend's registry plus each worker's ridgeline_* families."""
    replicas = list(workers)
    results = await asyncio.gather(
        *(asyncio.to_thread(_fetch, workers[r], timeout_s, token) for r in replicas), return_exceptions=True
    )
    texts: dict[str | None, str] = {}
    for replica, result in zip(replicas, results, strict=True):
        if isinstance(result, BaseException):
            SCRAPE_FAILURES.labels(replica).inc()
        else:
            texts[replica] = result
    texts = {None: generate_latest(REGISTRY).decode(), **texts}
    return merge(texts)
