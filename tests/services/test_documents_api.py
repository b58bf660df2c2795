"""RAG documents over HTTP: /v1/documents, a `documents` field on completions and chat, document parts in chat
messages (in-process engine, real HTTP server on 127.0.0.1, the official openai client)."""

import httpx
import openai
import pytest
from serving_helpers import MODEL

DOC_A = "def area(radius):\n    return 3.14159 * radius * radius\n"
DOC_B = "class Stack:\n    def __init__(self):\n        self.items = []\n"
ALL = {"first_tokens": 10**6}  # every document token recomputed: a full prefill's output


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def store(server, text, salt=None):
    r = httpx.post(f"{server}/v1/documents", json={"text": text, "cache_salt": salt}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def complete(client, prompt, **extra):
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, **extra}
    )
    return out.choices[0].text


def test_stored_documents_are_reused_by_id_or_text(server, client, async_llm):
    stats = async_llm.engine.stats
    doc = store(server, DOC_A)
    assert doc["object"] == "document" and doc["id"].startswith("doc-") and doc["tokens"] > 0
    assert store(server, DOC_A)["id"] == doc["id"]  # content-addressed
    hits = stats.document_hits
    by_id = complete(client, "# area of a circle", documents=[{"id": doc["id"]}, {"text": DOC_B}])
    by_text = complete(client, "# area of a circle", documents=[{"text": DOC_A}, {"text": DOC_B}])
    # the first finds A (stored) and computes B; the second repeats its tokens: a prefix hit up to B's last
    # block, whose rest comes from the document cache
    assert by_id == by_text and stats.document_hits - hits == 2
    ids = [d["id"] for d in httpx.get(f"{server}/v1/documents", timeout=30).json()["data"]]
    assert doc["id"] in ids


def test_full_recompute_over_http_equals_the_plain_prompt(server, client, async_llm):
    tok = async_llm.tokenizer
    tokens = tok.encode("", add_special_tokens=True) + tok.encode(DOC_A, add_special_tokens=False)
    tokens += tok.encode(DOC_B, add_special_tokens=False) + tok.encode("# stack", add_special_tokens=False)
    plain = complete(client, tokens)
    assembled = complete(
        client, "# stack", documents=[{"text": DOC_A}, {"text": DOC_B}], document_recompute=ALL
    )
    assert assembled == plain


def test_chat_document_parts_and_the_documents_field(server, client):
    doc = store(server, DOC_B)

    def chat(content, **extra):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Answer."}, {"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True, **extra},
        )
        return out.choices[0].message.content

    parts = [{"type": "document", "id": doc["id"]}, {"type": "text", "text": "What is Stack?"}]
    by_part = chat(parts)
    assert chat("What is Stack?", documents=[{"text": DOC_B}]) == by_part
    assert chat([{"type": "document", "text": DOC_B}, {"type": "text", "text": "What is Stack?"}]) == by_part


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "documents": [{"id": "doc-0123"}]}, "documents"),
        ({"prompt": "x", "documents": [{"id": "doc-1", "text": "y"}]}, "documents.0.id"),
        ({"prompt": "x", "documents": []}, "documents"),
        ({"prompt": "x", "documents": [{"text": "y"}], "echo": True}, "echo"),
        (
            {"prompt": "x", "documents": [{"text": "y"}], "document_recompute": {"ratio": 2}},
            "document_recompute.ratio",
        ),
        ({"prompt": "x", "documents": [{"text": "def f(): pass\n" * 200}]}, "documents"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages.0.content.0.id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0.type"),
    ],
)
def test_bad_documents_get_400s(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(f"{server}{path}", json={"model": MODEL, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_documents_are_per_tenant_and_deleted(server, client, async_llm):
    doc = store(server, DOC_A + "# tenant a\n", salt="tenant-a")
    r = httpx.post(
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "x", "documents": [{"id": doc["id"]}], "cache_salt": "tenant-b"},
        timeout=30,
    )
    assert r.status_code == 400 and "unknown id" in r.json()["error"]["message"]
    listed = httpx.get(f"{server}/v1/documents", params={"cache_salt": "tenant-b"}, timeout=30).json()["data"]
    assert doc["id"] not in [d["id"] for d in listed]
    assert complete(client, "x", documents=[{"id": doc["id"]}], cache_salt="tenant-a")
    pinned = len(async_llm.engine.documents.cache)
    r = httpx.delete(f"{server}/v1/documents/{doc['id']}", params={"cache_salt": "tenant-a"}, timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert len(async_llm.engine.documents.cache) == pinned - 1
    r = httpx.delete(f"{server}/v1/documents/{doc['id']}", params={"cache_salt": "tenant-a"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    too_long = httpx.post(f"{server}/v1/documents", json={"text": "def f(): pass\n" * 200}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "documents"


def test_token_prompts_keep_their_own_start_token_first(client, async_llm):
    tok = async_llm.tokenizer
    start = tok.encode("", add_special_tokens=True)
    question = tok.encode("# stack", add_special_tokens=False)
    plain = start + tok.encode(DOC_B, add_special_tokens=False) + question
    assembled = complete(client, start + question, documents=[{"text": DOC_B}], document_recompute=ALL)
    assert assembled == complete(client, plain)


def test_the_store_refuses_past_its_cap_rather_than_forget_pinned_documents():
    from engine.errors import ParameterError
    from services.documents import DocumentStore

    store = DocumentStore(max_documents=2)
    a, b = store.add([5, 6], None), store.add([7], "tenant")
    with pytest.raises(ParameterError, match="2 documents are stored already"):
        store.add([8], None)
    assert store.add([5, 6], None) is a and store.remove(b.id, "tenant") is b
    assert store.add([8], None).token_ids == [8]
