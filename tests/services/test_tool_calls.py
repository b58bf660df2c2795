"""Tool calling: request checks, guided schemas, the output parsers (whole and streamed at every split), the
conversation's tool turns, and the tiny models' tools-aware chat template."""

import json
import re

import jsonschema
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import PreTrainedTokenizerFast

from engine.errors import ParameterError
from engine.tiny_model import CHATML, train_tokenizer
from services.tool_calls import (
    NamedToolChoice,
    guided_schema,
    parse_tool_choice,
    parse_tools,
    template_messages,
    template_tools,
)
from services.tool_parsers import (
    HermesToolParser,
    NamedToolParser,
    NoToolParser,
    RequiredToolParser,
    ToolCall,
    ToolCallParser,
    assistant_message,
    finish_reason,
    parser_for,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, CLOCK]


def tool(name: str, parameters: dict | None = None) -> dict:
    return {
        "type": "function",
        "function": {"name": name, **({"parameters": parameters} if parameters else {})},
    }


def refused(param: str, call, *args) -> ParameterError:
    with pytest.raises(ParameterError) as info:
        call(*args)
    assert info.value.parameter == param, info.value
    assert str(info.value).startswith(f"{param}: ")
    return info.value


# ---- request checks ----


def test_tools_parse_and_absent_tools_are_none():
    tools = parse_tools(TOOLS)
    assert tools is not None and [t.function.name for t in tools] == ["get_weather", "get_time"]
    assert tools[1].function.parameters is None
    assert parse_tools(None) is None


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([{"type": "function", "function": {"description": "no name"}}], "tools.0.function.name"),
        ([WEATHER, tool("get weather")], "tools.1.function.name"),
        ([WEATHER, tool("x" * 65)], "tools.1.function.name"),
        ([WEATHER, WEATHER], "tools.1.function.name"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "tools.0.type"),
        ([{"type": "function", "function": {"name": "f", "examples": []}}], "tools.0.function.examples"),
        ([tool("f", {"type": "array"})], "tools.0.function.parameters"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            "tools.0.function.parameters",
        ),
        ([{"type": "function"}], "tools.0.function"),
        ([], "tools"),
        ({"get_weather": WEATHER}, "tools"),
    ],
)
def test_a_bad_tool_is_refused_naming_its_field(raw, param):
    refused(param, parse_tools, raw)


def test_tool_choice_defaults_to_auto_with_tools_and_none_without():
    assert parse_tool_choice(None, parse_tools(TOOLS)) == "auto"
    assert parse_tool_choice(None, None) == "none"
    assert parse_tool_choice("none", None) == "none"


def test_tool_choice_names_a_function_of_the_tools():
    choice = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, parse_tools(TOOLS))
    assert isinstance(choice, NamedToolChoice) and choice.function.name == "get_time"


@pytest.mark.parametrize(
    ("raw", "tools", "says"),
    [
        ("sometimes", TOOLS, "allowed"),
        ({"type": "function", "function": {"name": "get_news"}}, TOOLS, "'get_news' is not in tools"),
        ({"type": "function"}, TOOLS, "allowed"),
        ("required", None, "needs tools"),
        ("auto", None, "needs tools"),
        ({"type": "function", "function": {"name": "get_time"}}, None, "needs tools"),
    ],
)
def test_a_bad_tool_choice_is_refused_naming_tool_choice(raw, tools, says):
    error = refused("tool_choice", parse_tool_choice, raw, parse_tools(tools))
    assert says in error.detail


# ---- guided schemas ----


def test_required_schema_is_an_array_of_at_least_one_known_call():
    schema = guided_schema(parse_tools(TOOLS), "required")
    assert schema is not None and schema["type"] == "array" and schema["minItems"] == 1
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(ok, schema)
    for bad in (
        [],
        [{"name": "get_news", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"unit": "c"}}],  # city is required
        [{"name": "get_time", "parameters": {"zone": "UTC"}}],  # get_time takes no arguments
        [{"name": "get_time"}],
        {"name": "get_time", "parameters": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_named_schema_is_that_functions_arguments():
    tools = parse_tools(TOOLS)
    weather = parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert guided_schema(tools, weather) == WEATHER["function"]["parameters"]
    clock = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools)
    schema = guided_schema(tools, clock)
    assert schema is not None
    jsonschema.validate({}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"zone": "UTC"}, schema)


def test_auto_and_none_have_no_schema():
    assert guided_schema(parse_tools(TOOLS), "auto") is None
    assert guided_schema(parse_tools(TOOLS), "none") is None
    assert guided_schema(None, "none") is None


