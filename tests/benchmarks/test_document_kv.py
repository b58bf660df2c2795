"""benchmarks/document_kv.py on two small RAG prompts with the reference model: every row has its keys, and
100% recompute equals a full prefill."""

import json

from benchmarks.document_kv import run

KEYS = {
    "device",
    "model",
    "documents",
    "prompt_tokens",
    "selection",
    "first_tokens",
    "ratio",
    "recompute_fraction",
    "ttft_s",
    "full_prefill_ttft_s",
    "ttft_speedup",
    "kl",
    "top1_agreement",
    "answer_accuracy",
}


def test_document_kv_benchmark(tmp_path):
    path, rows = run(2, tmp_path, document_counts=(4,), prompt_tokens=300)
    record = json.loads(path.read_text())
    assert path == tmp_path / "document_kv.json" and record["rows"] == rows
    assert "1024" in record["note"] and record["commit"]
    assert all(row.keys() >= KEYS for row in rows)
    assert {r["selection"] for r in rows} == {
        "full",
        "prefix_cache",
        "reuse",
        "epic",
        "cacheblend",
        "full_recompute",
    }
    assert all(r["documents"] == 4 and r["prompt_tokens"] < 300 for r in rows)
    (full,) = [r for r in rows if r["selection"] == "full_recompute"]
    assert full["kl"] < 1e-6 and full["top1_agreement"] == 1.0 and full["recompute_fraction"] == 1.0
    (reuse,) = [r for r in rows if r["selection"] == "reuse"]
    assert reuse["recompute_fraction"] == 0.0 and reuse["kl"] > 0
    blend = [r for r in rows if r["selection"] == "cacheblend"]
    assert [r["ratio"] for r in blend] == [0.05, 0.15, 0.3]
    assert all(abs(r["recompute_fraction"] - r["ratio"]) < 0.02 for r in blend)
    assert all(r["ttft_s"] > 0 and r["ttft_speedup"] > 0 for r in rows)
