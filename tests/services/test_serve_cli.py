"""`ridgeline serve` as a user runs it: a subprocess that starts Ray, prints the URL and a curl, answers
that request with an API key required, shows each request and the engines' stats on its console, and shuts
down cleanly on Ctrl-C; a bad model fails before Ray starts. The request log line, in process."""

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import MODEL, http_server

from control_plane.registry import keys
from control_plane.registry_etcd import open_registry
from engine.async_llm import AsyncLLM
from engine.kv.age_policy import KVAgePolicy
from services.app import PoolConfig, _pool
from services.decode import DecodeWorker
from services.frontend import build_frontend
from services.openai_serving import OpenAIServing
from services.serve_cli import banner, config_for_argv

RIDGELINE = str(Path(sys.executable).parent / "ridgeline")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_serve_prints_a_curl_that_answers_then_stops_on_ctrl_c(llama, etcd, tmp_path, stop_in_background):
    stop_in_background.wait()  # its Ray must be its own, not one still shutting down
    port = _free_port()
    env = {**os.environ, "RIDGELINE_API_KEY": "sk-cli"}
    console = (tmp_path / "console.log").open("w")
    proc = subprocess.Popen(
        [
            RIDGELINE,
            "serve",
            "--model",
            llama,
            "--port",
            str(port),
            "--num-blocks",
            "64",
            "--worker-cpus",
            "0.25",
            "--registry",
            etcd.url,
            "--prefill-price",
            "2.5",
            "--stats-interval",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=console,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        lines, deadline = [], time.monotonic() + 180
        while not any(line.startswith("    -d ") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, f"no banner: {lines}"
            lines.append(proc.stdout.readline().rstrip("\n"))
        assert (
            lines[-4] == f"Ridgeline is serving {Path(llama).name!r} (1 prefill + 1 decode replicas) "
            f"at http://127.0.0.1:{port}/v1"
        )
        body = shlex.split(lines[-1].strip())[1]  # the JSON after -d
        url = f"http://127.0.0.1:{port}/v1/completions"
        assert httpx.post(url, content=body, timeout=60).status_code == 401
        r = httpx.post(
            url,
            content=body,
            timeout=60,
            headers={"Authorization": "Bearer sk-cli", "Content-Type": "application/json"},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        assert r.json()["usage"]["cost_usd"] > 0
        # the console shows the request (from the frontend replica) and the engines' stats (from each
        # worker replica, named by pool), forwarded by Ray to the `ridgeline serve` process
        served = r.json()
        outcome = served["choices"][0]["finish_reason"]
        request_line = f"request {served['id']}: {outcome}, pool prefill+decode, prompt tokens"
        for wanted in (request_line, "prefill ", "decode "):
            _wait_for_console(tmp_path / "console.log", wanted)
        text = (tmp_path / "console.log").read_text()
        assert any("Avg prompt throughput" in line and "prefill " in line for line in text.splitlines())
        assert any("Avg generation throughput" in line and "decode " in line for line in text.splitlines())
        pools = httpx.get(
            f"http://127.0.0.1:{port}/v1/pools", timeout=30, headers={"Authorization": "Bearer sk-cli"}
        ).json()["data"]
        assert {p["name"]: p["price_per_hour"] for p in pools}["prefill"] == 2.5
        registered = asyncio.run(
            _etcd_keys(etcd.url, keys.workers("ridgeline"))
        )  # the CLI's app is "ridgeline"
        assert sorted(v["pool"] for v in registered.values()) == ["decode", "prefill"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert (
            asyncio.run(_etcd_keys(etcd.url, keys.workers("ridgeline"))) == {}
        )  # leases revoked on the way out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        console.close()


def _wait_for_console(path: Path, wanted: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(wanted in line and "INFO" in line for line in path.read_text().splitlines()):
        assert time.monotonic() < deadline, f"{wanted!r} not on the console:\n{path.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_while_the_app_deploys_stops_cleanly(llama, etcd, stop_in_background):
    """Interrupted once its first worker registered — usually before the banner: everything stops, exit 0."""
    stop_in_background.wait()  # its Ray must be its own, not one still shutting down
    proc = subprocess.Popen(
        [
            RIDGELINE,
            "serve",
            "--model",
            llama,
            "--port",
            str(_free_port()),
            "--num-blocks",
            "64",
            "--worker-cpus",
            "0.25",
            "--registry",
            etcd.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not asyncio.run(_etcd_keys(etcd.url, keys.workers("ridgeline"))):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and "shutting down" in out
        assert asyncio.run(_etcd_keys(etcd.url, keys.workers("ridgeline"))) == {}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def _etcd_keys(url: str, prefix: str) -> dict:
    registry = open_registry(url)
    try:
        return (await registry.get_prefix(prefix))[0]
    finally:
        await registry.close()


def test_banner_names_the_key_only_when_one_is_set(llama):
    config = config_for_argv(["serve", "--model", llama, "--aggregated", "--decode", "2"])
    text = banner(config, "127.0.0.1", 8000)
    assert "(2 aggregated replicas)" in text and "Authorization" not in text
    keyed = config_for_argv(["serve", "--model", llama, "--api-key", "k"])
    assert '-H "Authorization: Bearer $RIDGELINE_API_KEY"' in banner(keyed, "127.0.0.1", 8000)


def test_the_api_key_comes_from_a_file_or_the_environment_and_the_flag_warns(
    llama, tmp_path, monkeypatch, caplog
):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert config_for_argv(["serve", "--model", llama, "--api-key-file", str(key_file)]).api_key == "s3cret"
    monkeypatch.setenv("RIDGELINE_API_KEY", "from-env")
    assert config_for_argv(["serve", "--model", llama]).api_key == "from-env"
    with caplog.at_level("WARNING", logger="ridgeline.serve"):
        assert config_for_argv(["serve", "--model", llama, "--api-key", "k"]).api_key == "k"
    assert "ps" in caplog.text
    key_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        config_for_argv(["serve", "--model", llama, "--api-key-file", str(key_file)])
    with pytest.raises(ValueError, match="not both"):
        config_for_argv(["serve", "--model", llama, "--api-key-file", str(key_file), "--api-key", "k"])


REGISTRY = {"url": "embedded", "app": None}


@pytest.mark.ray
def test_pool_autoscaling_config_reaches_the_deployment():
    scaled = _pool(
        DecodeWorker,
        "DecodeWorker",
        PoolConfig(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}),
        REGISTRY,
    )
    config = scaled._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 4, 8)
    fixed = _pool(DecodeWorker, "DecodeWorker", PoolConfig(replicas=3, num_cpus=2), REGISTRY)
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_cpus"] == 2


def test_serve_config_rejects_bad_values(llama):
    from services.app import ServeConfig

    with pytest.raises(ValueError, match="replicas"):
        ServeConfig(model=llama, decode={"replicas": 0})
    with pytest.raises(ValueError, match="kv_transport"):
        ServeConfig(model=llama, kv_transport="smoke-signals")


@pytest.mark.parametrize(
    "pool, message",
    [
        ({"num_gpus": 1, "device": "cpu"}, "device: 'cpu' but num_gpus is 1"),
        ({"device": "H200"}, "device: 'H200' needs num_gpus > 0"),
        ({"price_per_hour": -1}, "price_per_hour"),
        (
            {"weight_dtype": "float16", "kv_dtype": "bfloat16"},
            "kv_dtype: got bfloat16, allowed auto, fp8 or the weight dtype",
        ),
        ({"kv_dtype": "int8"}, "kv_dtype"),
        (
            {"weight_dtype": "float32", "kv_dtype": "float32", "engine": {"kv_cache_dtype": "fp8"}},
            "kv_dtype: float32 but engine.kv_cache_dtype is fp8",
        ),
        ({"engine": {"kv_cache_dtype": "fp8_e5m2"}}, "e5m2 is not implemented"),
        (
            {"weight_dtype": "fp8", "engine": {"quantization": "int4"}},
            "weight_dtype: fp8 but engine.quantization",
        ),
        (
            {"weight_dtype": "float32", "engine": {"quantization": "fp8"}},
            "weight_dtype: float32 but engine.quantization",
        ),
        (
            {"weight_dtype": "float16", "engine": {"dtype": "float32"}},
            "weight_dtype: float16 but engine.dtype",
        ),
    ],
)
def test_bad_pool_configuration_is_named(llama, pool, message):
    from services.app import ServeConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        ServeConfig(model=llama, decode=pool)


def test_kv_handoff_between_pool_formats_is_decided_at_configuration(llama):
    from control_plane.quantization import PoolFormats, check_kv_handoff, pool_formats
    from services.app import ServeConfig

    def formats(pool: dict) -> PoolFormats:
        return pool_formats(
            pool.get("weight_dtype", "auto"),
            pool.get("kv_dtype", "auto"),
            pool.get("engine", {}),
            "cpu",
            "float32",
        )

    # fp8 weights keep the activations' dtype for KV: bf16 prefill, fp8-weight decode hand off as they are
    bf16, fp8_weights = {"weight_dtype": "bfloat16"}, {"weight_dtype": "fp8", "engine": {"dtype": "bfloat16"}}
    assert check_kv_handoff(formats(bf16), formats(fp8_weights)) == "as_is"
    # on the CPU float16 runs as bfloat16 (as the engine does): the same KV format
    assert check_kv_handoff(formats({"weight_dtype": "float16"}), formats(bf16)) == "as_is"
    # 16-bit <-> e4m3, and between 16-bit dtypes: the puller converts
    fp8_kv = {"kv_dtype": "fp8"}
    assert formats(fp8_kv).kv == formats({"engine": {"kv_cache_dtype": "fp8_e4m3"}}).kv == "fp8"
    assert check_kv_handoff(formats(bf16), formats(fp8_kv)) == "converted"
    assert check_kv_handoff(formats(fp8_kv), formats({})) == "converted"
    assert check_kv_handoff(formats({}), formats(bf16)) == "converted"
    ServeConfig(model=llama, prefill=bf16, decode=fp8_kv)
    # blocks of different sizes cannot be handed off: named at configuration, not recomputed per request
    with pytest.raises(ValueError, match="KV blocks hold 16 tokens and the decode pool's 32"):
        ServeConfig(model=llama, decode={"engine": {"block_size": 32}})
    ServeConfig(model=llama, mode="aggregated", decode={"engine": {"block_size": 32}})  # one pool: no handoff


def test_fp8_weights_per_pool(llama):
    from services.app import ServeConfig

    config = ServeConfig(
        model=llama, prefill={"engine": {"dtype": "float32"}}, decode={"weight_dtype": "fp8"}
    )
    decode = config.decode.describe("decode", "decode", "least_loaded")
    assert decode.weight_dtype == "fp8" and decode.kv_dtype == "auto"
    fp8_kv = ServeConfig(model=llama, decode={"kv_dtype": "fp8"}).decode
    assert fp8_kv.engine_options()["kv_cache_dtype"] == "fp8"
    assert fp8_kv.describe("decode", "decode", "least_loaded").kv_dtype == "fp8"
    assert config.decode.engine_options() == {"scheduling_policy": "priority", "quantization": "fp8"}
    assert config.prefill.describe("prefill", "prefill", "kv_aware").weight_dtype == "float32"
    with pytest.raises(ValueError, match="quantization"):  # the engine's own check, at configuration time
        ServeConfig(model=llama, decode={"engine": {"quantization": "int8"}})


def test_pool_prices_devices_and_registry_from_the_command_line(llama):
    config = config_for_argv(
        [
            "serve",
            "--model",
            llama,
            "--decode-price",
            "1.25",
            "--worker-gpus",
            "0",
            "--registry",
            "etcd://10.1.2.3:2379",
            "--dtype",
            "float32",
        ]
    )
    assert config.prices()["decode"] == 1.25 and config.prices()["prefill"] > 0  # default rate for its CPUs
    assert config.registry == "etcd://10.1.2.3:2379"
    decode = config.decode.describe("decode", "decode", "least_loaded")
    assert (decode.device, decode.weight_dtype, decode.price_is_default) == ("cpu", "float32", False)
    assert config.decode.engine_options() == {"scheduling_policy": "priority", "dtype": "float32"}
    with pytest.raises(ValueError, match="registry: got 'zookeeper://x'"):
        config_for_argv(["serve", "--model", llama, "--registry", "zookeeper://x"])
    # the KV format per pool from the command line: bf16/fp32 prefill, fp8 decode, converted in transit
    config = config_for_argv(["serve", "--model", llama, "--decode-kv-cache-dtype", "fp8"])
    assert config.decode.engine_options()["kv_cache_dtype"] == "fp8"
    assert config.decode.describe("decode", "decode", "least_loaded").kv_dtype == "fp8"
    assert "kv_cache_dtype" not in config.prefill.engine_options()
    # KV precision by age for the decode pool only, as JSON
    config = config_for_argv(
        ["serve", "--model", llama, "--decode-kv-age-policy", '{"bits": 3, "window": 64}']
    )
    assert config.decode.engine_options()["kv_age_policy"] == KVAgePolicy(bits=3, window=64)
    assert "kv_age_policy" not in config.prefill.engine_options()
    with pytest.raises(SystemExit):
        config_for_argv(["serve", "--model", llama, "--kv-age-policy", '{"bits": 5}'])
    # documents' recompute and cache size per pool
    config = config_for_argv(
        [
            "serve",
            "--model",
            llama,
            "--prefill-document-recompute",
            '{"ratio": 0.15}',
            "--max-document-blocks",
            "64",
        ]
    )
    assert config.prefill.engine_options()["document_recompute"] == {
        "first_tokens": 16,
        "ratio": 0.15,
        "select_layer": 1,
    }
    assert "document_recompute" not in config.decode.engine_options()
    assert config.decode.engine_options()["max_document_blocks"] == 64
    for bad in ('{"ratio": 2}', '{"sinks": 4}', "[1]"):
        with pytest.raises(SystemExit):
            config_for_argv(["serve", "--model", llama, "--document-recompute", bad])


def test_speculation_flags(llama):
    assert config_for_argv(["serve", "--model", llama, "--spec", "ngram"]).spec == "ngram"
    config = config_for_argv(
        [
            "serve",
            "--model",
            llama,
            "--draft-model",
            llama,
            "--draft-workers",
            "2",
            "--num-speculative-tokens",
            "6",
            "--draft-wait",
            "0.25",
        ]
    )
    assert (config.spec, config.draft.replicas, config.num_speculative_tokens) == ("draft", 2, 6)
    assert config.draft.wait_s == 0.25
    from services.app import ServeConfig

    with pytest.raises(ValueError, match="draft"):
        ServeConfig(model=llama, spec="draft")
    with pytest.raises(ValueError, match="wait_s"):
        ServeConfig(model=llama, spec="draft", draft={"model": llama, "deadline_s": 0.5, "wait_s": 1.0})


# -- the model, fast failures, and the console -----------------------------------------------------------


BAD_MODELS = ["tiny-org/not-cached", "{tmp}"]


def _bad_model_runs(tmp_path_factory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
    """`ridgeline serve` of each bad model, each with an empty directory: {parameter: (model, the run)}."""
    runs = {}
    for param in BAD_MODELS:
        tmp_path = tmp_path_factory.mktemp("bad-model")
        model = param.format(tmp=tmp_path)  # a directory with no checkpoint in it
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
        runs[param] = (
            model,
            subprocess.run(
                [RIDGELINE, "serve", "--model", model, "--port", str(_free_port())],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            ),
        )
    return runs


EARLY_RUNS = {"bad_models": _bad_model_runs}  # run ahead, beside the kernel tests (tests/conftest.py)


@pytest.mark.parametrize("model", BAD_MODELS)
def test_a_bad_model_fails_in_one_line_before_ray_starts(early_run, model):
    model, proc = early_run("bad_models")[model]
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: model: {model!r} is ")


def test_a_hub_id_is_served_from_its_snapshot_under_the_id(llama, tmp_path):
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(llama, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    argv = ["serve", "--model", "tiny-org/tiny-llama", "--download-dir", str(tmp_path / "hub")]
    config = config_for_argv(argv)
    assert config.model == str(repo / "snapshots" / sha) and config.model_name == "tiny-org/tiny-llama"
    assert config_for_argv([*argv, "--served-model-name", "tiny"]).model_name == "tiny"
    remote = config_for_argv([*argv, "--ray-address", "10.0.0.1:6379"])  # its replicas resolve the id
    assert remote.model == "tiny-org/tiny-llama" and remote.download_dir == str(tmp_path / "hub")


@pytest.fixture(scope="module")
def frontend(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64)
    with http_server(build_frontend(OpenAIServing(llm, MODEL))) as url:
        yield url
    llm.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_each_request_ends_with_one_log_line(frontend, caplog, stream):
    body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 6, "ignore_eos": True, "stream": stream}
    with caplog.at_level("INFO", logger="ridgeline.requests"):
        r = httpx.post(f"{frontend}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        rid = f"cmpl-{r.headers['x-request-id']}"
        deadline = time.monotonic() + 10
        while not any(rid in rec.getMessage() for rec in caplog.records):
            assert time.monotonic() < deadline, "no request line"
            time.sleep(0.02)
    [line] = [rec.getMessage() for rec in caplog.records if rid in rec.getMessage()]
    assert re.fullmatch(
        rf"request {rid}: length, pool engine, prompt tokens 5, output tokens 6, TTFT \d+\.\d{{3}}s, "
        r"e2e \d+\.\d{3}s, slo_class standard",
        line,
    ), line


def test_a_pool_kv_age_policy_reaches_its_engine_and_pools_view(llama):
    """Set per pool in a config file: validated at load, shown as the registry and /v1/pools show pools,
    and each SLO class's window goes to that pool's engine."""
    from services.app import ServeConfig

    base = {"model": llama, "mode": "disaggregated"}
    config = ServeConfig(**base, decode={"kv_age_policy": {"bits": 3, "window": 64}})
    assert config.engine_options(config.decode)["kv_age_windows"] == {0: 2048}
    assert "kv_age_windows" not in config.engine_options(config.prefill)
    described = config.decode.describe("decode", "decode", "least_loaded").to_json()
    assert described["kv_age_policy"] == {
        "bits": 3, "sinks": 16, "window": 64, "horizon": None, "low_bits": None, "seed": 0
    }  # fmt: skip
    with pytest.raises(ValueError, match="kv_age_policy.bits"):
        ServeConfig(**base, decode={"kv_age_policy": {"bits": 5}})
    with pytest.raises(ValueError, match="kv_age_windows: priority 0 got 100"):
        classes = [{"name": "interactive", "priority": 0, "ttft_ms": 1, "tpot_ms": 1, "kv_window": 100}]
        ServeConfig(
            **base, decode={"kv_age_policy": {"window": 64}}, slo_classes=classes, slo_default="interactive"
        )
