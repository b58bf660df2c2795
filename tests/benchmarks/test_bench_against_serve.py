"""`ridgeline bench` as a user runs it, against a real local `ridgeline serve` (tiny model, subprocesses):
a bounded run yields every metric with sane values and its files; a shared-prefix workload raises the
server's prefix-hit counter; errors and timeouts are counted, not crashes; Ctrl-C writes partial results;
a sweep and `compare` work."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RIDGELINE = str(Path(sys.executable).parent / "ridgeline")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(llama, stop_in_background):
    port = _free_port()
    proc = subprocess.Popen(
        [
            RIDGELINE,
            "serve",
            "--model",
            llama,
            "--port",
            str(port),
            "--num-blocks",
            "256",
            "--max-model-len",
            "512",
            "--worker-cpus",
            "0.25",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while "Ridgeline is serving" not in proc.stdout.readline():
            assert proc.poll() is None and time.monotonic() < deadline, "ridgeline serve did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_in_background(proc)  # the next modules run while Ray and Serve shut down


def bench(url: str, out: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RIDGELINE, "bench", "--url", url, "--out", str(out), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _hbm_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(v) for v in re.findall(r'ridgeline_kv_hit_blocks_total\{[^}]*tier="hbm"[^}]*\} (\S+)', text)
    )


def test_a_rag_run_reports_sane_metrics_writes_its_files_and_reuses_prefixes(served, tmp_path):
    hits_before = _hbm_hits(served)
    r = bench(
        served,
        tmp_path,
        "--workload",
        "rag",
        "--rate",
        "4",
        "--requests",
        "12",
        "--doc-len",
        "30",
        "--question-len",
        "5",
        "--output-len",
        "8",
        "--hit-ratio",
        "0.8",
        "--slo-ttft-ms",
        "5000",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TTFT (ms)" in r.stdout and "tokens per dollar (server cost_usd)" in r.stdout
    data = json.loads((tmp_path / "result.json").read_text())
    s = data["summary"]
    assert (s["completed"], s["failed"]) == (12, 0)
    for req in data["requests"]:
        assert 0 < req["ttft_s"] < req["e2e_s"]
        assert req["completion_tokens"] == 8 and req["prompt_tokens"] > 0 and req["cost_usd"] > 0
    assert s["completion_tokens"] == 96 and s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["e2e_s"]["max"]
    assert s["itl_s"]["count"] > 0 and s["tpot_s"]["mean"] > 0 and s["goodput"]["requests"] <= 12
    assert s["cost"]["source"] == "server cost_usd" and s["cost"]["tokens_per_dollar"] > 0
    assert s["cached_prompt_tokens"] > 0  # documents came back: the server served them from its cache
    assert _hbm_hits(served) > hits_before  # ... and its prefix-hit counter rose
    rows = (tmp_path / "result.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("start,slo_class,ok")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "result_latency_cdf.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400


def test_chat_conversations_carry_their_history(served, tmp_path):
    r = bench(
        served,
        tmp_path,
        "--workload",
        "chat",
        "--turns",
        "3",
        "--requests",
        "2",
        "--concurrency",
        "2",
        "--input-len",
        "4",
        "--output-len",
        "5",
        "--system-len",
        "8",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["summary"]["completed"] == 6, data["summary"]["errors"]
    by_start = sorted(data["requests"], key=lambda q: q["start"])
    # each conversation's later turns carry the earlier turns and answers: their prompts grow
    prompts = [q["prompt_tokens"] for q in by_start]
    assert max(prompts) > min(prompts) + 2 * 5


def test_errors_and_timeouts_are_counted_not_crashes(served, tmp_path):
    runs = {  # independent runs, side by side (each command's start is seconds of one core)
        "long": (served, "--requests", "3", "--concurrency", "3", "--input-len", "600"),
        "slow": (
            served,
            "--requests",
            "2",
            "--concurrency",
            "2",
            "--input-len",
            "10",
            "--output-len",
            "400",
            "--timeout",
            "0.3",
        ),
        "nobody": ("http://127.0.0.1:9", "--model", "m", "--requests", "2", "--rate", "10"),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        done = {name: pool.submit(bench, url, tmp_path / name, *args) for name, (url, *args) in runs.items()}
    r = done["long"].result()
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "long" / "result.json").read_text())["summary"]
    assert s["errors"] == {"http_400": 3} and s["completed"] == 0  # prompts longer than max_model_len
    r = done["slow"].result()
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "slow" / "result.json").read_text())["summary"]
    assert s["errors"] == {"timeout": 2}
    r = done["nobody"].result()
    assert r.returncode == 0 and json.loads((tmp_path / "nobody" / "result.json").read_text())["summary"][
        "errors"
    ] == {"connection": 2}


def _served_requests(url: str) -> float:
    """Requests the server has finished, by outcome, summed (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("ridgeline_requests_total{")
    )


def test_ctrl_c_writes_partial_results(served, tmp_path):
    before = _served_requests(served)
    proc = subprocess.Popen(
        [
            RIDGELINE,
            "bench",
            "--url",
            served,
            "--out",
            str(tmp_path),
            "--no-progress",
            "--rate",
            "4",
            "--duration",
            "120",
            "--input-len",
            "10",
            "--output-len",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60  # however long the command takes to start on a loaded machine
    while _served_requests(served) - before < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["summary"]["interrupted"] and data["summary"]["completed"] >= 3
    assert "partial results" in out


def test_a_sweep_and_compare(served, tmp_path):
    r = bench(
        served,
        tmp_path,
        "--rates",
        "2,6",
        "--requests",
        "6",
        "--input-len",
        "10",
        "--output-len",
        "6",
        "--slo-mix",
        "interactive=1,batch=1",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["rates"] == [2.0, 6.0] and all(s["completed"] == 6 for s in sweep["summaries"])
    assert set(sweep["summaries"][0]["by_slo_class"]) <= {"interactive", "batch"}
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    c = subprocess.run(
        [RIDGELINE, "bench", "compare", str(tmp_path / "rate_2.json"), str(tmp_path / "rate_6.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert c.returncode == 0 and "B / A" in c.stdout and "request_throughput" in c.stdout
