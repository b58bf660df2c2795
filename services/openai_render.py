"""OpenAI response bodies from engine outputs: a completion or a chat completion, whole or as the chunks of
an SSE stream. One renderer per endpoint; services/openai_serving.py drives either the same way."""

from dataclasses import dataclass, field
from typing import Protocol

from engine.outputs import RequestOutput
from engine.tokenizer import Tokenizer
from services.tool_calls import ToolChoice
from services.tool_parsers import (
    ToolCall,
    ToolCallStream,
    assistant_message,
    finish_reason,
    parser_for,
)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Tokenizer, tokens: list[int], logprobs: list[dict[int, float]] | None
) -> dict | None:
    if logprobs is None:
        return None
    return {
        "tokens": [token_text(tokenizer, t) for t in tokens],
        "token_logprobs": [lp[t] for t, lp in zip(tokens, logprobs, strict=True)],
        "top_logprobs": [{token_text(tokenizer, k): v for k, v in lp.items()} for lp in logprobs],
    }


def chat_logprobs(
    tokenizer: Tokenizer, tokens: list[int], logprobs: list[dict[int, float]] | None, top: int
) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for t, lp in zip(tokens, logprobs, strict=True):
        alternatives = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                "token": token_text(tokenizer, t),
                "logprob": lp[t],
                "top_logprobs": [{"token": token_text(tokenizer, k), "logprob": v} for k, v in alternatives],
            }
        )
    return {"content": content}


class Renderer(Protocol):
    def response(self, out: RequestOutput, usage: dict) -> dict:
        """The whole (non-streamed) response."""
        ...

    def opening(self, n: int) -> list[dict]:
        """Chunks sent before any token (chat announces the assistant role)."""
        ...

    def chunks(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> list[dict]:
        """One choice's new text (and tokens, logprobs) as stream chunks (several when tool calls start)."""
        ...

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk when stream_options.include_usage asks for it."""
        ...


@dataclass
class CompletionRenderer:
    request_id: str
    created: int
    model: str
    tokenizer: Tokenizer
    return_token_ids: bool = False
    echo: list[str] | None = None  # each prompt's text, sent before its choices' text (`echo`)
    n: int = 1  # choices per prompt

    def _echoed(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def _base(self) -> dict:
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def response(self, out: RequestOutput, usage: dict) -> dict:
        choices = [
            {
                "index": c.index,
                "text": self._echoed(c.index) + c.text,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "logprobs": completion_logprobs(self.tokenizer, c.token_ids, c.logprobs),
                **({"token_ids": c.token_ids} if self.return_token_ids else {}),
            }
            for c in out.outputs
        ]
        extra = {"prompt_token_ids": out.prompt_token_ids} if self.return_token_ids else {}
        return {**self._base(), "choices": choices, "usage": usage, **extra}

    def opening(self, n: int) -> list[dict]:
        if self.echo is None:
            return []
        return [
            {
                **self._base(),
                "choices": [{"index": i, "text": self._echoed(i), "finish_reason": None, "logprobs": None}],
            }
            for i in range(n)
        ]

    def chunks(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> list[dict]:
        choice = {
            "index": index,
            "text": text,
            "finish_reason": finish,
            "logprobs": completion_logprobs(self.tokenizer, tokens, logprobs),
        }
        return [{**self._base(), "choices": [choice]}]

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(), "choices": [], "usage": usage}


@dataclass
class ChatRenderer:
    """Tool calls in the output (services/tool_calls.py) become `message.tool_calls`, streamed as
    `delta.tool_calls`; without tools (tool_choice "none") the output is all content."""

    request_id: str
    created: int
    model: str
    tokenizer: Tokenizer
    return_token_ids: bool = False
    top_logprobs: int = 0
    tool_choice: ToolChoice = "none"
    parallel_tool_calls: bool = True  # False: only a choice's first call is returned
    _streams: dict[int, ToolCallStream] = field(default_factory=dict)

    def _parsed(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = parser_for(self.tool_choice).extract(text)
        return content, calls if self.parallel_tool_calls else calls[:1]

    def _allowed(self, delta: dict) -> bool:
        """Streaming without parallel calls: deltas of calls after the first are not sent."""
        return self.parallel_tool_calls or all(c["index"] == 0 for c in delta.get("tool_calls", []))

    def _stream(self, index: int) -> ToolCallStream:
        if index not in self._streams:
            self._streams[index] = parser_for(self.tool_choice).stream()
        return self._streams[index]

    def _base(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def response(self, out: RequestOutput, usage: dict) -> dict:
        parsed = [self._parsed(c.text) for c in out.outputs]
        choices = [
            {
                "index": c.index,
                "message": assistant_message(content, calls),
                "finish_reason": finish_reason(c.finish_reason, bool(calls), self.tool_choice),
                "stop_reason": c.stop_reason,
                "logprobs": chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, self.top_logprobs),
                **({"token_ids": c.token_ids} if self.return_token_ids else {}),
            }
            for c, (content, calls) in zip(out.outputs, parsed, strict=True)
        ]
        extra = {"prompt_token_ids": out.prompt_token_ids} if self.return_token_ids else {}
        return {**self._base("chat.completion"), "choices": choices, "usage": usage, **extra}

    def opening(self, n: int) -> list[dict]:
        role = {"role": "assistant", "content": ""}
        return [
            {
                **self._base("chat.completion.chunk"),
                "choices": [{"index": i, "delta": role, "finish_reason": None}],
            }
            for i in range(n)
        ]

    def chunks(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> list[dict]:
        """The deltas the tool-call stream lets out now (content, a call's head, its arguments); the
        logprobs ride on the first chunk, the finish reason on the last. Tokens whose text is held back
        (maybe a tool-call tag) still send their logprobs, with an empty delta."""
        stream = self._stream(index)
        deltas = [
            d for d in stream.feed(text) + (stream.finish() if finish is not None else []) if self._allowed(d)
        ]
        if not deltas:
            if finish is None and not tokens:
                return []
            deltas = [{}]
        reason = finish_reason(finish, stream.called, self.tool_choice) if finish is not None else None
        lps = chat_logprobs(self.tokenizer, tokens, logprobs, self.top_logprobs)
        return [
            {
                **self._base("chat.completion.chunk"),
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "finish_reason": reason if i == len(deltas) - 1 else None,
                        "logprobs": lps if i == 0 else None,
                    }
                ],
            }
            for i, delta in enumerate(deltas)
        ]

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}
