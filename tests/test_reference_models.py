"""The reference pair committed under models/ (benchmarks/train_reference.py): complete HF checkpoints that
our engine and transformers load with the same logits, the default model of `ridgeline generate`, and a
held-out perplexity that agrees with the model card."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.train_reference import corpus, evaluate, token_stream
from engine import LLM, SamplingParams
from engine.envs import default_model_path

MODELS = Path(__file__).resolve().parents[1] / "models"
CARD = json.loads((MODELS / "model_card.json").read_text())
PAIR = {name: MODELS / f"ridgeline-ref-{name}" for name in ("target", "draft")}
RIDGELINE = str(Path(sys.executable).parent / "ridgeline")


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(PAIR))
def test_committed_checkpoint_is_complete_and_loads_with_matching_logits(name):
    path = PAIR[name]
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    shards = {f: size for f, size in files.items() if f.endswith(".safetensors")}
    assert shards and max(shards.values()) <= 16 * 10**6
    from safetensors import safe_open

    for shard in shards:
        with safe_open(path / shard, framework="pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}  # noqa: SIM118 - not iterable
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())

    ours = LLM(str(path), num_blocks=64, dtype="float32")
    prompt = ours.engine.tokenizer.encode("import os\n\n\ndef main(argv):\n    ")
    hf = _hf(path)
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        greedy = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
    out = ours.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=10)
    )[0].outputs[0]
    top = want.topk(10)
    assert set(out.logprobs[0]) == set(top.indices.tolist())
    for token, logprob in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        assert abs(out.logprobs[0][token] - logprob) < 1e-3
    assert out.token_ids == greedy


PROMPT = "def read_config(path):\n    "


def _generate_runs(tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """`ridgeline generate` with the default model, with the reference draft, and with RIDGELINE_MODEL naming
    nothing: independent commands, one after another."""
    generate = [RIDGELINE, "generate", "--prompt", PROMPT, "--max-tokens", "24", "--ignore-eos"]
    draft = ["--speculative-model", str(PAIR["draft"]), "--num-speculative-tokens", "3"]
    missing_model = {**os.environ, "RIDGELINE_MODEL": "/nonexistent/model"}
    return [
        subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        for argv, env in (
            (generate, None),
            ([*generate, *draft], None),
            ([RIDGELINE, "generate", "--prompt", "x"], missing_model),
        )
    ]


EARLY_RUNS = {"generate": _generate_runs}  # run ahead, beside the kernel tests (conftest.py)


def test_generate_defaults_to_the_reference_target_and_drafts_with_the_reference_draft(early_run):
    assert default_model_path() == PAIR["target"]
    prompt = PROMPT
    plain, spec, missing = early_run("generate")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(repr(prompt)) and "[24 tokens, length]" in plain.stdout
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout  # greedy: drafting never changes the text
    assert missing.returncode == 2 and "RIDGELINE_MODEL" in missing.stderr


@pytest.mark.slow
def test_heldout_perplexity_agrees_with_the_model_card():
    """A slice of the held-out files (this machine's stdlib, split by path as in training): the target is far
    better than uniform and better than the draft, and near the card's full held-out numbers."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(PAIR["target"] / "tokenizer.json"))
    stream = token_stream(tok, corpus()["heldout"][:12])
    ppl = {
        name: evaluate(_hf(path), stream, seq=256, device="cpu", max_tokens=16_384)
        for name, path in PAIR.items()
    }
    assert ppl["target"] < ppl["draft"] < CARD["uniform_perplexity"] / 20
    for name, value in ppl.items():
        card = CARD["models"][name]["heldout_perplexity"]
        assert abs(math.log(value / card)) < math.log(1.5), (name, value, card)
