"""Model output into OpenAI tool calls, whole or as stream deltas, by tool_choice (as vLLM serves them):
- "auto": Hermes/Qwen tags, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, among free text.
- "required": a JSON array `[{"name": ..., "parameters": {...}}, ...]` (the grammar from guided_schema).
- a named function: the output is that function's arguments object (the grammar from guided_schema).
- "none" (and no tools): the output is content.
"""

import json
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from services.tool_calls import Delta, NamedToolChoice, ToolChoice


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def assistant_message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    """A non-streamed choice's `message`."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


def finish_reason(engine_reason: str | None, called: bool, tool_choice: ToolChoice) -> str | None:
    """'tool_calls' when the output stopped on its own after calls; a named choice keeps 'stop' (OpenAI)."""
    if called and engine_reason == "stop" and not isinstance(tool_choice, NamedToolChoice):
        return "tool_calls"
    return engine_reason


class _Deltas:
    """Writes deltas; content that is only whitespace so far stays back until real content comes, and is
    dropped if the output made calls (the whole output's content is then None)."""

    def __init__(self) -> None:
        self.calls = 0
        self._held, self._spoken = "", False

    def content(self, text: str) -> list[Delta]:
        if not self._spoken:
            self._held += text
            if not self._held.strip():
                return []
            text, self._held, self._spoken = self._held, "", True
        return [{"content": text}] if text else []

    def call(self, name: str, arguments: str) -> list[Delta]:
        index, self.calls = self.calls, self.calls + 1
        head = {"index": index, "id": new_call_id(), "type": "function"}
        deltas = [{"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}]
        return deltas + self.arguments(index, arguments)

    @staticmethod
    def arguments(index: int, fragment: str) -> list[Delta]:
        return [{"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}] if fragment else []

    def finish(self) -> list[Delta]:
        held, self._held = self._held, ""
        return [{"content": held}] if held and not self.calls else []


class ToolCallStream(ABC):
    """One choice's output fed as text deltas, in order; each call returns the OpenAI `delta` objects to send
    now (content, or a call: first {index, id, type, function.name, function.arguments ""}, then argument
    fragments). What `finish()` has sent in all reassembles to the parser's `extract` of the whole text."""

    def __init__(self) -> None:
        self._out = _Deltas()

    @abstractmethod
    def feed(self, text: str) -> list[Delta]: ...

    @abstractmethod
    def finish(self) -> list[Delta]: ...

    @property
    def called(self) -> bool:
        """Whether a tool call was sent."""
        return self._out.calls > 0


class ToolCallParser(ABC):
    """Model output -> (content or None, tool calls), whole or streamed; content is None when the output
    was only tool calls."""

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]: ...

    @abstractmethod
    def stream(self) -> ToolCallStream: ...


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _loads(text: str) -> Any:
    """JSON, or None where the text is not JSON (NaN and Infinity are not)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None


def _call(name: object, arguments: object) -> ToolCall | None:
    if isinstance(arguments, str):  # some models write the arguments object as a JSON string
        arguments = _loads(arguments)
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class NoToolParser(ToolCallParser):
    """tool_choice "none" (or no tools): everything is content."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return text, []

    def stream(self) -> ToolCallStream:
        return _ContentStream()


class _ContentStream(ToolCallStream):
    def feed(self, text: str) -> list[Delta]:
        return [{"content": text}] if text else []

    def finish(self) -> list[Delta]:
        return []


OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TAGGED = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE) + "|" + re.escape(OPEN) + r"(.*)\Z", re.S)


def hermes_call(body: str) -> ToolCall | None:
    """A tag's body, `{"name": ..., "arguments": {...}}` ("parameters" also read), or None if it is not."""
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None
    return _call(obj.get("name"), obj.get("arguments", obj.get("parameters", {})))


class HermesToolParser(ToolCallParser):
    """tool_choice "auto": `<tool_call>` tags among content. A tag left open at the end is read to the end;
    a tag whose body is not a call stays in the content, tags and all. Content is the text outside calls,
    None when that is only whitespace and calls were made."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls, at = [], [], 0
        for match in _TAGGED.finditer(text):
            call = hermes_call(match.group(1) if match.group(1) is not None else match.group(2))
            if call is None:  # not a call: the tag stays in the content
                continue
            content.append(text[at : match.start()])
            calls.append(call)
            at = match.end()
        if not calls:
            return text, []
        joined = "".join(content) + text[at:]
        return (joined if joined.strip() else None), calls

    def stream(self) -> ToolCallStream:
        return HermesToolStream()


def _open_tag_prefix(text: str) -> int:
    """Length of the longest end of `text` that may begin an OPEN tag."""
    return next((k for k in range(min(len(text), len(OPEN) - 1), 0, -1) if OPEN.startswith(text[-k:])), 0)


class HermesToolStream(ToolCallStream):
    """Content is sent as it comes, but text that may begin a `<tool_call>` tag waits until it is decided;
    a call is sent once its closing tag arrives (its body must parse whole before it is known to be a call),
    as a name delta and then its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self._buf, self._in_call, self._scanned = "", False, 0

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        deltas: list[Delta] = []
        while True:
            if not self._in_call:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _open_tag_prefix(self._buf)
                    deltas += self._out.content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return deltas
                deltas += self._out.content(self._buf[:at])
                self._buf, self._in_call, self._scanned = self._buf[at + len(OPEN) :], True, 0
                continue
            end = self._buf.find(CLOSE, self._scanned)
            if end < 0:
                self._scanned = max(0, len(self._buf) - len(CLOSE) + 1)  # a CLOSE split over two deltas
                return deltas
            body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(CLOSE) :], False
            deltas += self._tag(body, OPEN + body + CLOSE)

    def _tag(self, body: str, whole: str) -> list[Delta]:
        call = hermes_call(body)
        return self._out.call(call.name, call.arguments) if call else self._out.content(whole)

    def finish(self) -> list[Delta]:
        rest, self._buf = self._buf, ""
        deltas = self._tag(rest, OPEN + rest) if self._in_call else self._out.content(rest)
        return deltas + self._out.finish()


class RequiredToolParser(ToolCallParser):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"} objects. Output that is
    not (cut short by max_tokens, say) is returned as content. Streamed whole once the output is complete."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        items = _loads(text)
        if not isinstance(items, list) or not items:
            return text, []
        calls = [_call(i.get("name"), i.get("parameters")) if isinstance(i, dict) else None for i in items]
        if any(c is None for c in calls):
            return text, []
        return None, [c for c in calls if c is not None]

    def stream(self) -> ToolCallStream:
        return _WholeOutputStream(self)


class _WholeOutputStream(ToolCallStream):
    def __init__(self, parser: ToolCallParser) -> None:
        super().__init__()
        self._parser, self._text = parser, ""

    def feed(self, text: str) -> list[Delta]:
        self._text += text
        return []

    def finish(self) -> list[Delta]:
        content, calls = self._parser.extract(self._text)
        deltas = self._out.content(content or "")
        for call in calls:
            deltas += self._out.call(call.name, call.arguments)
        return deltas + self._out.finish()


class NamedToolParser(ToolCallParser):
    """A named tool_choice: the whole output is that function's arguments (as the grammar made it, or as
    far as it got when cut short), one call, no content. Streamed as it comes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, [ToolCall(new_call_id(), self.name, text)]

    def stream(self) -> ToolCallStream:
        return _NamedStream(self.name)


class _NamedStream(ToolCallStream):
    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        return self._out.arguments(0, text) if self.called else self._out.call(self._name, text)

    def finish(self) -> list[Delta]:
        return [] if self.called else self._out.call(self._name, "")


def parser_for(tool_choice: ToolChoice) -> ToolCallParser:
    """The parser for a checked tool_choice (parse_tool_choice)."""
    if isinstance(tool_choice, NamedToolChoice):
        return NamedToolParser(tool_choice.function.name)
    if tool_choice == "required":
        return RequiredToolParser()
    return HermesToolParser() if tool_choice == "auto" else NoToolParser()
