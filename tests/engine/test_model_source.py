"""--model as a directory or a Hugging Face id, resolved offline from a Hugging Face cache built here (the
layout huggingface_hub writes: models--org--name/snapshots/<sha>/..., refs/main); HF_HUB_OFFLINE=1 is set
for the whole suite (tests/conftest.py), so nothing is downloaded."""

import shutil
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.model_source import is_hub_id, resolve_model, served_model_name

SHA = "0123456789abcdef0123456789abcdef01234567"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def hf_cache_with(cache: Path, repo_id: str, checkpoint: str) -> Path:
    """A Hugging Face hub cache holding `checkpoint` as repo_id's main revision; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def test_a_hub_id_resolves_to_its_cached_snapshot_and_serves_like_the_directory(llama, tmp_path):
    snapshot = hf_cache_with(tmp_path / "hub", "tiny-org/tiny-llama", llama)
    assert resolve_model("tiny-org/tiny-llama", tmp_path / "hub") == snapshot
    by_id = LLM("tiny-org/tiny-llama", download_dir=str(tmp_path / "hub"), num_blocks=16)
    by_dir = LLM(llama, num_blocks=16)
    assert by_id.engine.model_dir == snapshot
    want = by_dir.generate([5, 6, 7, 8], GREEDY)[0].outputs[0].token_ids
    assert by_id.generate([5, 6, 7, 8], GREEDY)[0].outputs[0].token_ids == want


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama, tmp_path / "org" / "name")
    assert not is_hub_id("org/name")
    assert resolve_model("org/name") == Path("org/name")


def test_an_id_missing_from_the_cache_offline_fails_in_one_line(tmp_path):
    (tmp_path / "hub").mkdir()
    with pytest.raises(ValueError) as e:
        resolve_model("tiny-org/not-there", tmp_path / "hub")
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        f"model: 'tiny-org/not-there' is not a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hub'}), and HF_HUB_OFFLINE is set"
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is not a checkpoint directory (it has no config.json)"),
        (lambda p: p.write_text("{}"), "is a file; a checkpoint is a directory holding config.json"),
        (lambda p: None, "is neither a directory nor a Hugging Face model id"),
    ],
)
def test_a_path_that_is_no_checkpoint_fails_in_one_line(tmp_path, make, message):
    path = tmp_path / "sub" / "not-a-model"
    path.parent.mkdir()
    make(path)
    with pytest.raises(ValueError) as e:
        resolve_model(path)
    assert str(e.value) == f"model: {str(path)!r} {message}"


def test_served_name_is_the_directory_name_or_the_id_as_given(llama):
    assert served_model_name(llama) == Path(llama).name
    assert served_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
