"""What a hostile or careless client sends, over real HTTP on 127.0.0.1 (tiny model, in-process engine):
every bad input is a 400 with an OpenAI error body naming the field, nothing reaches torch out of range,
a huge prompt does not stall the event loop, an oversized or slow body is cut off, and a server-side
failure answers with a request id and no internals."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from serving_helpers import MODEL, http_server, wait_idle

from engine.async_llm import AsyncLLM
from services.frontend import build_frontend
from services.http_limits import BODY_READ_TIMEOUT_S, MAX_BODY_BYTES, BodyLimit
from services.openai_serving import OpenAIServing


@pytest.fixture(scope="module")
def hostile_llm(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=128, max_model_len=256)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(hostile_llm):
    with http_server(build_frontend(OpenAIServing(hostile_llm, MODEL))) as base:
        yield base


def _still_serves(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 2**63),
        ("top_k", 10**30),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("temperature", 1e308),
        ("temperature", float("inf")),
        ("top_p", float("nan")),
        ("min_p", -1e-300),
        ("n", 10**9),
        ("max_tokens", -(10**20)),
        ("logprobs", 10**12),
        ("presence_penalty", 1e300),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", float("inf")),
        ("logit_bias", {"5": 1e9}),
        ("logit_bias", {"not-a-token": 1}),
        ("presence_penalty", 0.5),
        ("logit_bias", {"5": 10}),
    ],
)
def test_numeric_extremes_are_a_400_or_served_never_a_crash(url, field, value):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}, allow_nan=True)
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    if field == "top_k" and r.status_code == 200:  # a top_k past the vocabulary keeps every token (vLLM)
        assert r.json()["choices"][0]["finish_reason"] == "length"
    elif (field, value) in (("presence_penalty", 0.5), ("logit_bias", {"5": 10})):  # in range: applied
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == field, error
    _still_serves(url)


def test_a_huge_top_k_samples_like_no_top_k(url):
    """top_k >= 2**63 overflowed torch.tensor inside the engine's step and killed it for everyone."""
    for top_k in (2**63, 2**64 + 5):
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=60,
            json={
                "model": MODEL,
                "prompt": "hi",
                "max_tokens": 3,
                "top_k": top_k,
                "temperature": 1.0,
                "seed": 7,
            },
        )
        assert r.status_code == 200, r.text
    _still_serves(url)


def test_seeds_span_int64_and_n_above_one_wraps(url):
    for seed in (2**63 - 1, -(2**63), -1):
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": seed, "n": 2, "temperature": 1.0},
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2


def test_a_vanishing_temperature_is_greedy_not_token_zero(url, hostile_llm):
    """temperature <= 1e-38 used to overflow the tempered logits into token 0 at every position."""
    body = {
        "model": MODEL,
        "prompt": [5, 6, 7, 8],
        "max_tokens": 6,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    greedy = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
    for t in (1e-38, 1e-300, 5e-6):
        tiny = httpx.post(f"{url}/v1/completions", json={**body, "temperature": t}, timeout=60).json()
        assert tiny["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]
    small = httpx.post(
        f"{url}/v1/completions", json={**body, "temperature": 1e-3, "seed": 1}, timeout=60
    ).json()
    assert len(small["choices"][0]["token_ids"]) == 6  # raised to 1e-2 (vLLM), sampled, finite


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", '"prompt": "a\\ud800b"', "prompt"),
        (
            "/v1/chat/completions",
            '"messages": [{"role": "user", "content": "x\\udc00"}]',
            "messages.0.content",
        ),
        ("/v1/completions", '"prompt": "ok", "stop": ["\\udfff"]', "stop.0"),
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": null}]', "messages.0.content"),
        ("/v1/completions", '"prompt": ' + "[" * 6000 + "]" * 6000, None),
        ("/v1/completions", '"prompt": "x", "user": ' + '{"a":' * 50_000 + "1" + "}" * 50_000, None),
    ],
)
def test_malformed_text_and_structure_get_an_openai_400(url, path, raw, param):
    body = f'{{"model": "{MODEL}", {raw}}}'.encode()
    r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    _still_serves(url)


def test_an_assistant_turn_may_have_null_content(url):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={
            "model": MODEL,
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "?"},
            ],
        },
    )
    assert r.status_code == 200, r.text


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(url, hostile_llm):
    limit = hostile_llm.max_model_len * hostile_llm.tokenizer.max_chars_per_token
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "y" * (limit + 1)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "cannot fit" in r.json()["error"]["message"]


def test_tokenizing_a_4mb_prompt_does_not_stall_health(tiny_model):
    """The tokenizer runs off the event loop: /health and other requests answer while it works."""
    long_context = tiny_model("llama", max_position_embeddings=2**20)  # so the length cap lets it through
    llm = AsyncLLM.from_pretrained(long_context, num_blocks=64, max_model_len=2**20)
    prompt = "word " * (4 * 2**20 // 5 - 64)
    try:
        with http_server(build_frontend(OpenAIServing(llm, MODEL))) as base:
            done = threading.Event()

            def send():
                try:
                    httpx.post(
                        f"{base}/v1/completions",
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 1},
                        timeout=120,
                    )
                finally:
                    done.set()

            sender = threading.Thread(target=send)
            sender.start()
            worst, probes = 0.0, 0
            with httpx.Client(base_url=base, timeout=30) as client:
                while not done.is_set() and probes < 400:
                    start = time.perf_counter()
                    assert client.get("/health").status_code == 200
                    worst, probes = max(worst, time.perf_counter() - start), probes + 1
                    time.sleep(0.02)
            sender.join(timeout=120)
    finally:
        llm.shutdown()
    assert probes >= 5, "the prompt was served before /health could be probed"
    assert worst < 1.0, f"/health took {worst:.2f} s while the prompt was tokenized"


