"""What a vLLM user sends, over a real HTTP server on 127.0.0.1 with the official `openai` client: prompt
batches, token-id prompts, echo, chat content parts, best_of; and honest 400s (before admission) for what
cannot fit the context or is not supported."""

import json

import httpx
import openai
import pytest
from serving_helpers import MODEL

GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_a_batch_of_prompts_answers_each_as_alone(client):
    prompts = ["The quick brown fox", "Hello", [5, 6, 7, 8]]
    alone = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts[:2]]
    batch = client.completions.create(model=MODEL, prompt=prompts[:2], n=2, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    assert [by_index[0], by_index[1], by_index[2], by_index[3]] == [alone[0], alone[0], alone[1], alone[1]]
    assert batch.usage.completion_tokens == 4 * 6
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7, 8], [20, 21, 22]], **GREEDY)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 7
    streamed = client.completions.create(model=MODEL, prompt=prompts[:2], stream=True, **GREEDY)
    text: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
    assert text == {0: alone[0], 1: alone[1]}


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt="Hello there", **GREEDY).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Hello there", echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello there" + plain
    streamed = client.completions.create(model=MODEL, prompt="Hello there", echo=True, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "Hello there" + plain


def test_chat_content_parts_read_as_their_text(client):
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say\nsomething"}], **GREEDY
    )
    parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "something"}],
            }
        ],
        **GREEDY,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_best_of_equal_to_n_is_served(client):
    done = client.completions.create(model=MODEL, prompt="Hello", n=2, best_of=2, **GREEDY)
    assert len(done.choices) == 2


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"max_tokens": 10_000_000}, "max_tokens"),
        ("/v1/completions", {"prompt": "word " * 40, "max_tokens": 200}, "max_tokens"),
        ("/v1/completions", {"suffix": "!"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
        ("/v1/completions", {"prompt": ["a"] * 65}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"], "return_token_ids": True}, "return_token_ids"),
        ("/v1/completions", {"min_tokens": 7, "max_tokens": 6}, "min_tokens"),
        ("/v1/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"functions": []}, "functions"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi", "mood": 1}]},
            "messages.0.mood",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 6, **extra}
    if path.endswith("/chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    r = httpx.post(f"{server}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_a_request_over_the_context_is_a_400_even_when_the_server_is_full(llama):
    """Validation before admission: a 429 would make the openai client retry what can never fit."""
    import asyncio

    from engine.async_llm import AsyncLLM
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    llm = AsyncLLM.from_pretrained(llama, num_blocks=64, max_model_len=128)
    serving = OpenAIServing(llm, MODEL)
    app = build_frontend(serving)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
            return await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 200})

    try:
        r = asyncio.run(main())
    finally:
        llm.shutdown()
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "maximum context length is 128" in r.json()["error"]["message"]
