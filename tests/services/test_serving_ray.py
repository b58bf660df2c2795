"""The Ray Serve app end to end over HTTP on 127.0.0.1: disaggregated (prefill pool -> NIXL -> decode pool)
and aggregated, against the engine run in-process."""

import asyncio
import json
import re

import httpx
import openai
import pytest
from ray_helpers import MODEL, app_config, wait_pools_idle

from engine import LLM, SamplingParams

pytestmark = pytest.mark.ray

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "A much longer prompt that spans more than one KV block of sixteen "
    "tokens, so the handoff moves several blocks",
]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def apps(deploy, llama):
    return {
        "disaggregated": deploy("pd", **app_config(llama, kv_transport="nixl")),
        "aggregated": deploy("agg", **app_config(llama, mode="aggregated", api_key=KEY)),
    }


@pytest.fixture(scope="module")
def reference(llama):
    return LLM(llama, num_blocks=128, max_model_len=256)


def headers(mode: str) -> dict:
    return {"Authorization": f"Bearer {KEY}"} if mode == "aggregated" else {}


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_greedy_over_http_equals_llm_generate(apps, reference, mode):
    want = reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for prompt, ref in zip(PROMPTS, want, strict=True):
        r = httpx.post(
            f"{apps[mode]}/v1/completions",
            headers=headers(mode),
            timeout=60,
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 20,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == ref.outputs[0].token_ids
        assert choice["text"] == ref.outputs[0].text


def test_seeded_sampling_with_n_equals_llm_generate(apps, reference):
    params = dict(temperature=0.8, top_k=30, seed=7, n=3, max_tokens=12, ignore_eos=True)
    want = reference.generate([PROMPTS[2]], SamplingParams(**params))[0]
    r = httpx.post(
        f"{apps['disaggregated']}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPTS[2], "return_token_ids": True, **params},
    )
    got = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in got] == [o.token_ids for o in want.outputs]


def test_decode_reuses_cached_prefix_blocks_instead_of_pulling(apps, reference):
    from ray_helpers import pool_stats

    shared = "A shared system prompt that is long enough to fill several KV blocks of sixteen tokens each. "
    for turn, prompt in enumerate([shared + "First question?", shared + "Second, different question?"]):
        (before,) = pool_stats("pd", "DecodeWorker", 1).values()
        r = httpx.post(
            f"{apps['disaggregated']}/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
        want = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        assert r.json()["choices"][0]["text"] == want.outputs[0].text
        (after,) = pool_stats("pd", "DecodeWorker", 1).values()
        if turn == 1:  # the second turn pulls only what follows the shared prefix
            assert after["kv_blocks_reused"] - before["kv_blocks_reused"] >= 3


def test_streamed_tokens_equal_the_non_streamed_answer(apps, reference):
    want = reference.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text, usage = "", None
    with httpx.stream(
        "POST",
        f"{apps['disaggregated']}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": PROMPTS[0],
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        text += "".join(c["text"] for c in chunk["choices"])
        usage = chunk.get("usage") or usage
    assert text == want.outputs[0].text
    assert usage.pop("cost_usd") > 0  # both pools' engine time, priced (test_cost_accounting checks the sums)
    assert usage == {
        "prompt_tokens": len(want.prompt_token_ids),
        "completion_tokens": 24,
        "total_tokens": len(want.prompt_token_ids) + 24,
    }


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_logprobs_in_every_mode_equal_the_engines(apps, reference, mode):
    """Completions logprobs=3 and chat top_logprobs=2, whole and streamed: one entry per token, equal to the
    in-process engine's (the prefill worker's first token keeps its logprob across the handoff)."""
    client = openai.OpenAI(base_url=f"{apps[mode]}/v1", api_key=KEY if mode == "aggregated" else "unused")
    greedy = {"max_tokens": 6, "temperature": 0}
    ref = reference.generate([PROMPTS[2]], SamplingParams(**greedy, logprobs=3, ignore_eos=True))[0].outputs[
        0
    ]
    want = [lp[t] for t, lp in zip(ref.token_ids, ref.logprobs, strict=True)]
    done = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], logprobs=3, extra_body={"ignore_eos": True}, **greedy
    )
    got = done.choices[0].logprobs
    assert got.token_logprobs == pytest.approx(want, abs=1e-4)
    assert len(got.tokens) == len(got.top_logprobs) == 6
    # the top 3 and the sampled token, by text (two tokens may decode to the same text)
    assert all(len(top) <= 4 and tok in top for tok, top in zip(got.tokens, got.top_logprobs, strict=True))
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], logprobs=3, stream=True, extra_body={"ignore_eos": True}, **greedy
    )
    chunks = [c for c in streamed if c.choices]
    assert [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        want, abs=1e-4
    )
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Say something"}]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        **greedy,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    streamed_chat = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
        **greedy,
    )
    got_chat = [
        e for c in streamed_chat if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in got_chat] == pytest.approx([e.logprob for e in content], abs=1e-4)


