"""One request over plain OpenAI HTTP with streaming, timed: time to first token, the gaps between tokens,
end to end; token counts and cost from the server's usage (stream_options.include_usage) when it sends
them. Errors are results, never exceptions: HTTP status, timeout, connection, a stream that broke."""

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Target:
    """The server under test and what every request to it carries."""

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True  # outputs run to max_tokens (vLLM, SGLang and Ridgeline honour it)
    json_schema: dict | None = None  # every request's output constrained to it (response_format)


@dataclass
class RequestResult:
    ok: bool
    start: float  # seconds since the run started
    slo_class: str | None = None
    error: str | None = None  # "http_429", "http_500", "timeout", "connection", "stream", ...
    error_detail: str | None = None  # the server's message, shortened
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks after the first
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        if (
            self.ttft_s is None
            or self.e2e_s is None
            or not self.completion_tokens
            or self.completion_tokens < 2
        ):
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def _content(chunk: dict) -> str:
    out = ""
    for choice in chunk.get("choices") or []:
        out += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return out


def request_body(
    target: Target,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    max_tokens: int,
    documents: list[str] | None = None,
) -> dict:
    """The JSON body of one streaming request: chat completions with `messages`, else completions.
    `documents` go in Ridgeline's `documents` field ([{"text": ...}], before the prompt)."""
    body = {
        "model": target.model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    body |= {"messages": messages} if messages is not None else {"prompt": prompt}
    if documents:
        body["documents"] = [{"text": d} for d in documents]
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": target.json_schema, "strict": True},
        }
    return body


async def send(
    client: httpx.AsyncClient,
    target: Target,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    max_tokens: int,
    slo_class: str | None = None,
    run_start: float = 0.0,
    documents: list[str] | None = None,
) -> RequestResult:
    chat = messages is not None
    timeout_s = target.timeout_s
    body = request_body(target, prompt=prompt, messages=messages, max_tokens=max_tokens, documents=documents)
    headers = {"x-slo-class": slo_class} if slo_class else {}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - run_start, slo_class=slo_class)
    last = None
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream(
                "POST",
                target.url.rstrip("/") + path,
                json=body,
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=10.0),
            ) as r,
        ):
            if r.status_code != 200:
                await r.aread()
                result.error, result.error_detail = f"http_{r.status_code}", r.text[:300]
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error, result.error_detail = "stream", str(chunk["error"])[:300]
                    return result
                now = time.perf_counter()
                if _content(chunk):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.text += _content(chunk)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    result.cost_usd = usage.get("cost_usd")
    except (httpx.TimeoutException, TimeoutError):  # a read or the whole request ran past the timeout
        result.error = "timeout"
        return result
    except (httpx.TransportError, json.JSONDecodeError):
        result.error = "connection"
        return result
    result.e2e_s = time.perf_counter() - start
    if result.ttft_s is None:
        result.error = "no_tokens"
        return result
    if result.completion_tokens is None:  # a server without usage in streams: count content chunks
        result.completion_tokens = len(result.itl_s) + 1
    result.ok = True
    return result
