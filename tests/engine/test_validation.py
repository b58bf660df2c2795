"""Bad input raises a ValueError that names the field; nothing is left behind."""

import json
import shutil

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(llama, num_blocks=64, max_model_len=128)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        SamplingParams(**kwargs)


def test_prompt_longer_than_the_context_is_rejected(llm):
    with pytest.raises(ValueError, match=r"^prompt: 128 tokens.*max_model_len"):
        llm.generate([5] * 128)
    assert not llm.engine.has_unfinished_requests()


def test_empty_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match=r"^prompt: must not be empty"):
        llm.generate([""])


def test_out_of_vocabulary_token_is_rejected(llm):
    with pytest.raises(ValueError, match=r"^prompt: token ids"):
        llm.generate([[1, 2, 10**6]])


def test_a_bad_prompt_in_a_batch_leaves_no_request_behind(llm):
    free = llm.engine.block_manager.num_free_blocks
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[5, 6, 7], []])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == free
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=2))[0].finished


def test_unknown_architecture_is_rejected(llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^architectures: got \['FancyNewForCausalLM'\], supported"):
        LLM(str(model))


def test_bad_engine_options_are_rejected(llama):
    with pytest.raises(ValueError, match=r"^max_model_len"):
        LLM(llama, max_model_len=10**6)
    with pytest.raises(ValueError, match=r"^block_size"):
        LLM(llama, block_size=12)
    with pytest.raises(ValueError, match=r"^scheduling_policy"):
        LLM(llama, scheduling_policy="random")
    with pytest.raises(ValueError, match=r"^flux_capacitor: not an engine option"):
        LLM(llama, flux_capacitor=True)
    with pytest.raises(ValueError, match=r"^model:"):
        LLM("/nonexistent/model")


def test_request_that_cannot_fit_the_pool_is_rejected(llama):
    small = LLM(llama, num_blocks=2)
    with pytest.raises(ValueError, match=r"^prompt: .*needs 3 KV blocks, the pool has 2"):
        small.generate([5] * 20, SamplingParams(max_tokens=20))
