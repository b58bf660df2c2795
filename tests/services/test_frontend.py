"""The OpenAI-compatible frontend over a real HTTP server on 127.0.0.1 (tiny model, in-process engine)."""

import asyncio
import json

import httpx
import openai
import pytest
from serving_helpers import MODEL, wait_idle

from engine import LLM, SamplingParams
from engine.async_llm import AsyncLLM
from services.frontend import build_frontend
from services.openai_serving import OpenAIServing, _guarded
from services.worker_protocol import WorkerLostError

PROMPTS = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26, 27, 28], [60] * 17]


def test_greedy_over_http_equals_offline_generate(llama, server):
    want = LLM(llama, num_blocks=64).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )
    for prompt, expected in zip(PROMPTS, want, strict=True):
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == expected.outputs[0].token_ids
        assert choice["text"] == expected.outputs[0].text and choice["finish_reason"] == "length"


def test_openai_client_completions_and_chat(server, async_llm):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_len = len(async_llm.tokenizer.encode("Hello there"))
    assert done.usage.prompt_tokens == prompt_len and done.usage.completion_tokens == 8
    assert done.usage.total_tokens == prompt_len + 8

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Hello there",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    chat_prompt = async_llm.tokenizer.apply_chat_template(messages)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(chat_prompt) and chat.usage.completion_tokens == 6
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_logprobs_n_and_stop_over_http(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(
        model=MODEL,
        prompt=[5, 6, 7],
        max_tokens=5,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    many = client.completions.create(
        model=MODEL,
        prompt=[5, 6, 7],
        max_tokens=5,
        n=3,
        temperature=1.0,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 15
    full = (
        client.completions.create(
            model=MODEL, prompt=[9, 9, 9], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[4:6]
    cut = client.completions.create(
        model=MODEL,
        prompt=[9, 9, 9],
        max_tokens=12,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in cut) == full[: full.find(stop)]


def test_32_concurrent_streams_complete_and_blocks_return(server, async_llm):
    baseline = async_llm.engine.block_manager.num_free_blocks

    async def one(client, i):
        body = {
            "model": MODEL,
            "prompt": [10 + i, 11, 12, 13],
            "max_tokens": 16,
            "temperature": 0.8,
            "seed": i,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        events = []
        async with client.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]["completion_tokens"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(main()) == [16] * 32
    wait_idle(async_llm, baseline)


def test_client_disconnect_mid_stream_aborts_the_request(server, async_llm):
    baseline = async_llm.engine.block_manager.num_free_blocks
    generated = async_llm.engine.stats.generated_tokens
    body = {
        "model": MODEL,
        "prompt": [3] * 40,
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    wait_idle(async_llm, baseline)  # no stream, no unfinished request, every block back
    assert async_llm.engine.stats.generated_tokens - generated < 100  # stopped early, not run to 200


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": [5] * 300}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    ok = httpx.post(
        f"{server}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


def test_malformed_json_and_oversized_bodies(server):
    r = httpx.post(
        f"{server}/v1/completions",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    huge = json.dumps({"model": MODEL, "prompt": "x" * (5 * 2**20)})
    r = httpx.post(
        f"{server}/v1/completions", content=huge, timeout=30, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body")


def test_api_key_guards_everything_but_health(async_llm):
    app = build_frontend(OpenAIServing(async_llm, MODEL), api_key="s3cret")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ridgeline") as client:
            health = await client.get("/health")
            missing = await client.get("/v1/models")
            wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            right = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            return health, missing, wrong, right

    health, missing, wrong, right = asyncio.run(main())
    assert health.status_code == 200 and right.status_code == 200
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


def test_too_many_requests_in_flight_get_429_with_retry_after(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=64)
    app = build_frontend(OpenAIServing(llm, MODEL, max_inflight=0))  # every request is one too many

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as client:
            return await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})

    try:
        r = asyncio.run(main())
    finally:
        llm.shutdown()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "server_busy"


def test_failure_after_the_stream_started_becomes_an_error_event():
    async def events():
        yield "data: {}\n\n"
        raise WorkerLostError("no decode worker could finish it")

    async def collect():
        return [event async for event in _guarded(events())]

    out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[-1] == "data: [DONE]\n\n"
    error = json.loads(out[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "retry later" in error["message"]
    assert "decode worker" not in error["message"]  # the cause goes to the log, not to the client


def test_slo_class_from_header_or_body_reaches_the_engine_as_priority(server, async_llm):
    counts = async_llm.engine.stats.requests_by_priority
    before = dict(counts)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    assert (
        httpx.post(
            f"{server}/v1/completions", json=body, headers={"x-slo-class": "batch"}, timeout=60
        ).status_code
        == 200
    )
    assert httpx.post(f"{server}/v1/completions", json={**body, "priority": 0}, timeout=60).status_code == 200
    r = httpx.post(
        f"{server}/v1/chat/completions",
        timeout=60,
        headers={"x-slo-class": "interactive"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200
    assert counts.get(2, 0) - before.get(2, 0) == 1 and counts.get(0, 0) - before.get(0, 0) == 2
    for headers, extra, param in (
        ({"x-slo-class": "premium"}, {}, "x-slo-class"),
        ({}, {"priority": 9}, "priority"),
    ):
        bad = httpx.post(f"{server}/v1/completions", json={**body, **extra}, headers=headers, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
