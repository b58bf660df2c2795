"""The rag-docs workload of `ridgeline bench`: documents drawn from a seeded pool in varying orders, sent in
the completions `documents` field (or inlined with --document-cache off), against a real in-process frontend
on 127.0.0.1 whose engine then finds them in its document cache."""

import asyncio

import pytest

from benchmarks.loadgen import cli, workloads
from benchmarks.loadgen.client import Target, request_body
from benchmarks.loadgen.runner import Load, Run, run_load
from benchmarks.local_http import serve_in_thread


def _rag_docs(n: int = 40, seed: int = 3, **kw) -> list[workloads.RequestSpec]:
    args = {"docs_per_request": 4, "doc_pool": 8, "doc_len": "20", "question_len": "5", "output_len": "4"}
    return list(workloads.rag_docs_workload(n, seed, **(args | kw)))


def test_rag_docs_draws_k_pool_documents_in_varying_orders_from_the_seed():
    specs = _rag_docs()
    assert [(s.prompt, s.documents, s.max_tokens) for s in specs] == [
        (s.prompt, s.documents, s.max_tokens) for s in _rag_docs()
    ]
    assert [s.documents for s in specs] != [s.documents for s in _rag_docs(seed=4)]
    pool: dict[int, str] = {}
    for s in specs:
        assert s.documents[0] == workloads.RAG_SYSTEM and len(s.documents) == 5
        picked = s.meta["documents"]
        assert len(set(picked)) == 4 and all(0 <= i < 8 for i in picked)  # without replacement
        for i, doc in zip(picked, s.documents[1:], strict=True):
            assert doc.startswith(f"Document {i}: ") and pool.setdefault(i, doc) == doc  # the pool is fixed
            assert len(doc.split()) == 2 + 20
        assert s.prompt.startswith("Question: ") and s.prompt.endswith("\nAnswer:")
    assert len(pool) == 8
    # each document shows up at several positions, and the same pair of documents in both orders
    assert all(
        len({s.meta["documents"].index(i) for s in specs if i in s.meta["documents"]}) >= 3 for i in pool
    )
    orders = {tuple(s.meta["documents"]) for s in specs}
    assert len(orders) == len(specs) or len(orders) > 30
    pairs = {
        (a, b) for s in specs for a, b in zip(s.meta["documents"], s.meta["documents"][1:], strict=False)
    }
    assert any((b, a) in pairs for a, b in pairs)
    for bad, field in (({"docs_per_request": 9}, "docs_per_request"), ({"doc_pool": 0}, "doc_pool")):
        with pytest.raises(ValueError, match=field):
            _rag_docs(1, **bad)


def test_document_cache_off_inlines_the_same_text():
    on, off = _rag_docs(10), _rag_docs(10, document_cache=False)
    for a, b in zip(on, off, strict=True):
        assert b.documents is None and b.prompt == "".join(a.documents) + a.prompt
        assert (b.max_tokens, b.meta) == (a.max_tokens, a.meta)
    parser = cli.build_parser()
    base = ["--url", "http://x", "--workload", "rag-docs", "--doc-len", "20", "--doc-pool", "8"]
    from_cli = next(cli._specs(parser.parse_args(base + ["--document-cache", "off", "--seed", "3"]), 3))
    assert from_cli.documents is None and from_cli.prompt.startswith(workloads.RAG_SYSTEM + "Document ")
    cached = next(cli._specs(parser.parse_args(base + ["--docs-per-request", "2"]), 0))
    assert len(cached.documents) == 3 and cached.prompt.startswith("Question: ")


def test_request_body_carries_the_documents():
    target = Target("http://x", "m")
    body = request_body(target, prompt="Question?", max_tokens=4, documents=["a\n", "b\n"])
    assert body["documents"] == [{"text": "a\n"}, {"text": "b\n"}] and body["prompt"] == "Question?"
    assert "documents" not in request_body(target, prompt="p", max_tokens=4)
    assert "documents" not in request_body(target, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


@pytest.fixture(scope="module")
def served(llama):
    from engine.async_llm import AsyncLLM
    from services.frontend import build_frontend
    from services.openai_serving import OpenAIServing

    llm = AsyncLLM.from_pretrained(llama, num_blocks=512, max_model_len=512)
    try:
        with serve_in_thread(build_frontend(OpenAIServing(llm, "m"))) as url:
            yield url, llm
    finally:
        llm.shutdown()


def _load(url: str, document_cache: bool) -> Run:
    specs = workloads.rag_docs_workload(
        None, 5, 3, 5, doc_len="12", question_len="4", output_len="3", document_cache=document_cache
    )
    run = Run()
    asyncio.run(run_load(Target(url, "m"), Load(concurrency=2, requests=8), specs, run))
    return run


def test_rag_docs_against_a_server_reuses_documents_only_when_sent_as_documents(served):
    url, llm = served
    stats = llm.engine.stats
    hits, computed = stats.document_hits, stats.prompt_tokens_computed
    on = _load(url, True)
    assert all(r.ok for r in on.results), [r.error_detail for r in on.results]
    # 8 requests x (the system line + 3 of 5 documents): each pool document is computed once, then found in
    # the document cache, unless a prefix hit already covers it (requests that begin with the same documents)
    assert stats.document_hits - hits >= 16
    hits, computed_on = stats.document_hits, stats.prompt_tokens_computed - computed
    off = _load(url, False)
    assert all(r.ok for r in off.results) and stats.document_hits == hits
    # documents of ~15 tokens under the default recompute of each one's first 16: few tokens reused, but some
    assert computed_on < stats.prompt_tokens_computed - computed - computed_on
    # the same text either way: the prompts' token counts differ at most at the pieces' seams
    assert abs(sum(r.prompt_tokens for r in on.results) - sum(r.prompt_tokens for r in off.results)) <= 8 * 6
