"""Pools in different KV formats serving one app: a bf16 prefill pool hands its KV over NIXL to an fp8 decode
pool, which converts the blocks as they land (no recompute), and answers what an aggregated fp8 engine
answers, token for token. Pools with a KV age policy hand aged blocks over coded, as they are."""

import httpx
import pytest
from ray_helpers import MODEL, POOL, app_config, pool_stats, wait_pools_idle

from engine import LLM, SamplingParams

pytestmark = pytest.mark.ray

PROMPTS = [
    "A much longer prompt that spans more than one KV block of sixteen tokens, so the handoff moves and "
    "converts several blocks",
    "The quick brown fox jumps over the lazy dog, then",
]


def greedy_token_ids(url: str, prompt: str | list[int]) -> list[int]:
    """The app's 12 greedy tokens for a prompt (a 200 is asserted)."""
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def app(deploy, llama):
    bf16 = {**POOL, "weight_dtype": "bfloat16"}
    return deploy(
        "pdfp8",
        **app_config(llama, kv_transport="nixl", prefill=bf16, decode={**bf16, "kv_dtype": "fp8"}),
    )


def test_bf16_prefill_to_fp8_decode_converts_in_transit(app, llama):
    aggregated = LLM(llama, dtype="bfloat16", kv_cache_dtype="fp8", num_blocks=128, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # one at a time, as they are served: a batched bf16 step may round a near tie the other way
    want = [aggregated.generate([p], params)[0] for p in PROMPTS]
    for prompt, ref in zip(PROMPTS, want, strict=True):
        assert greedy_token_ids(app, prompt) == ref.outputs[0].token_ids
    (decode,) = pool_stats("pdfp8", "DecodeWorker", 1).values()
    assert decode["kv_pulls"] == len(PROMPTS) and decode["kv_recomputes"] == 0
    assert decode["kv_pull_failures"] == 0 and decode["kv_blocks_converted"] >= 3
    assert decode["kv_format"].startswith("fp8:")  # what the KV-aware router hashes with
    wait_pools_idle("pdfp8", {"PrefillWorker": 1, "DecodeWorker": 1})  # nothing leaked on either side


def test_aging_pools_hand_coded_blocks_over_as_they_are(deploy, llama):
    """Prefill and decode pools with one KV age policy: the prefill pool codes a long prompt's old blocks
    while it computes it in chunks, NIXL carries them coded into the decode pool's coded pool (nothing
    converted, nothing recomputed), and the answer is an aggregated aging engine's, token for token."""
    policy = {"bits": 4, "sinks": 16, "window": 16}
    engine = {**POOL["engine"], "max_num_batched_tokens": 32}
    pool = {**POOL, "engine": engine, "kv_age_policy": policy}
    url = deploy("pdaged", **app_config(llama, kv_transport="nixl", prefill=pool, decode=pool))
    from engine.kv.age_policy import KVAgePolicy

    prompt = [5 + i % 70 for i in range(100)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = LLM(llama, **engine, kv_age_policy=KVAgePolicy(**policy)).generate([prompt], params)[0]
    assert greedy_token_ids(url, prompt) == want.outputs[0].token_ids
    (decode,) = pool_stats("pdaged", "DecodeWorker", 1).values()
    assert decode["kv_pulls"] == 1 and decode["kv_recomputes"] == 0 and decode["kv_blocks_converted"] == 0
    (prefill,) = pool_stats("pdaged", "PrefillWorker", 1).values()
    assert prefill["kv_blocks_aged"] >= 2, prefill  # the blocks handed over coded
    wait_pools_idle("pdaged", {"PrefillWorker": 1, "DecodeWorker": 1})