def _raw_request(port: int, head: bytes, body_chunks, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: the rest of the body was never read
        data = b""
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got:
                break
            data += got
        return data


def test_a_chunked_body_past_the_limit_is_cut_at_the_limit():
    seen: list[int] = []

    async def app(scope, receive, send):  # never reached by a request: BodyLimit answers first
        seen.append(scope["type"])

    limited = BodyLimit(app, max_body_bytes=MAX_BODY_BYTES)
    with http_server(limited) as base:
        port = int(base.rsplit(":", 1)[1])
        chunk = b"x" * 2**20
        chunks = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(64))  # 64 MiB offered, no length
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        reply = _raw_request(port, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert "http" not in seen


def test_a_body_slower_than_its_content_length_gets_408():
    async def app(scope, receive, send):
        if scope["type"] == "http":
            raise AssertionError("the app must not run")

    limited = BodyLimit(app, read_timeout_s=0.5)
    with http_server(limited) as base:
        port = int(base.rsplit(":", 1)[1])
        head = b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n"
        start = time.perf_counter()
        reply = _raw_request(port, head, [b"{" * 10])
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.perf_counter() - start < BODY_READ_TIMEOUT_S


def test_server_failures_name_a_request_id_and_leak_nothing(hostile_llm):
    class Exploding:  # the engine client raising something unexpected
        tokenizer, max_model_len = hostile_llm.tokenizer, hostile_llm.max_model_len

        def num_unfinished(self) -> int:
            return 0

        def generate(self, *args, **kwargs):
            raise RuntimeError("secret internal state /etc/passwd pid 1234")

    app = build_frontend(OpenAIServing(Exploding(), MODEL))

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            return await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})

    r = asyncio.run(main())
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
    assert "secret" not in r.text and "pid" not in r.text and "Traceback" not in r.text


def test_abandoned_requests_leave_the_engine_serving(url, hostile_llm):
    """A storm of requests dropped mid-flight (client timeouts) while long ones run: afterwards the engine
    loop is alive, every block is back and new requests are served."""
    free = hostile_llm.engine.block_manager.num_free_blocks
    in_flight = _in_flight(url)

    async def storm():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            long = [
                asyncio.create_task(
                    client.post(
                        "/v1/completions",
                        json={"model": MODEL, "prompt": [9] * 100, "max_tokens": 60, "ignore_eos": True},
                    )
                )
                for _ in range(3)
            ]
            dropped = []
            for i in range(30):
                dropped.append(
                    asyncio.create_task(
                        asyncio.wait_for(
                            client.post(
                                "/v1/completions",
                                json={
                                    "model": MODEL,
                                    "prompt": [11 + i] * 80,
                                    "max_tokens": 40,
                                    "stream": i % 2 == 0,
                                },
                            ),
                            timeout=0.02 + 0.01 * (i % 10),
                        )
                    )
                )
                await asyncio.sleep(0.005)
            await asyncio.gather(*dropped, return_exceptions=True)
            return await asyncio.gather(*long)

    finished = asyncio.run(storm())
    assert all(r.status_code == 200 for r in finished)
    wait_idle(hostile_llm, free, timeout=60)
    hostile_llm.check_health()
    deadline = time.monotonic() + 30
    while _in_flight(url) != in_flight:  # every abandoned request ended in the frontend too
        assert time.monotonic() < deadline, f"{_in_flight(url) - in_flight} requests still counted in flight"
        time.sleep(0.1)
    _still_serves(url)


def _in_flight(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = 'ridgeline_requests_in_flight{model="' + MODEL + '"} '
    return float(next(line for line in metrics.splitlines() if line.startswith(pattern)).split()[-1])


def test_unknown_paths_and_methods_get_openai_error_bodies(url):
    missing = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{url}/v1/completions", timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"]["message"].startswith("GET /v1/completions")


HEADER_DEADLINE_SERVER = """
import asyncio, sys, uvicorn
from services.http_limits import arm_header_deadlines
arm_header_deadlines(0.5)
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
"""


def test_a_connection_trickling_its_headers_is_closed(tmp_path):
    """uvicorn has no header timeout: a client sending a header byte now and then held a connection for
    ever. Serve's proxy arms one (services/http_limits.py); here on a uvicorn of its own process."""
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", HEADER_DEADLINE_SERVER, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.05)
        with sock:
            start = time.perf_counter()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: r\r\n")  # never finished
            assert sock.recv(100) == b""  # closed by the server
            assert time.perf_counter() - start < 5
        assert _raw_request(port, b"GET / HTTP/1.1\r\nHost: r\r\n\r\n", []).startswith(b"HTTP/1.1 200")
    finally:
        server.kill()
        server.wait(10)


def test_health_answers_503_once_the_in_process_engine_died(llama):
    llm = AsyncLLM.from_pretrained(llama, num_blocks=32)

    def broken_step():
        raise RuntimeError("device lost")

    async def main():
        transport = httpx.ASGITransport(app=build_frontend(OpenAIServing(llm, MODEL)))
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            before = await client.get("/health")
            llm.engine.step = broken_step
            failed = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
            )
            return before, failed, await client.get("/health")

    try:
        before, failed, after = asyncio.run(main())
    finally:
        llm.shutdown()
    assert before.status_code == 200 and failed.status_code == 503 and after.status_code == 503
    assert "device lost" not in failed.text + after.text
