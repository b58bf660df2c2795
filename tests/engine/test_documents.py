"""Document KV (RAG): documents computed once at positions 0.., reused at any offset with re-rotated keys and a
selective recompute (engine/document_assembly.py)."""

import pytest
import torch

from engine.documents import DocumentRecompute, DocumentSpan
from engine.errors import ParameterError
from engine.llm_engine import LLMEngine
from engine.models.rotary import RotaryEmbedding
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from kernels.kv_rerotate import rerotate_copy_ref
from kernels.rotary import rotary_ref

ALL = DocumentRecompute(first_tokens=10**6)  # every document token recomputed (EPIC-style)
BLEND_ALL = DocumentRecompute(first_tokens=0, ratio=1.0)  # ... chosen at layer 1 (CacheBlend-style)
REUSE = DocumentRecompute(first_tokens=0)  # nothing recomputed


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine.from_pretrained(tiny_model("llama"), device="cpu", dtype="float32", num_blocks=256)


def rag_prompt(order=(0, 1, 2), lengths=(37, 50, 29), system=11, question=9):
    """A system prompt, documents (fixed token runs, in `order`) and a question -> (ids, spans, documents)."""
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(3, 380, (n,), generator=g).tolist() for n in lengths]
    ids = torch.randint(3, 380, (system,), generator=g).tolist()
    spans = []
    for i in order:
        spans.append(DocumentSpan(len(ids), len(docs[i])))
        ids += docs[i]
    ids += torch.randint(3, 380, (question,), generator=g).tolist()
    return ids, tuple(spans), docs


def generate(engine, rid, ids, spans=(), recompute=None, salt=None, max_tokens=6):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5)
    request = EngineRequest(rid, ids, params, documents=spans, document_recompute=recompute, cache_salt=salt)
    out = engine.run([request])[0].outputs[0]
    return out.token_ids, out.logprobs


def assert_same(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1], strict=True):
        assert x.keys() == y.keys()
        assert all(abs(x[t] - y[t]) < 1e-5 for t in x)


