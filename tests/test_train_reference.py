"""The reference-model trainer's smoke run on this CPU: it trains both models on the stdlib's source, writes
HF checkpoints our engine and transformers load with the same logits, and learns something (held-out
perplexity far below a uniform model's)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _smoke_training(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("train-reference")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_reference", "--out", str(out), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r, out


EARLY_RUNS = {"smoke_training": _smoke_training}  # run ahead, beside the kernel tests (conftest.py)


@pytest.mark.slow
def test_smoke_training_writes_checkpoints_both_engines_load(early_run):
    r, tmp_path = early_run("smoke_training")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    card = json.loads((tmp_path / "model_card.json").read_text())
    for name in ("target", "draft"):
        assert card["models"][name]["heldout_perplexity"] < card["uniform_perplexity"] / 1.2
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    path = tmp_path / "ridgeline-ref-target"
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    ours = LLM(str(path), num_blocks=64, dtype="float32")
    prompt = ours.engine.tokenizer.encode("def main(argv):\n    return")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    out = ours.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=0))[0].outputs[0]
    assert out.token_ids[0] == int(want.argmax())  # the same next token from the same weights
    got = out.logprobs[0][out.token_ids[0]]
    assert abs(got - float(want.log_softmax(-1).max())) < 1e-3
    assert (
        ours.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))[0].outputs[0].token_ids
    )
