"""Tool calling for /v1/chat/completions, the request side: `tools` and `tool_choice` checked, the JSON schema
a grammar enforces when a call is forced, and the conversation's tool turns in the shape HF chat templates
expect. services/tool_parsers.py turns model output into OpenAI tool calls.
"""

import json
import re
from copy import deepcopy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from engine.errors import ParameterError

Delta = dict[str, Any]  # one OpenAI streaming `choices[i].delta` object
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None  # accepted; enforced only where guided_schema applies (required, named)

    @field_validator("name")
    @classmethod
    def _name_allowed(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r}: 1 to 64 letters, digits, underscores or dashes")
        return name

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError(f"a JSON schema of the arguments object; got type {schema['type']!r}")
        return schema

    def arguments_schema(self) -> dict[str, Any]:
        return deepcopy(self.parameters if self.parameters is not None else _NO_PARAMETERS)


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
_TOOLS = TypeAdapter(list[ChatTool])
_CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)


def _parameter_error(prefix: str, error: ValidationError) -> ParameterError:
    first = error.errors()[0]
    where = ".".join([prefix, *(str(p) for p in first["loc"])])
    return ParameterError(where, first["msg"].removeprefix("Value error, "))


def parse_tools(raw: object) -> list[ChatTool] | None:
    """The request's `tools` (dicts or ChatTool), checked; None when absent."""
    if raw is None:
        return None
    try:
        tools = _TOOLS.validate_python(raw)
    except ValidationError as e:
        raise _parameter_error("tools", e) from None
    if not tools:
        raise ParameterError("tools", "at least one function (leave tools out for none)")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise ParameterError(f"tools.{i}.function.name", f"{tool.function.name!r} appears twice")
        seen.add(tool.function.name)
    return tools


def parse_tool_choice(raw: object, tools: list[ChatTool] | None) -> ToolChoice:
    """The request's `tool_choice` checked against its tools; absent: "auto" with tools, else "none"."""
    if raw is None:
        return "auto" if tools else "none"
    try:
        choice = _CHOICE.validate_python(raw)
    except ValidationError:
        allowed = "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise ParameterError("tool_choice", f"got {raw!r}, allowed {allowed}") from None
    if choice != "none" and not tools:
        raise ParameterError("tool_choice", "needs tools: give the functions in `tools`")
    if isinstance(choice, NamedToolChoice) and tools is not None:
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise ParameterError("tool_choice", f"function {choice.function.name!r} is not in tools {names}")
    return choice


def _find_tool(tools: list[ChatTool], name: str) -> FunctionDefinition:
    return next(t.function for t in tools if t.function.name == name)


def _hoisted_defs(schemas: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each arguments schema's `$defs`/`definitions`, moved to the root where its "#/$defs/..." refs point
    once the schema is nested in the array schema."""
    hoisted: dict[str, dict[str, Any]] = {}
    for i, schema in enumerate(schemas):
        for key in ("$defs", "definitions"):
            for name, sub in schema.pop(key, {}).items():
                if hoisted.setdefault(key, {}).setdefault(name, sub) != sub:
                    where = f"tools.{i}.function.parameters"
                    raise ParameterError(where, f"{key}.{name} differs from another tool's of that name")
    return hoisted


def guided_schema(tools: list[ChatTool] | None, tool_choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema the output must match: for "required" an array of at least one {name, parameters}
    object, one anyOf branch per tool; for a named function its arguments schema; None for auto/none."""
    if not tools or tool_choice in ("none", "auto"):
        return None
    if isinstance(tool_choice, NamedToolChoice):
        return _find_tool(tools, tool_choice.function.name).arguments_schema()
    schemas = [t.function.arguments_schema() for t in tools]
    defs = _hoisted_defs(schemas)
    branches = [
        {
            "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for t, schema in zip(tools, schemas, strict=True)
    ]
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}, **defs}


def template_tools(tools: list[ChatTool] | None) -> list[dict[str, Any]] | None:
    """The tools as a chat template's `tools` variable (transformers passes these JSON-schema dicts)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class _FunctionCall(BaseModel):
    name: str
    arguments: str


class _MessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: _FunctionCall


_MESSAGE_CALLS = TypeAdapter(list[_MessageToolCall])


def _arguments_object(arguments: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ParameterError(where, "a JSON object as a string")
    return value


def _template_calls(raw: object, where: str) -> list[dict[str, Any]]:
    try:
        calls = _MESSAGE_CALLS.validate_python(raw)
    except ValidationError as e:
        raise _parameter_error(where, e) from None
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {
                "name": c.function.name,
                "arguments": _arguments_object(c.function.arguments, f"{where}.{j}.function.arguments"),
            },
        }
        for j, c in enumerate(calls)
    ]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a chat template: an assistant's `tool_calls` with arguments as dicts (as
    transformers passes them), content None as ""; a tool message must answer an earlier call's id."""
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        m = {**message, "content": message.get("content") or ""}
        if m.get("tool_calls"):
            if m.get("role") != "assistant":
                raise ParameterError(f"messages.{i}.tool_calls", "only an assistant message makes tool calls")
            m["tool_calls"] = _template_calls(m["tool_calls"], f"messages.{i}.tool_calls")
            call_ids.update(c["id"] for c in m["tool_calls"])
        else:
            m.pop("tool_calls", None)
        if m.get("role") == "tool" and m.get("tool_call_id") not in call_ids:
            detail = f"{m.get('tool_call_id')!r} is not the id of an earlier assistant tool call"
            raise ParameterError(f"messages.{i}.tool_call_id", detail)
        out.append(m)
    return out