def test_rerotation_equals_rotary_at_the_shifted_position():
    """Keys rotated at j, turned by p, equal keys rotated at j + p (llama3 scaling; bf16 and FP8 pools)."""
    D, H, L, bs = 64, 2, 3, 4
    rope = RotaryEmbedding(
        D,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(10, L, 2, H, D, generator=g)  # keys and values before rotary, 10 tokens
    pos, offset = torch.arange(10), 523
    cos, sin = rope.cos_sin(pos)
    pool = torch.zeros(8, L, 2, bs, H, D)
    src = torch.arange(10) + 4  # blocks 1..3
    k = rotary_ref(raw[:, :, 0].reshape(10, L * H, D), cos, sin).reshape(10, L, H, D)
    pool[src // bs, :, 0, src % bs], pool[src // bs, :, 1, src % bs] = k, raw[:, :, 1]
    dst = torch.tensor([31, 30, 29, 28, 27, 26, 25, 24, 23, 22])  # other slots, another order
    c, s = rope.cos_sin(torch.full((10,), offset))
    rerotate_copy_ref(pool, src, dst, c, s)
    # as exact as rotary at j + p itself: both carry fp32's rounding of angles near 500 rad (~3e-5)
    direct = rotary_ref(raw[:, :, 0].reshape(10, L * H, D), *rope.cos_sin(pos + offset)).reshape(10, L, H, D)
    angles = (pos + offset).double()[:, None] * rope.inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    exact = rotary_ref(raw[:, :, 0].double().reshape(10, L * H, D), emb.cos(), emb.sin()).reshape(10, L, H, D)
    turned = pool[dst // bs, :, 0, dst % bs]
    assert (turned.double() - exact).abs().max() <= 1.5 * (direct.double() - exact).abs().max() + 1e-6
    assert torch.equal(pool[dst // bs, :, 1, dst % bs], raw[:, :, 1])  # values as they were
    # an FP8 pool: dequantized, turned, quantized with the same scales
    scales = torch.full((L, 2, H), 0.05)
    fp8 = (pool / 0.05).to(torch.float8_e4m3fn)
    rerotate_copy_ref(fp8, dst, src, *rope.cos_sin(torch.full((10,), -offset)), kv_scales=scales)
    back = fp8[src // bs, :, 0, src % bs].float() * 0.05
    torch.testing.assert_close(back, k, atol=0.1 * k.abs().max().item(), rtol=0.1)
    with pytest.raises(ValueError, match="cos, sin"):
        rerotate_copy_ref(pool, src, dst, c[:3], s[:3])


@pytest.mark.parametrize("recompute", [ALL, BLEND_ALL], ids=["first-tokens", "ratio"])
def test_full_recompute_equals_full_prefill(engine, recompute):
    ids, spans, _ = rag_prompt()
    full = generate(engine, "full", ids, salt="a")
    lookups = engine.stats.document_hits + engine.stats.document_misses
    assembled = generate(engine, "assembled", ids, spans, recompute, salt="b")
    assert_same(assembled, full)
    # every token recomputed from layer 0 on: the cache is not even looked up (CacheBlend reads it to choose)
    assert engine.stats.document_hits + engine.stats.document_misses - lookups == (
        0 if recompute is ALL else 3
    )
    # one document at the prompt's start, nothing recomputed: its canonical KV is the prompt's own
    ids0, spans0 = ids[spans[0].start :], (DocumentSpan(0, spans[0].length),)
    assert_same(
        generate(engine, "reuse0", ids0, spans0, REUSE, salt="c"), generate(engine, "f0", ids0, salt="c")
    )


def test_documents_are_reused_at_any_position_and_order(engine):
    stats = engine.stats
    ids, spans, _ = rag_prompt((0, 1, 2))
    hits, misses = stats.document_hits, stats.document_misses
    first = generate(engine, "o1", ids, spans, REUSE, salt="order")
    assert (stats.document_hits - hits, stats.document_misses - misses) == (0, 3)
    ids2, spans2, _ = rag_prompt((2, 0, 1), system=5)
    reused, recomputed = stats.document_tokens_reused, stats.document_tokens_recomputed
    generate(engine, "o2", ids2, spans2, DocumentRecompute(first_tokens=4), salt="order")
    assert (stats.document_hits - hits, stats.document_misses - misses) == (3, 3)
    assert stats.document_tokens_recomputed - recomputed == 12
    assert stats.document_tokens_reused - reused == 116 - 12
    ids3, spans3, _ = rag_prompt((1, 2, 0), system=7)
    out = engine.run(
        [EngineRequest("o3", ids3, SamplingParams(max_tokens=1), documents=spans3, cache_salt="order")]
    )
    assert out[0].num_cached_tokens == 116 - 3 * 16  # usage: the reused tokens count as cached
    # the reuse is approximate: the assembled prompt's answer differs from a full prefill's somewhere
    full = generate(engine, "o1-full", ids, salt="order-full")
    assert first[1] != full[1]


def test_tenants_never_share_documents(engine):
    stats = engine.stats
    ids, spans, _ = rag_prompt(lengths=(40, 41, 42))
    misses = stats.document_misses
    generate(engine, "t1", ids, spans, REUSE, salt="tenant-a")
    generate(engine, "t2", ids, spans, REUSE, salt="tenant-b")
    assert stats.document_misses - misses == 6
    hits = stats.document_hits
    generate(engine, "t3", list(reversed(ids)), (), None, salt="tenant-a")  # no documents: nothing looked up
    ids2, spans2, _ = rag_prompt((1, 0, 2), lengths=(40, 41, 42))
    generate(engine, "t4", ids2, spans2, REUSE, salt="tenant-a")
    assert stats.document_hits - hits == 3


def test_assembled_blocks_hit_only_the_same_assembly(engine):
    """A repeat of an assembled prompt hits its blocks (same output); the same tokens without documents or
    with another selection do not: their KV would differ."""
    ids, spans, _ = rag_prompt(lengths=(48, 48, 48))
    bm, sched = engine.block_manager, engine.scheduler
    first = generate(engine, "p1", ids, spans, REUSE, salt="p")
    before = sched.prefix_hit_blocks
    assert_same(generate(engine, "p2", ids, spans, REUSE, salt="p"), first)
    assert sched.prefix_hit_blocks - before == (len(ids) - 1) // bm.block_size
    before = sched.prefix_hit_blocks
    full = generate(engine, "p3", ids, salt="p")
    assert sched.prefix_hit_blocks - before == spans[0].start // bm.block_size  # the system prompt only
    assert full != first
    before = sched.prefix_hit_blocks
    generate(engine, "p4", ids, spans, DocumentRecompute(first_tokens=2), salt="p")
    assert sched.prefix_hit_blocks - before == spans[0].start // bm.block_size


def test_documents_stored_by_id_are_pinned_until_removed(tiny_model):
    engine = LLMEngine.from_pretrained(
        tiny_model("llama"), device="cpu", dtype="float32", num_blocks=64, max_document_blocks=12
    )
    bm = engine.block_manager
    ids, spans, docs = rag_prompt(lengths=(40, 40, 40))  # 3 blocks each
    pinned = engine.add_document(docs[0], cache_salt="s")
    assert pinned.pinned and pinned.num_tokens == 40 and bm.num_free_blocks == 61
    assert engine.add_document(docs[0], cache_salt="s") is pinned  # found, not computed again
    misses = engine.stats.document_misses
    generate(engine, "d1", ids, spans, REUSE, salt="s")
    assert engine.stats.document_misses - misses == 2  # the pinned one was found
    # a prompt whose documents do not all fit (15 blocks) keeps the pinned one and falls back
    ids2, spans2, _ = rag_prompt(lengths=(40,) * 5, order=(0, 1, 2, 3, 4))
    fallbacks = engine.stats.document_fallbacks
    out = generate(engine, "d2", ids2, spans2, REUSE, salt="s")
    assert engine.stats.document_fallbacks - fallbacks == 1
    assert out == generate(engine, "d2-full", ids2, salt="s2")  # computed as a plain prompt
    assert pinned.key in engine.documents.cache.entries
    assert engine.documents.cache.num_blocks == 9  # what it held before: the new one was dropped
    assert bm.num_free_blocks == 64 - 9
    # a document that needs room evicts unpinned ones, least recently used first
    engine.add_document(list(range(3, 3 + 16 * 7)), cache_salt="s", pinned=False)
    assert len(engine.documents.cache) == 2 and engine.documents.cache.evictions == 2
    assert engine.remove_document(pinned.key) and not engine.remove_document(pinned.key)
    for key in list(engine.documents.cache.entries):
        engine.remove_document(key)
    assert bm.num_free_blocks == 64  # nothing leaked
    with pytest.raises(ParameterError, match="documents: a document holds"):
        engine.add_document(list(range(3, 3 + engine.max_model_len)))
    with pytest.raises(ParameterError, match="no room"):
        engine.add_document(list(range(3, 3 + 16 * 13)))


def test_bad_documents_are_refused(engine, tiny_model):
    ids, spans, _ = rag_prompt()
    bad = [
        (DocumentSpan(5, 10), DocumentSpan(12, 4)),  # overlapping
        (DocumentSpan(0, len(ids) + 1),),  # past the prompt
        (DocumentSpan(3, 0),),  # empty
    ]
    for spans_ in bad:
        with pytest.raises(ParameterError, match="^documents: document"):
            engine.add_request(EngineRequest("bad", ids, documents=spans_))
    with pytest.raises(ParameterError, match="select_layer"):
        engine.add_request(
            EngineRequest(
                "bad", ids, documents=spans, document_recompute=DocumentRecompute(ratio=0.1, select_layer=9)
            )
        )
    with pytest.raises(ParameterError, match="ratio"):
        DocumentRecompute(ratio=1.5)
    assert not engine.has_unfinished_requests()
    aging = LLMEngine.from_pretrained(
        tiny_model("llama"),
        device="cpu",
        dtype="float32",
        num_blocks=64,
        kv_age_policy={"sinks": 16, "window": 32, "bits": 4},
    )
    with pytest.raises(ParameterError, match="kv_age_policy"):
        aging.add_request(EngineRequest("bad", ids, documents=spans))
    # handed-over KV with documents is not assembled there: only its reservation is checked
    with pytest.raises(ParameterError, match="reserve_kv first"):
        aging.add_request(EngineRequest("handed", ids, kv_computed_tokens=len(ids) - 1, documents=spans))


def test_disaggregated_handoff_of_an_assembled_prompt(tiny_model):
    """A prefill engine assembles the documents and holds the KV; a decode engine reserves with the same
    documents (its prefix hits only KV assembled alike), takes the blocks and continues: the output equals
    one engine's, and the decode engine's cache never serves those blocks to a plain prompt."""
    prefill, decode, single = (
        LLMEngine.from_pretrained(tiny_model("llama"), device="cpu", dtype="float32", num_blocks=64)
        for _ in range(3)
    )
    ids, spans, _ = rag_prompt(lengths=(40, 33, 35))
    rc = DocumentRecompute(first_tokens=3)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    want = generate(single, "one", ids, spans, rc, max_tokens=6)[0]

    prefill.add_request(
        EngineRequest(
            "r",
            ids,
            SamplingParams(max_tokens=1, temperature=0.0),
            hold_kv=True,
            documents=spans,
            document_recompute=rc,
        )
    )
    done = []
    while prefill.has_unfinished_requests():
        done += [o for o in prefill.step() if o.finished]
    (first,) = done
    src = prefill.kv_handoff.held("r")
    reserved = decode.kv_handoff.reserve("r", len(ids), ids, documents=spans, recompute=rc)
    assert reserved.num_cached_blocks == 0
    for s, d in zip(src, reserved.block_ids, strict=True):
        decode.kv_pool[d] = prefill.kv_pool[s]
    prefill.kv_handoff.release("r")
    decode.add_request(
        EngineRequest(
            "r",
            ids,
            params,
            output_token_ids=first.outputs[0].token_ids,
            kv_computed_tokens=len(ids),
            documents=spans,
            document_recompute=rc,
        )
    )
    got = []
    while decode.has_unfinished_requests():
        got += [o for o in decode.step() if o.finished]
    assert got[0].outputs[0].token_ids == want
    # the handed-over blocks are cached under the assembly's hashes: a second handoff of the same assembly
    # finds them, a plain prompt of the same tokens does not
    again = decode.kv_handoff.reserve("again", len(ids), ids, documents=spans, recompute=rc)
    assert again.num_cached_blocks == len(ids) // 16
    decode.kv_handoff.free_reserved("again")
    plain = decode.kv_handoff.reserve("plain", len(ids), ids)
    assert plain.num_cached_blocks == spans[0].start // 16
    decode.kv_handoff.free_reserved("plain")
    assert prefill.block_manager.num_free_blocks == 64 - prefill.documents.cache.num_blocks
    assert decode.block_manager.num_free_blocks == 64


def test_triton_backend_assembles_as_the_reference(engine, tiny_model):
    """The varlen kernel at given query positions (interpreted on the CPU) gives the torch reference's
    output for a CacheBlend-style and an EPIC-style assembly."""
    triton = LLMEngine.from_pretrained(
        tiny_model("llama"), device="cpu", dtype="float32", num_blocks=256, attention_backend="triton"
    )
    ids, spans, _ = rag_prompt(lengths=(30, 45, 26))
    for i, rc in enumerate([DocumentRecompute(first_tokens=0, ratio=0.2), DocumentRecompute(first_tokens=5)]):
        a = generate(engine, f"torch-{i}", ids, spans, rc, salt=f"backends-{i}", max_tokens=3)
        b = generate(triton, f"triton-{i}", ids, spans, rc, salt=f"backends-{i}", max_tokens=3)
        assert a[0] == b[0]
        assert all(abs(a[1][0][t] - b[1][0][t]) < 1e-4 for t in a[1][0])


def test_preempted_assembled_requests_finish_as_if_alone(tiny_model):
    """Two assembled prompts decoding in a pool too small for both: one is preempted and assembled again
    when it comes back; each output equals its run alone, and every block comes back."""

    def engine_():
        return LLMEngine.from_pretrained(
            tiny_model("llama"), device="cpu", dtype="float32", num_blocks=26, max_document_blocks=8
        )

    ids1, spans1, _ = rag_prompt(lengths=(30, 31, 29))
    ids2, spans2, _ = rag_prompt((2, 1, 0), lengths=(30, 31, 29), system=4)
    rc = DocumentRecompute(first_tokens=2)
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    requests = [(ids1, spans1), (ids2, spans2)]

    def run(engine, only=None):
        picked = [r for i, r in enumerate(requests) if only in (None, i)]
        batch = [
            EngineRequest(f"r{i}", ids, params, documents=s, document_recompute=rc)
            for i, (ids, s) in enumerate(picked)
        ]
        return [out.outputs[0].token_ids for out in engine.run(batch)]

    alone = [run(engine_(), i)[0] for i in range(2)]
    engine = engine_()
    outs = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert outs == alone
    assert engine.block_manager.num_free_blocks == 26 - engine.documents.cache.num_blocks


def test_unpinned_documents_give_their_blocks_to_requests(tiny_model):
    """A request that needs the blocks the document cache holds gets them (unpinned documents go first,
    least recently used), and a failed reservation evicts nothing."""
    engine = LLMEngine.from_pretrained(tiny_model("llama"), device="cpu", dtype="float32", num_blocks=32)
    cache = engine.documents.cache
    assert cache.max_blocks == 8
    engine.add_document(list(range(3, 3 + 16 * 8)), pinned=False)
    assert cache.num_blocks == 8 and engine.block_manager.num_free_blocks == 24
    prompt = [(7 * t) % 300 + 5 for t in range(28 * 16)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    (out,) = engine.run([EngineRequest("big", prompt, params)])
    fresh = LLMEngine.from_pretrained(tiny_model("llama"), device="cpu", dtype="float32", num_blocks=32)
    assert (
        out.outputs[0].token_ids == fresh.run([EngineRequest("big", prompt, params)])[0].outputs[0].token_ids
    )
    assert len(cache) == 0 and cache.evictions == 1 and engine.scheduler.num_preemptions == 0
    # four small documents cached, then one that cannot fit even with them gone: they stay
    for d in range(4):
        engine.add_document([d + 3] * 16, pinned=False)
    assert cache.reserve(b"k" * 16, 16 * 9) is None and len(cache) == 4
    # a pinned document's blocks are not the pool's: a request needing them is refused up front
    for key in list(cache.entries):
        engine.remove_document(key)
    engine.add_document(list(range(3, 3 + 16 * 8)))
    with pytest.raises(ParameterError, match="8 held by stored documents"):
        engine.add_request(EngineRequest("too-big", prompt, params))


def test_a_later_turn_with_more_documents_still_hits_the_earlier_blocks(engine):
    """Without a CacheBlend selection a block's hash counts only the documents that start before its end, so a
    conversation that appends a document keeps its earlier assembled blocks."""
    ids, spans, docs = rag_prompt(lengths=(40, 40, 40))
    generate(engine, "turn1", ids, spans, REUSE, salt="turns")
    ids2 = ids + [11, 12, 13] + docs[0]
    spans2 = (*spans, DocumentSpan(len(ids) + 3, len(docs[0])))
    ids2 += [9, 9, 9]
    before = engine.scheduler.prefix_hit_blocks
    generate(engine, "turn2", ids2, spans2, REUSE, salt="turns")
    assert engine.scheduler.prefix_hit_blocks - before == len(ids) // 16
    blend = DocumentRecompute(first_tokens=0, ratio=0.1)
    generate(engine, "turn1-blend", ids, spans, blend, salt="turns-blend")
    before = engine.scheduler.prefix_hit_blocks
    generate(engine, "turn2-blend", ids2, spans2, blend, salt="turns-blend")
    # CacheBlend chose its tokens over all the documents: only the blocks before the first one hit
    assert engine.scheduler.prefix_hit_blocks - before == spans[0].start // 16
