"""A real Prometheus (Debian `prometheus`) scrapes a running app's /metrics — the frontend plus every worker
replica — under a short bounded load, evaluates the recording rules and alerts, and every PromQL expression
of every dashboard and rule returns data."""

import asyncio
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray_helpers import POOL, app_config

from observability.grafana import dashboards

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "observability" / "prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and every rule (alerts: the signal, without its threshold)."""
    out = []
    for name in dashboards.DASHBOARDS:
        for panel in json.loads(dashboards.render(name))["panels"]:
            for target in panel["targets"]:
                expr = (
                    target["expr"].replace("$__rate_interval", "1m").replace('model=~"$model"', 'model=~".+"')
                )
                out.append((f"{name}: {panel['title']}", expr))
    for file in ("rules.yml", "alerts.yml"):
        for group in yaml.safe_load((RULES / file).read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out.append((f"{file}: {rule['record']}", rule["record"]))
                    out.append((f"{file}: {rule['record']} (expr)", rule["expr"]))
                else:
                    out.append(
                        (f"{file}: {rule['alert']}", re.sub(r"\s*[<>]=?\s*[0-9.]+\s*$", "", rule["expr"]))
                    )
    return out


@pytest.fixture
def prometheus(tmp_path):
    """start(target, metrics_path) -> the Prometheus base URL; stopped after the test."""
    procs = []

    def start(target: str, metrics_path: str) -> str:
        for file in ("rules.yml", "alerts.yml"):  # evaluated every second here, not every 30 s
            (tmp_path / file).write_text((RULES / file).read_text().replace("interval: 30s", "interval: 1s"))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml"), str(tmp_path / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "ridgeline",
                    "metrics_path": metrics_path,
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115 - the child holds it
            )
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _load(url: str, seconds: float) -> None:
    """Interactive, standard and batch requests, streamed and not, sharing prefixes; a few invalid ones."""
    system = [(7 * t) % 300 + 5 for t in range(48)]

    async def one(client, i):
        headers = {"x-slo-class": ("interactive", "standard", "batch")[i % 3]}
        body = {
            "model": "tiny-llama",
            "prompt": system + [(11 * i + t) % 300 + 5 for t in range(8 + i % 5)],
            "max_tokens": 8 + i % 6,
            "ignore_eos": True,
            "stream": i % 2 == 0,
        }
        if i % 10 == 9:
            body["max_tokens"] = 0  # invalid: counted as such
        r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
        assert r.status_code == (400 if i % 10 == 9 else 200), r.text

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            start, i = time.monotonic(), 0
            while time.monotonic() - start < seconds:
                await asyncio.gather(*(one(client, i + k) for k in range(4)))
                i += 4

    asyncio.run(main())


def _without_data(prom: str) -> list[str]:
    """The expressions that return no data now (each must be a valid query)."""
    missing = []
    for where, expr in _expressions():
        r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert r["status"] == "success", (where, expr, r)
        if not r["data"]["result"]:
            missing.append(f"{where}: {expr}")
    return missing


def test_every_dashboard_and_rule_expression_returns_data(deploy, llama, prometheus):
    tiers = {**POOL, "kv_dram_blocks": 64}
    url = deploy("obs", **app_config(llama, prefill=tiers, decode=tiers, admission=True, spec="ngram"))
    target = url.removeprefix("http://").split("/")[0]
    prom = prometheus(target, "/obs/metrics")
    _load(url, seconds=6)
    deadline = time.monotonic() + 20  # a few more scrapes and rule evaluations after the load, at most
    while (missing := _without_data(prom)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, "no data for:\n" + "\n".join(missing)
    # the last sample of each series in the last minute: one slow worker scrape under load marks the series
    # stale for an instant query, not for this
    query = "count by (role) (last_over_time(ridgeline_engine_steps_total[1m]))"
    scraped = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=30).json()["data"]["result"]
    assert {s["metric"]["role"] for s in scraped} == {
        "prefill",
        "decode",
    }  # the workers came through /metrics