def test_required_schema_moves_each_tools_defs_to_the_root_where_refs_point():
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    params = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": point}}
    raw = [tool("move", params), tool("jump", params)]
    schema = guided_schema(parse_tools(raw), "required")
    assert schema is not None and schema["$defs"] == {"Point": point}
    jsonschema.validate([{"name": "move", "parameters": {"at": {"x": 1}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "move", "parameters": {"at": {"y": 1}}}], schema)
    assert "$defs" in raw[0]["function"]["parameters"]  # the request's tools are left as they were


def test_required_schema_refuses_two_different_defs_of_one_name():
    other = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": {}}}
    params = {"type": "object", "$defs": {"Point": {"type": "string"}}}
    refused(
        "tools.1.function.parameters",
        guided_schema,
        parse_tools([tool("a", params), tool("b", other)]),
        "required",
    )


# ---- parsing the output ----

CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CALL_TIME = '<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>'
HERMES_TEXTS = [
    "The weather is fine.",
    "",
    "a < b and <tool or <tool_call",
    CALL_PARIS,
    CALL_PARIS + "\n" + CALL_TIME,
    "Let me check. " + CALL_PARIS,
    "\n\n" + CALL_PARIS + "\n",
    "First " + CALL_TIME + " then " + CALL_PARIS + " done.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
    "<tool_call>not json</tool_call> and " + CALL_TIME,
    '<tool_call>{"name": "get_time", "arguments": {}}',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa',
    '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>',
    '<tool_call>{"name": "get_time", "parameters": {"zone": "</tool_call>"}}</tool_call>',
    '<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>',
    "<tool_call>[1, 2]</tool_call><tool_call></tool_call>",
    '<tool_call>{"name": "f", "arguments": {"t": "<tool_call>"}}</tool_call><tool_call>{"name": "g"}</tool_call>',
    'Ünïcode ✓ <tool_call>{"name": "say", "arguments": {"text": "héllo ✓"}}</tool_call>',
]


def call_names(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_plain_text_is_all_content():
    assert HermesToolParser().extract("The weather is fine.") == ("The weather is fine.", [])


def test_one_call_and_no_content():
    content, calls = HermesToolParser().extract(CALL_PARIS)
    assert content is None
    assert call_names(calls) == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)


def test_two_calls_in_order_with_distinct_ids():
    content, calls = HermesToolParser().extract(CALL_PARIS + "\n" + CALL_TIME)
    assert content is None
    assert call_names(calls) == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    assert calls[0].id != calls[1].id


def test_content_before_a_call_is_kept():
    content, calls = HermesToolParser().extract("Let me check. " + CALL_PARIS)
    assert content == "Let me check. " and [c.name for c in calls] == ["get_weather"]


def test_malformed_json_in_tags_is_content_not_a_crash():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert HermesToolParser().extract(text) == (text, [])
    content, calls = HermesToolParser().extract("<tool_call>not json</tool_call> and " + CALL_TIME)
    assert content == "<tool_call>not json</tool_call> and " and [c.name for c in calls] == ["get_time"]


def test_a_call_left_open_at_the_end_counts_when_it_parses():
    content, calls = HermesToolParser().extract('<tool_call>{"name": "get_time", "arguments": {}}')
    assert content is None and call_names(calls) == [("get_time", {})]
    cut = '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'
    assert HermesToolParser().extract(cut) == (cut, [])


def test_arguments_given_as_a_json_string_or_as_parameters_are_read():
    _, calls = HermesToolParser().extract('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert call_names(calls) == [("f", {"a": 1})]
    _, calls = HermesToolParser().extract('<tool_call>{"name": "f", "parameters": {"b": [2]}}</tool_call>')
    assert call_names(calls) == [("f", {"b": [2]})]


def test_non_json_constants_and_non_objects_are_not_calls():
    nan = '<tool_call>{"name": "get_time", "arguments": {"x": NaN}}</tool_call>'
    assert HermesToolParser().extract(nan) == (nan, [])
    lists = "<tool_call>[1, 2]</tool_call><tool_call></tool_call>"
    assert HermesToolParser().extract(lists) == (lists, [])


def reassemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """A streamed choice put back together: (content, [(id, name, arguments)]), checking each delta's shape."""
    content, calls = "", []
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        if "content" in delta:
            assert delta["content"], "no empty content deltas"
            content += delta["content"]
            continue
        (part,) = delta["tool_calls"]
        if part["index"] == len(calls):  # a new call: id, type and name first, arguments ""
            assert set(part) == {"index", "id", "type", "function"} and part["type"] == "function"
            assert part["function"]["arguments"] == "" and re.fullmatch(r"call_[0-9a-f]{24}", part["id"])
            calls.append([part["id"], part["function"]["name"], ""])
        else:
            assert part["index"] == len(calls) - 1 and set(part) == {"index", "function"}
            assert set(part["function"]) == {"arguments"} and part["function"]["arguments"]
            calls[-1][2] += part["function"]["arguments"]
    return (content if content or not calls else None), [tuple(c) for c in calls]


def streamed(parser: ToolCallParser, pieces: list[str]) -> list[dict]:
    stream, deltas = parser.stream(), []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.finish()
    assert stream.called == any("tool_calls" in d for d in deltas)
    return deltas


def splits(text: str):
    """The text whole, one character at a time, and cut in two at every boundary."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def assert_streams_like_extract(parser: ToolCallParser, text: str):
    content, calls = parser.extract(text)
    for pieces in splits(text):
        got_content, got_calls = reassemble(streamed(parser, pieces))
        assert got_content == content, pieces
        assert [name for _, name, _ in got_calls] == [c.name for c in calls], pieces
        assert [json.loads(a) if calls else a for _, _, a in got_calls] == [
            json.loads(c.arguments) for c in calls
        ]
        assert [a for _, _, a in got_calls] == [c.arguments for c in calls]
        assert len({i for i, _, _ in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_stream_at_every_split_reassembles_to_extract(text):
    assert_streams_like_extract(HermesToolParser(), text)


def test_text_that_may_begin_a_tag_waits_until_it_is_decided():
    stream = HermesToolParser().stream()
    assert stream.feed("It is 5 <") == [{"content": "It is 5 "}]
    assert stream.feed(" 6 <tool_c") == [{"content": "< 6 "}]
    assert stream.feed("all>") == []
    assert stream.feed('{"name": "get_time", "arguments": {}}</tool_') == []
    first, arguments = stream.feed("call>")
    assert first["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert first["tool_calls"][0]["index"] == 0 and first["tool_calls"][0]["type"] == "function"
    assert arguments == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert stream.feed(" <") == [{"content": " "}]
    assert stream.finish() == [{"content": "<"}]


def test_whitespace_only_content_around_calls_is_not_sent():
    stream = HermesToolParser().stream()
    deltas = stream.feed("\n" + CALL_TIME + "\n") + stream.finish()
    assert [d for d in deltas if "content" in d] == []
    stream = HermesToolParser().stream()
    assert stream.feed("\n") == [] and stream.finish() == [{"content": "\n"}]  # no calls: all of it


# ---- forced forms ----

REQUIRED_TEXTS = [
    '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]',
    '[{"name": "get_time", "parameters": {}}',  # cut short
    "[]",
    '[{"name": "get_time"}]',
    "  ",
]


def test_required_output_is_its_array_of_calls():
    content, calls = RequiredToolParser().extract(REQUIRED_TEXTS[0])
    assert content is None
    assert call_names(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]


@pytest.mark.parametrize("text", REQUIRED_TEXTS[1:])
def test_required_output_that_is_not_calls_is_content(text):
    assert RequiredToolParser().extract(text) == (text, [])


@pytest.mark.parametrize("text", REQUIRED_TEXTS)
def test_required_stream_sends_the_calls_when_the_output_is_complete(text):
    stream = RequiredToolParser().stream()
    assert stream.feed(text[:5]) == [] and stream.feed(text[5:]) == []
    assert_streams_like_extract(RequiredToolParser(), text)


def test_named_output_is_that_functions_arguments():
    content, calls = NamedToolParser("get_weather").extract('{"city": "Oslo"}')
    assert content is None and call_names(calls) == [("get_weather", {"city": "Oslo"})]


def test_named_stream_sends_the_arguments_as_they_come():
    stream = NamedToolParser("get_weather").stream()
    head, fragment = stream.feed('{"ci')
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert fragment == {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    assert stream.feed('ty": "Oslo"}') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}
    ]
    assert stream.finish() == []
    assert_streams_like_extract(NamedToolParser("get_weather"), '{"city": "Oslo", "unit": "c"}')


def test_no_tools_means_everything_is_content_even_tags():
    assert NoToolParser().extract(CALL_TIME) == (CALL_TIME, [])
    assert reassemble(streamed(NoToolParser(), list(CALL_TIME))) == (CALL_TIME, [])


def test_each_tool_choice_gets_its_parser():
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    assert isinstance(parser_for("auto"), HermesToolParser)
    assert isinstance(parser_for("required"), RequiredToolParser)
    assert isinstance(parser_for("none"), NoToolParser)
    parser = parser_for(named)
    assert isinstance(parser, NamedToolParser) and parser.name == "get_time"


def test_finish_reason_is_tool_calls_when_calls_ended_the_output():
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    assert finish_reason("stop", True, "auto") == "tool_calls"
    assert finish_reason("stop", True, "required") == "tool_calls"
    assert finish_reason("stop", True, named) == "stop"  # OpenAI: a forced function stops
    assert finish_reason("stop", False, "auto") == "stop"
    assert finish_reason("length", True, "auto") == "length"
    assert finish_reason(None, False, "auto") is None


def test_assistant_message_has_tool_calls_only_when_made():
    call = ToolCall("call_1", "get_time", "{}")
    assert assistant_message(None, [call]) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        ],
    }
    assert assistant_message("hi", []) == {"role": "assistant", "content": "hi"}


# ---- the conversation's tool turns ----

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
]


def test_tool_turns_become_what_a_template_expects():
    before = json.dumps(CONVERSATION)
    out = template_messages(CONVERSATION)
    assert out[2]["content"] == ""
    assert [c["function"]["arguments"] for c in out[2]["tool_calls"]] == [{"city": "Paris"}, {}]
    assert [c["id"] for c in out[2]["tool_calls"]] == ["call_a", "call_b"]
    assert out[:2] == CONVERSATION[:2] and out[3:] == CONVERSATION[3:]
    assert json.dumps(CONVERSATION) == before  # the request's messages are left as they were


def test_messages_without_tool_turns_pass_unchanged():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": []},
    ]
    assert template_messages(messages) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            lambda m: m[2]["tool_calls"][0]["function"].update(arguments="{city"),
            "messages.2.tool_calls.0.function.arguments",
        ),
        (
            lambda m: m[2]["tool_calls"][1]["function"].update(arguments="[]"),
            "messages.2.tool_calls.1.function.arguments",
        ),
        (lambda m: m[2]["tool_calls"][1].pop("id"), "messages.2.tool_calls.1.id"),
        (lambda m: m[2]["tool_calls"][0]["function"].pop("name"), "messages.2.tool_calls.0.function.name"),
        (lambda m: m[4].update(tool_call_id="call_z"), "messages.4.tool_call_id"),
        (lambda m: m[3].pop("tool_call_id"), "messages.3.tool_call_id"),
        (lambda m: m[1].update(tool_calls=m[2]["tool_calls"]), "messages.1.tool_calls"),
        (lambda m: m.insert(1, m.pop(3)), "messages.1.tool_call_id"),  # answers a call not yet made
    ],
)
def test_a_bad_tool_turn_is_refused_naming_its_field(change, param):
    messages = json.loads(json.dumps(CONVERSATION))
    change(messages)
    refused(param, template_messages, messages)


# ---- the tiny models' chat template ----

# the template before tools: without tools the new one must render exactly this
PLAIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    [
        {"role": "developer", "content": "D"},
        {"role": "user", "content": "a\nb {{ x }} {% if %} '\" <tool_call>"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again"},
    ],
]


def engine_render(template: str, messages: list[dict], **kwargs) -> str:
    """As engine/tokenizer.py renders a chat template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.fixture(scope="module")
def hf_tokenizer():
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("messages", PLAIN_CONVERSATIONS)
@pytest.mark.parametrize("generation", [True, False])
def test_template_without_tools_renders_as_before(hf_tokenizer, messages, generation):
    before = engine_render(PLAIN_CHATML, messages, add_generation_prompt=generation)
    for tools in ({}, {"tools": None}, {"tools": []}):
        assert engine_render(CHATML, messages, add_generation_prompt=generation, **tools) == before
    hf = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    assert hf == before


def rendered_tools(text: str) -> list[dict]:
    block = text[text.index("<tools>\n") + len("<tools>\n") : text.index("\n</tools>")]
    return [json.loads(line) for line in block.split("\n")]


def turns(text: str) -> list[str]:
    return re.findall(r"<\|im_start\|>(.*?)<\|im_end\|>", text, re.S)


def check_tools_rendering(text: str, tools: list[dict]):
    system, user, assistant, tool_results = turns(text)
    assert system.startswith("system\nBe brief.\n\n# Tools\n") and "<tool_call>" in system
    assert rendered_tools(text) == tools
    assert user == "user\nWeather in Paris and the time?"
    content, calls = HermesToolParser().extract(assistant.removeprefix("assistant\n"))
    assert content is None and call_names(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert (
        tool_results
        == "user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_template_with_tools_lists_them_and_renders_tool_turns(hf_tokenizer):
    tools = template_tools(parse_tools(TOOLS))
    assert tools is not None
    messages = template_messages(CONVERSATION)
    check_tools_rendering(engine_render(CHATML, messages, tools=tools, add_generation_prompt=True), tools)
    hf = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    check_tools_rendering(hf, tools)


def test_template_with_tools_and_no_system_message_opens_with_the_tools(hf_tokenizer):
    tools = template_tools(parse_tools([CLOCK]))
    messages = [{"role": "user", "content": "Time?"}]
    text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert rendered_tools(text) == [{"type": "function", "function": {"name": "get_time"}}]
    assert turns(text)[1:] == ["user\nTime?"]
