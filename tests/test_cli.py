"""The `ridgeline` console script: make a tiny model, then generate from it."""

import subprocess
import sys
from pathlib import Path

RIDGELINE = str(Path(sys.executable).parent / "ridgeline")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RIDGELINE, *args], capture_output=True, text=True, timeout=300)


def test_make_tiny_model_then_generate_prints_text(tmp_path):
    made = run("make-tiny-model", str(tmp_path / "m"), "--arch", "mixtral")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "m" / "config.json").exists()
    gen = run(
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "Hello there",
        "--max-tokens",
        "8",
        "--ignore-eos",
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("'Hello there' -> '") and "[8 tokens, length]" in gen.stdout


def test_generate_reports_bad_input_without_a_traceback(llama):
    gen = run("generate", "--model", llama, "--prompt", "hi", "--temperature", "-1")
    assert gen.returncode == 2
    assert gen.stderr.strip() == "error: temperature: got -1.0, allowed a finite number >= 0 (0 means greedy)"
