"""The `ridgeline` console script: make a tiny model, then generate from it."""

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine import SamplingParams
from engine.errors import ParameterError
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest
from services.cli import build_parser, main
from services.serve_cli import config_for_argv

RIDGELINE = str(Path(sys.executable).parent / "ridgeline")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RIDGELINE, *args], capture_output=True, text=True, timeout=300, env=env)


def _make_then_generate(
    tmp_path_factory,
) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, Path]:
    model = tmp_path_factory.mktemp("cli") / "m"
    made = run("make-tiny-model", str(model), "--arch", "mixtral")
    gen = run(
        "generate",
        "--model",
        str(model),
        "--prompt",
        "Hello there",
        "--max-tokens",
        "8",
        "--ignore-eos",
    )
    return made, gen, model


EARLY_RUNS = {"make_then_generate": _make_then_generate}  # run ahead, beside the kernel tests (conftest.py)


@pytest.fixture(scope="module", autouse=True)
def bad_input_run(llama):
    """`generate` with a bad temperature, run in the background from the module's start (an independent
    command: it runs beside the module's first tests); its test takes the result."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run, "generate", "--model", llama, "--prompt", "hi", "--temperature", "-1")


def test_make_tiny_model_then_generate_prints_text(early_run):
    made, gen, model = early_run("make_then_generate")
    assert made.returncode == 0, made.stderr
    assert (model / "config.json").exists()
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("'Hello there' -> '") and "[8 tokens, length]" in gen.stdout


def test_generate_reports_bad_input_without_a_traceback(bad_input_run):
    gen = bad_input_run.result()
    assert gen.returncode == 2
    assert gen.stderr.strip() == "error: temperature: got -1.0, allowed a finite number >= 0 (0 means greedy)"


# -- models by Hugging Face id -------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_takes_a_hugging_face_id_from_the_cache_offline(llama, tmp_path, capsys):
    """HF_HOME locates the cache (as for transformers and vLLM); HF_HUB_OFFLINE=1: nothing downloads."""
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(llama, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "Hello", "--max-tokens", "4", "--ignore-eos"]
    with ThreadPoolExecutor(2) as pool:  # independent commands, side by side with the in-process run
        by_id_run = pool.submit(run, "generate", "--model", "tiny-org/tiny-llama", *args, env=env)
        missing_run = pool.submit(run, "generate", "--model", "tiny-org/not-cached", *args, env=env)
        assert main(["generate", "--model", llama, *args]) == 0
        by_id, missing = by_id_run.result(), missing_run.result()
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == capsys.readouterr().out
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        "error: model: 'tiny-org/not-cached' is not a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hf' / 'hub'}), and HF_HUB_OFFLINE is set"
    )


# -- the engine's knobs, as vLLM names them: each reaches the engine and changes what it does ------------

PROMPT = list(range(10, 58))  # 48 tokens: 3 full KV blocks
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def serve_engine(llama: str, *flags: str, pool: str = "decode") -> LLMEngine:
    """The engine a `ridgeline serve` worker of `pool` builds from these flags (its engine options)."""
    config = config_for_argv(["serve", "--model", llama, "--num-blocks", "64", *flags])
    return LLMEngine.from_pretrained(config.model, **config.engine_options(getattr(config, pool)))


def prompt_tokens_computed_for_the_same_prompt_twice(engine: LLMEngine) -> int:
    for rid in ("first", "again"):
        engine.run([EngineRequest(rid, PROMPT, GREEDY, stream=False)])
    return engine.stats.prompt_tokens_computed


def test_no_enable_prefix_caching_computes_a_repeated_prompt_again(llama):
    assert prompt_tokens_computed_for_the_same_prompt_twice(serve_engine(llama)) == 48 + 16
    off = serve_engine(llama, "--no-enable-prefix-caching")
    assert prompt_tokens_computed_for_the_same_prompt_twice(off) == 48 + 48
    per_pool = ["--no-prefill-enable-prefix-caching"]
    assert prompt_tokens_computed_for_the_same_prompt_twice(serve_engine(llama, *per_pool)) == 48 + 16
    prefill = serve_engine(llama, *per_pool, pool="prefill")
    assert prompt_tokens_computed_for_the_same_prompt_twice(prefill) == 48 + 48


def most_running_at_once(engine: LLMEngine, requests: int = 5) -> int:
    for i in range(requests):
        engine.add_request(EngineRequest(f"r{i}", [5 + i] * 8, GREEDY, stream=False))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    return most


def test_max_num_seqs_caps_running_requests_for_all_pools_or_one(llama):
    assert most_running_at_once(serve_engine(llama, "--max-num-seqs", "2")) == 2
    flags = ["--max-num-seqs", "2", "--decode-max-num-seqs", "3"]
    assert most_running_at_once(serve_engine(llama, *flags)) == 3
    assert most_running_at_once(serve_engine(llama, *flags, pool="prefill")) == 2


def test_max_num_batched_tokens_caps_each_step(llama):
    engine = serve_engine(llama, "--max-num-batched-tokens", "16")
    engine.add_request(EngineRequest("long", PROMPT, GREEDY, stream=False))
    per_step = []
    while engine.has_unfinished_requests():
        before = engine.stats.scheduled_tokens
        engine.step()
        per_step.append(engine.stats.scheduled_tokens - before)
    assert per_step[:3] == [16, 16, 16] and max(per_step) == 16  # the prompt in three chunks


def unseeded_sample(engine: LLMEngine) -> list[int]:
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    return engine.run([EngineRequest("s", PROMPT, params, stream=False)])[0].outputs[0].token_ids


def test_seed_makes_unseeded_sampling_repeat_per_engine_start(llama):
    first = unseeded_sample(serve_engine(llama, "--seed", "5"))
    assert unseeded_sample(serve_engine(llama, "--seed", "5")) == first
    assert unseeded_sample(serve_engine(llama, "--seed", "6")) != first


def test_generate_seed_is_the_engine_seed(llama, capsys):
    def generate(seed: str) -> str:
        argv = ["generate", "--model", llama, "--prompt", "Hi", "--temperature", "1", "--max-tokens", "16"]
        assert main([*argv, "--ignore-eos", "--num-blocks", "16", "--seed", seed]) == 0
        return capsys.readouterr().out

    first = generate("5")
    assert generate("5") == first and generate("6") != first


def test_max_logprobs_refuses_a_request_over_it(llama):
    config = config_for_argv(["serve", "--model", llama, "--max-logprobs", "2"])
    assert config.max_logprobs == 2  # what the frontend checks before admission
    engine = serve_engine(llama, "--max-logprobs", "2")
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=2)
    assert len(engine.run([EngineRequest("ok", PROMPT, params, stream=False)])[0].outputs[0].logprobs) == 2
    with pytest.raises(ParameterError, match=r"^logprobs: got 3, allowed at most 2") as e:
        engine.add_request(EngineRequest("over", PROMPT, SamplingParams(logprobs=3)))
    assert e.value.parameter == "logprobs"
    assert config_for_argv(["serve", "--model", llama]).max_logprobs == 20  # vLLM's default


def test_gpu_memory_utilization_is_checked_and_reaches_the_kv_cache_config(llama, capsys):
    engine = serve_engine(llama, "--gpu-memory-utilization", "0.5")
    assert engine.config.cache.gpu_memory_utilization == 0.5  # sizes the KV cache on CUDA
    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit) as e:
            config_for_argv(["serve", "--model", llama, "--gpu-memory-utilization", bad])
        assert e.value.code == 2
    assert "allowed a fraction in (0, 1]" in capsys.readouterr().err


def test_chat_template_and_log_level_reach_every_pool(llama, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("T {{ messages[0]['content'] }}")
    config = config_for_argv(
        ["serve", "--model", llama, "--chat-template", str(template), "--log-level", "debug"]
    )
    assert config.chat_template == "T {{ messages[0]['content'] }}" and config.log_level == "debug"
    for pool in (config.prefill, config.decode):
        assert config.engine_options(pool)["chat_template"] == config.chat_template


# -- --help --------------------------------------------------------------------------------------------


def test_help_shows_every_options_default(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "generate", "make-tiny-model"):
        sub = subparsers.choices[name]
        formatter = sub.formatter_class(prog=name)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "(default" in formatter._get_help_string(action), (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-utilization GPU_MEMORY_UTILIZATION" in text
    assert "(default: 0.9)" in text and "--no-enable-prefix-caching" in text
    assert "--max-num-seqs MAX_NUM_SEQS requests running at once (default: 64)" in text
