"""Structured outputs in the engine's decode loop: the grammar's mask in the sampler, verified drafts
checked against it, a resumed request continuing its grammar. The tiny model's weights are random, so
anything it writes that parses was made to parse by the mask."""

import json

import pytest

from engine import LLM, SamplingParams
from engine.request import EngineRequest
from engine.structured_output import StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(llama, num_blocks=128, max_model_len=256)


def _check(obj: dict) -> None:
    assert set(obj) == {"name", "age", "role"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120 and obj["role"] in ("admin", "user")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_against_the_schema(llm, temperature):
    params = SamplingParams(
        temperature=temperature,
        seed=3,
        max_tokens=120,
        n=3,
        structured_output=StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False),
    )
    (out,) = llm.generate(["Describe a user:"], params)
    for choice in out.outputs:
        assert choice.finish_reason == "stop", choice.text
        _check(json.loads(choice.text))


def test_regex_choice_and_grammar(llm):
    specs = [
        StructuredOutputSpec(regex=r"[0-9]{3}-[a-z]{2}"),
        StructuredOutputSpec(choice=["yes", "no", "maybe"]),
        StructuredOutputSpec(grammar='root ::= "(" [a-c]+ ")"'),
    ]
    outs = llm.generate(
        ["Answer:"] * 3,
        [SamplingParams(temperature=1.0, seed=1, max_tokens=40, structured_output=s) for s in specs],
    )
    regex, choice, grammar = (o.outputs[0].text for o in outs)
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex), regex
    assert choice in ("yes", "no", "maybe")
    assert re.fullmatch(r"\([a-c]+\)", grammar), grammar


def test_unconstrained_requests_in_the_same_batch_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (alone,) = llm.generate(["Hello"], plain)
    mixed = llm.generate(
        ["Hello", "Describe a user:"],
        [
            plain,
            SamplingParams(
                temperature=0,
                max_tokens=120,
                structured_output=StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False),
            ),
        ],
    )
    assert mixed[0].outputs[0].token_ids == alone.outputs[0].token_ids
    _check(json.loads(mixed[1].outputs[0].text))


def test_speculative_drafts_are_checked_against_the_grammar(llama):
    """ngram drafts copy the prompt, which breaks the schema: every kept draft passed the mask."""
    prompt = 'Example: {"name": "bob", "age": 7, "role": "user"} {"name": "bob", "age": 7, "role":'
    params = SamplingParams(
        temperature=0,
        max_tokens=120,
        structured_output=StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False),
    )
    plain = LLM(llama, num_blocks=128).generate([prompt], params)[0].outputs[0]
    spec_llm = LLM(llama, num_blocks=128, speculative_method="ngram", num_speculative_tokens=4)
    spec = spec_llm.generate([prompt], params)[0].outputs[0]
    assert spec.token_ids == plain.token_ids
    _check(json.loads(spec.text))
    assert spec_llm.engine.stats.spec_draft_tokens > 0


def test_a_resumed_request_continues_its_grammar(llm):
    """As on a decode worker: the prefill worker's first tokens are accepted into the grammar first."""
    spec = StructuredOutputSpec(json=SCHEMA, whitespace_flexible=False)
    params = SamplingParams(temperature=0, max_tokens=120, structured_output=spec)
    (whole,) = llm.generate(["Describe a user:"], params)
    tokens = whole.outputs[0].token_ids
    engine = llm.engine
    prompt = llm.tokenizer.encode("Describe a user:")
    engine.add_request(EngineRequest("resumed", prompt, params, stream=False, output_token_ids=tokens[:3]))
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            done = out
    assert done is not None and done.outputs[0].token_ids == tokens
    with pytest.raises(ValueError, match="output_token_ids"):
        bad = [llm.tokenizer.encode("x", add_special_tokens=False)[0]]  # not how any JSON object starts
        engine.add_request(EngineRequest("bad", prompt, params, output_token_ids=bad))


def test_a_spec_the_grammar_cannot_compile_names_its_field():
    with pytest.raises(ValueError, match="response_format"):
        StructuredOutputSpec(regex="(unclosed", param="response_format")
