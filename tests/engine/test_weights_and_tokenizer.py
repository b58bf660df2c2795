"""Checkpoint loading (single file, sharded, dtypes, tied embeddings) and tokenizer/chat template."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.model_loader import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPT = [7, 8, 9, 10, 11, 12]


def test_sharded_checkpoint_equals_single_file(tiny_model):
    sharded = tiny_model("llama", max_shard_size="60KB")
    index = json.loads((Path(sharded) / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    one = LLM(tiny_model("llama"), num_blocks=32).generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    many = LLM(sharded, num_blocks=32).generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert one == many


@pytest.mark.parametrize("dtype, want", [("bfloat16", torch.bfloat16), ("float16", torch.bfloat16)])
def test_half_precision_checkpoints_load(tiny_model, dtype, want):
    """bf16 loads as is; fp16 becomes bf16 on the CPU, where fp16 matmuls are slow or missing."""
    path = tiny_model("qwen3", dtype=dtype)
    loaded = load_model(path, "auto", torch.device("cpu"))
    assert loaded.dtype == want
    assert all(p.dtype == want for p in loaded.model.parameters())
    out = LLM(path, num_blocks=32).generate(PROMPT, GREEDY)[0]
    assert len(out.outputs[0].token_ids) == 16


def test_dtype_override_upcasts(tiny_model):
    loaded = load_model(tiny_model("qwen3", dtype="bfloat16"), "float32", torch.device("cpu"))
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32


def test_tied_embeddings_share_the_input_matrix(tiny_model):
    loaded = load_model(tiny_model("qwen2"), "auto", torch.device("cpu"))
    assert loaded.config.tie_word_embeddings and loaded.model.lm_head is None


def test_missing_and_unexpected_weights_are_errors(llama, tmp_path):
    import shutil

    for name, mutate, message in [
        ("missing", lambda w: w.pop("model.layers.1.mlp.down_proj.weight"), "missing weights"),
        ("extra", lambda w: w.update({"model.layers.9.foo.weight": torch.zeros(2)}), "has no place"),
        ("shape", lambda w: w.update({"model.norm.weight": torch.zeros(3)}), "has shape"),
    ]:
        bad = tmp_path / name
        shutil.copytree(llama, bad)
        weights = load_file(bad / "model.safetensors")
        mutate(weights)
        save_file(weights, bad / "model.safetensors")
        with pytest.raises(ValueError, match=rf"^checkpoint: .*{message}"):
            load_model(bad, "auto", torch.device("cpu"))


def test_tokenizer_and_chat_template_match_transformers(llama):
    llm = LLM(llama, num_blocks=16)
    hf = AutoTokenizer.from_pretrained(llama)
    text = "Prefill computes the prompt; decode is one token at a time."
    assert llm.tokenizer.encode(text) == hf(text)["input_ids"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ours = llm.tokenizer.apply_chat_template(messages)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt_token_ids == ours and len(out.outputs[0].token_ids) == 16


def test_eos_ids_come_from_config_and_generation_config(llama):
    llm = LLM(llama, num_blocks=16)
    assert {1, 3} <= llm.engine.eos_token_ids  # </s> from config, <|im_end|> from generation_config


def test_chat_without_template_is_a_clear_error(llama, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^messages: .*no chat_template"):
        LLM(str(model), num_blocks=16).chat([{"role": "user", "content": "hi"}])


def _copy_with_config_template(llama, dest: Path) -> Path:
    import shutil

    shutil.copytree(llama, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "CONFIG {{ messages[0]['content'] }}"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


HI = [{"role": "user", "content": "hi"}]


def test_chat_template_jinja_wins_over_tokenizer_config(llama, tmp_path):
    from engine.tokenizer import Tokenizer

    model = _copy_with_config_template(llama, tmp_path / "m")
    assert Tokenizer(model).apply_chat_template(HI, tokenize=False) == "CONFIG hi"
    (model / "chat_template.jinja").write_text("JINJA {{ messages[0]['content'] }}")
    assert Tokenizer(model).apply_chat_template(HI, tokenize=False) == "JINJA hi"


def test_a_given_chat_template_file_or_text_wins_over_the_models(llama, tmp_path):
    from engine.tokenizer import Tokenizer

    model = _copy_with_config_template(llama, tmp_path / "m")
    (model / "chat_template.jinja").write_text("JINJA {{ messages[0]['content'] }}")
    template_file = tmp_path / "mine.jinja"
    template_file.write_text("FILE {{ messages[0]['content'] }}")
    assert Tokenizer(model, str(template_file)).apply_chat_template(HI, tokenize=False) == "FILE hi"
    inline = "INLINE {{ messages[0]['content'] }}"
    assert Tokenizer(model, inline).apply_chat_template(HI, tokenize=False) == "INLINE hi"
    llm = LLM(str(model), num_blocks=16, chat_template=str(template_file))  # the engine option
    assert llm.tokenizer.apply_chat_template(HI, tokenize=False) == "FILE hi"
    assert llm.chat(HI, GREEDY)[0].prompt_token_ids == llm.tokenizer.encode(
        "FILE hi", add_special_tokens=False
    )


def test_a_chat_template_path_that_cannot_be_read_is_an_error(llama, tmp_path):
    from engine.tokenizer import Tokenizer, load_chat_template

    missing = tmp_path / "nope.jinja"
    with pytest.raises(
        ValueError, match=r"^chat_template: '.*nope\.jinja' looks like a file path but cannot"
    ):
        Tokenizer(llama, str(missing))
    text = "{{ messages[0]['content'] + '\\n' }}"  # loading a template's text again leaves it as it is
    assert load_chat_template(load_chat_template(text)) == text


def test_tools_reach_the_chat_template(llama):
    from engine.tokenizer import Tokenizer

    template = (
        "{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    tok = Tokenizer(llama, template)
    assert tok.apply_chat_template(HI, tokenize=False, tools=tools) == "TOOLS get_weather;hi"
    assert tok.apply_chat_template(HI, tokenize=False) == "hi"
