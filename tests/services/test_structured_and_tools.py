"""Structured outputs and tool calling over HTTP with the official `openai` client (in-process engine; the
Ray disaggregated app is covered in test_serving_ray.py). The tiny model's weights are random: whatever
parses against the schema was made to by the grammar."""

import json
import re

import httpx
import openai
import pytest
from serving_helpers import MODEL

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": SCHEMA,
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    """Room for a tools prompt (the template lists the tools' schemas: ~700 tiny-tokenizer tokens)."""
    from serving_helpers import http_server

    from engine.async_llm import AsyncLLM
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    model = tiny_model("llama", max_position_embeddings=2048)
    llm = AsyncLLM.from_pretrained(model, num_blocks=256, max_model_len=1024)
    with http_server(build_frontend(OpenAIServing(llm, MODEL))) as url:
        yield url
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _valid(obj: dict) -> None:
    assert set(obj) == {"city", "days"} and isinstance(obj["city"], str) and len(obj["city"]) <= 10
    assert isinstance(obj["days"], int) and 1 <= obj["days"] <= 9


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_parses_against_the_schema(client, stream):
    kwargs = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 80,
        "temperature": 1.0,
        "seed": 5,
        "n": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": SCHEMA, "strict": True},
        },
    }
    if stream:
        text: dict[int, str] = {}
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + (c.delta.content or "")
        outputs = list(text.values())
    else:
        outputs = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert len(outputs) == 2
    for out in outputs:
        _valid(json.loads(out))


def test_json_object_and_vllm_guided_fields(client):
    obj = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=200,
        temperature=1.0,
        seed=2,  # random weights: most seeds write one endless string (finish_reason "length")
        response_format={"type": "json_object"},
    )
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(
        model=MODEL,
        prompt="Code:",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        extra_body={"guided_regex": r"[A-F]{4}-\d\d"},
    )
    assert re.fullmatch(r"[A-F]{4}-\d\d", regex.choices[0].text)
    choice = client.completions.create(
        model=MODEL,
        prompt="Pick:",
        max_tokens=10,
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert choice.choices[0].text in ("red", "green", "blue")
    grammar = client.completions.create(
        model=MODEL,
        prompt="Sum:",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        extra_body={"guided_grammar": 'root ::= [1-9] " + " [1-9]'},
    )
    assert re.fullmatch(r"[1-9] \+ [1-9]", grammar.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_round_trip(client, stream):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kwargs = {
            "model": MODEL,
            "messages": ASK,
            "tools": [WEATHER, CLOCK],
            "tool_choice": tool_choice,
            "parallel_tool_calls": False,  # random weights: an unbounded array of calls would run to length
            "max_tokens": 120,
            "temperature": 0,
        }
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                    for tc in c.delta.tool_calls or []:
                        call = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                        call["id"] = call["id"] or tc.id
                        call["name"] += tc.function.name or ""
                        call["arguments"] += tc.function.arguments or ""
            got = list(calls.values())
        else:
            done = client.chat.completions.create(**kwargs)
            message, finish = done.choices[0].message, done.choices[0].finish_reason
            got = [
                {"name": t.function.name, "arguments": t.function.arguments, "id": t.id}
                for t in message.tool_calls
            ]
            assert message.content is None
        assert got, f"no tool call for tool_choice={tool_choice}"
        assert finish == ("tool_calls" if tool_choice == "required" else "stop")
        for call in got:
            assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
            if call["name"] == "get_weather":
                _valid(json.loads(call["arguments"]))
        # the conversation goes on with the call and its answer
        follow = client.chat.completions.create(
            model=MODEL,
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": got[0]["id"],
                            "type": "function",
                            "function": {"name": got[0]["name"], "arguments": got[0]["arguments"]},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": got[0]["id"], "content": "sunny"},
            ],
            tools=[WEATHER, CLOCK],
            max_tokens=5,
            temperature=0,
        )
        assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_tool_calls_are_parsed_from_the_model_text(client):
    """`auto`: the model decides; here a grammar makes it write the Hermes tag the template asks for."""
    tagged = r'<tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>'
    done = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        max_tokens=200,
        temperature=0,
        extra_body={"guided_regex": tagged},
    )
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == [
        ("get_time", {})
    ]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
)
def test_bad_structured_output_and_tool_requests_are_400s(server, extra, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, **extra}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