@pytest.mark.parametrize("stream", [False, True])
def test_disaggregated_fields_with_the_official_client(apps, reference, stream):
    """The default mode: the prefill worker's first token and the decode worker's rest both obey the
    penalties and the grammar (the decode worker replays the first token into it); a batch of prompts,
    echo and chat content parts as in-process."""
    client = openai.OpenAI(base_url=f"{apps['disaggregated']}/v1", api_key="unused", max_retries=0)

    def complete(**kwargs) -> list[str]:
        if not stream:
            done = client.completions.create(model=MODEL, **kwargs)
            return [c.text for c in sorted(done.choices, key=lambda c: c.index)]
        text: dict[int, str] = {}
        for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + c.text
        return [text[i] for i in sorted(text)]

    penalized = {"temperature": 0, "max_tokens": 16, "frequency_penalty": 1.5}
    want = reference.generate(
        PROMPTS[:2], SamplingParams(**penalized, repetition_penalty=1.3, ignore_eos=True)
    )
    got = complete(
        prompt=PROMPTS[:2], extra_body={"ignore_eos": True, "repetition_penalty": 1.3}, **penalized
    )
    assert got == [o.outputs[0].text for o in want]
    assert complete(prompt=PROMPTS[1], echo=True, max_tokens=4, temperature=0)[0].startswith(PROMPTS[1])
    colour = complete(
        prompt="Colour:",
        max_tokens=10,
        temperature=1.0,
        seed=1,
        extra_body={"guided_choice": ["red", "blue"]},
    )
    assert colour[0] in ("red", "blue")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Give"}, {"type": "text", "text": "JSON"}]}
        ],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )
    obj = json.loads(chat.choices[0].message.content)
    assert set(obj) == {"n", "ok"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 99


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_official_openai_client(apps, reference, mode):
    client = openai.OpenAI(base_url=f"{apps[mode]}/v1", api_key=KEY if mode == "aggregated" else "unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    want = reference.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert done.choices[0].text == want.outputs[0].text
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens == len(want.prompt_token_ids)

    messages = [{"role": "user", "content": "Say something"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens


def test_32_concurrent_streams_complete_and_blocks_return(apps):
    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "model": MODEL,
            "prompt": f"{PROMPTS[i % 3]} {i}",
            "max_tokens": 16,
            "temperature": 0.7,
            "seed": i,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        usage = None
        async with client.stream("POST", f"{apps['disaggregated']}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(main()) == [16] * 32
    wait_pools_idle("pd", {"PrefillWorker": 1, "DecodeWorker": 1})


def test_client_disconnect_aborts_in_every_worker(apps):
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{apps['disaggregated']}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leave mid-stream
    stats = wait_pools_idle("pd", {"PrefillWorker": 1, "DecodeWorker": 1})
    (decode,) = stats["DecodeWorker"].values()
    assert decode["unfinished"] == 0


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "word " * 300}, 400, "prompt"),
        ({"model": MODEL, "prompt": [5, 100000]}, 400, "prompt"),
        ({"model": MODEL, "messages": []}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(apps, body, status, param):
    url = f"{apps['disaggregated']}/v1/completions"
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (error["param"] or "").startswith(param)
    ok = httpx.post(url, json={"model": MODEL, "prompt": "still serving", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_and_oversized_body(apps):
    url = f"{apps['disaggregated']}/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b" " * (5 * 2**20), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]


def test_api_key_is_required_when_set(apps):
    base = apps["aggregated"]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
    wrong = httpx.post(
        f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}, timeout=30
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert (
        httpx.post(f"{base}/v1/completions", json=body, headers=headers("aggregated"), timeout=30).status_code
        == 200
    )


def test_metrics_endpoint(apps):
    r = httpx.get(f"{apps['disaggregated']}/metrics", timeout=30)
    assert r.status_code == 200 and 'ridgeline_request_migrations_total{model="tiny-llama"}' in r.text
    # the workers' families come through the frontend, one series per replica
    for role in ("prefill", "decode"):
        assert re.search(
            rf'ridgeline_engine_steps_total{{model="tiny-llama",pool="{role}",replica="\w+",'
            rf'role="{role}"}} \d',
            r.text,
        ), role


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_documents_through_the_pools(apps, reference, mode):
    """RAG documents through the Ray pools: stored by id (POST /v1/documents) or given as text, assembled by
    the worker that computes the prompt (prefill, handed to decode; or the aggregated pool); every document
    token recomputed gives the plain prompt's greedy output, and by id equals by text."""
    doc_a, doc_b = "def area(r):\n    return 3.14159 * r * r\n", "class Stack:\n    items = []\n"
    stored = httpx.post(f"{apps[mode]}/v1/documents", headers=headers(mode), json={"text": doc_a}, timeout=60)
    assert stored.status_code == 200, stored.text
    doc_id = stored.json()["id"]

    def complete(documents, **extra):
        body = {"model": MODEL, "prompt": "# area", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(
            f"{apps[mode]}/v1/completions",
            headers=headers(mode),
            json={**body, "documents": documents, "return_token_ids": True, **extra},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    tok = reference.engine.tokenizer
    plain = tok.encode("", add_special_tokens=True)
    plain += tok.encode(doc_a, add_special_tokens=False) + tok.encode(doc_b, add_special_tokens=False)
    plain += tok.encode("# area", add_special_tokens=False)
    want = reference.generate([plain], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    every = {"document_recompute": {"first_tokens": 10**6}}
    assert complete([{"id": doc_id}, {"text": doc_b}], **every) == want.outputs[0].token_ids
    assert complete([{"id": doc_id}, {"text": doc_b}]) == complete([{"text": doc_a}, {"text": doc_b}])
    r = httpx.post(
        f"{apps[mode]}/v1/completions",
        headers=headers(mode),
        json={"model": MODEL, "prompt": "x", "documents": [{"id": "doc-unknown"}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
