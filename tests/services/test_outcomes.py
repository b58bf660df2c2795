"""Every request's outcome counted once and truthfully in ridgeline_requests_total: stop, length, error
(a failure injected into the real engine's stream, whole and streamed), rejected, aborted and invalid;
a stream that fails mid-way ends with an OpenAI error event and [DONE], never a silent cut."""

import contextlib
import json
import time

import httpx
import openai
import pytest
from prometheus_client import REGISTRY
from serving_helpers import http_server

from engine.async_llm import AsyncLLM
from engine.tokenizer import Tokenizer
from services.frontend import build_frontend
from services.openai_serving import OpenAIServing

MODEL = "outcomes-model"  # its own label: other tests' requests do not count here


class FailsMidStream:
    """The real engine client, whose stream fails after `after` outputs when the prompt asks for it (what
    a worker dying mid-request looks like to the frontend)."""

    def __init__(self, llm: AsyncLLM, after: int = 2):
        self.llm, self.after = llm, after
        self.tokenizer = llm.tokenizer
        self.marker = llm.tokenizer.encode("fail")  # the frontend sends token ids

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    async def generate(self, request_id, prompt, params, **options):
        async with contextlib.aclosing(self.llm.generate(request_id, prompt, params, **options)) as stream:
            n = 0
            async for out in stream:
                yield out
                n += 1
                if list(prompt) == self.marker and n == self.after:
                    raise RuntimeError("injected failure")

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)

    def check_health(self) -> None:
        self.llm.check_health()

    def num_unfinished(self) -> int:
        return self.llm.num_unfinished()


def count(outcome: str) -> float:
    """Over the classes: a request refused before its class was read counts under slo_class "none"."""
    labels = [{"model": MODEL, "slo_class": slo, "outcome": outcome} for slo in ("standard", "none")]
    return sum(REGISTRY.get_sample_value("ridgeline_requests_total", label) or 0.0 for label in labels)


@pytest.fixture(scope="module")
def url(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=128, max_model_len=256)
    with http_server(build_frontend(OpenAIServing(FailsMidStream(llm), MODEL, max_logprobs=5))) as base:
        yield base
    llm.shutdown()


def test_each_outcome_is_counted_once(url, llama):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    before = {o: count(o) for o in ("stop", "length", "error", "invalid", "aborted", "rejected")}
    client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"ignore_eos": True})
    eos = Tokenizer(llama).eos_token_id
    stopped = client.completions.create(model=MODEL, prompt="hi", max_tokens=8, logit_bias={str(eos): 100})
    assert stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="fail", max_tokens=8, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError):  # over the server's max_logprobs, before admission
        client.completions.create(model=MODEL, prompt="hi", logprobs=6)
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the client leaves after its first token
    deadline = time.monotonic() + 10
    while count("aborted") == before["aborted"] and time.monotonic() < deadline:
        time.sleep(0.02)
    after = {o: count(o) for o in before}
    delta = {o: after[o] - before[o] for o in before}
    length_or_stop = delta["length"] + delta["stop"]
    assert delta["error"] == 1 and delta["invalid"] == 2 and delta["aborted"] == 1, delta
    assert length_or_stop == 2 and delta["length"] >= 1, delta


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(url):
    before = count("error")
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 8,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
    body = {
        "model": MODEL,
        "prompt": "fail",
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 1,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "choices" in events[0] and "error" in events[-1], [list(e) for e in events]
    assert events[-1]["error"]["type"] == "server_error" and "injected" not in events[-1]["error"]["message"]
    assert count("error") == before + 1


def test_rejected_is_counted_when_the_server_is_full(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64)
    before = count("rejected")
    try:
        with http_server(build_frontend(OpenAIServing(llm, MODEL, max_inflight=0))) as base:
            r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
    finally:
        llm.shutdown()
    assert r.status_code == 429 and count("rejected") == before + 1
