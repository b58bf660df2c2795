"""OpenAI response bodies from engine outputs: a completion or a chat completion, whole or as the chunks of
an SSE stream. One renderer per endpoint; services/openai_serving.py drives either the same way."""

from dataclasses import dataclass
from typing import Protocol

from engine.outputs import RequestOutput
from engine.tokenizer import Tokenizer


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

    def chunk(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> dict:
        """One choice's new text (and tokens, logprobs) as a stream chunk."""
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

    def chunk(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> dict:
        choice = {
            "index": index,
            "text": text,
            "finish_reason": finish,
            "logprobs": completion_logprobs(self.tokenizer, tokens, logprobs),
        }
        return {**self._base(), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(), "choices": [], "usage": usage}


@dataclass
class ChatRenderer:
    request_id: str
    created: int
    model: str
    tokenizer: Tokenizer
    return_token_ids: bool = False
    top_logprobs: int = 0

    def _base(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def response(self, out: RequestOutput, usage: dict) -> dict:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "logprobs": chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, self.top_logprobs),
                **({"token_ids": c.token_ids} if self.return_token_ids else {}),
            }
            for c in out.outputs
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

    def chunk(
        self,
        index: int,
        text: str,
        tokens: list[int],
        logprobs: list[dict[int, float]] | None,
        finish: str | None,
    ) -> dict:
        choice = {
            "index": index,
            "delta": {"content": text} if text else {},
            "finish_reason": finish,
            "logprobs": chat_logprobs(self.tokenizer, tokens, logprobs, self.top_logprobs),
        }
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}
