"""Document KV (RAG) time to first token on a GPU, Llama-3-8B shape (random bf16 weights: times only; quality is
benchmarks/document_kv.py's, on the trained reference model).

    python -m benchmarks.document_kv_gpu [--lengths 4096 8192] [--documents 4 8 16] [--out DIR]

Each prompt: a 64-token system prompt, k documents of equal length (random token ids) in random order, and
a 64-token question. Per (prompt length, k), the median over --repeats prompts of `LLMEngine.run` with
max_tokens=1 (synchronized), for:
- full prefill (a fresh cache salt: nothing cached);
- prefix caching (the same documents in another order ran first: only the system prompt's blocks hit);
- documents from the document cache (the documents ran once before, in another order), per selection:
  reuse (nothing recomputed), EPIC first 16 tokens, CacheBlend 15% at layer 1;
against floors from rates measured in the same run: the prompt's matmul and causal attention FLOPs at the
measured bf16 GEMM rate (full prefill), and for the assembled prompt the recomputed tokens' FLOPs (counted at
the prompt's middle position for attention; CacheBlend's selection layers over every token not counted, so a
lower bound) plus the reused KV's bytes (read and written once by the re-rotation copy) at the measured
device copy bandwidth.

On the CPU (`--device cpu --model-dir DIR`) it runs the same on a local checkpoint, e.g. the reference target
with max_position_embeddings raised to 8320 in a copy of its config.json: TTFT only (positions past the
1024 it declares, 256 it trained on, give meaningless text), and its matmul rate is measured in bf16 while
the CPU engine runs float32.

Checks first, on this GPU: the Triton re-rotation copy equals its torch reference in bf16, and an assembled
prompt with every document token recomputed gives full prefill's first token and logprobs (bf16: close).
Writes document_kv_gpu.json (rows: device, model, documents, prompt_tokens, selection, recompute_fraction,
ttft_s, full_prefill_ttft_s, ttft_speedup, floor_s, ...).
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import LLAMA3_8B, write_model_dir
from benchmarks.results_io import device_name, write_result
from engine.documents import DocumentRecompute, DocumentSpan
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from kernels.kv_rerotate import rerotate_copy, rerotate_copy_ref

SYSTEM, QUESTION = 64, 64
SELECTIONS = {
    "reuse": DocumentRecompute(first_tokens=0),
    "epic": DocumentRecompute(first_tokens=16),
    "cacheblend": DocumentRecompute(first_tokens=0, ratio=0.15, select_layer=1),
}


def measure_floors(device: torch.device) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device copy bytes/s), measured now (small shapes on a CPU smoke run)."""
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device=device, dtype=torch.bfloat16)
    x = torch.empty(2**28 if device.type == "cuda" else 2**24, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)

    def rate(fn, work: float) -> float:
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        sync(device)
        return work * 10 / (time.perf_counter() - t0)

    return rate(lambda: a @ b, 2 * m * 4096 * 14336), rate(lambda: y.copy_(x), 2 * x.numel())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt(rng: random.Random, docs: list[list[int]], order: list[int], vocab: int):
    ids = [rng.randrange(2, vocab) for _ in range(SYSTEM)]
    spans = []
    for d in order:
        spans.append(DocumentSpan(len(ids), len(docs[d])))
        ids += docs[d]
    return ids + [rng.randrange(2, vocab) for _ in range(QUESTION)], tuple(spans)


def ttft(engine: LLMEngine, rid: str, ids, spans=(), recompute=None, salt=None) -> float:
    request = EngineRequest(
        rid, ids, SamplingParams(max_tokens=1), documents=spans, document_recompute=recompute, cache_salt=salt
    )
    sync(engine.device)
    t0 = time.perf_counter()
    engine.run([request])
    sync(engine.device)
    return time.perf_counter() - t0


def check(engine: LLMEngine, rng: random.Random, vocab: int) -> dict:
    """The kernel against its reference, and 100% recompute against full prefill, on this device."""
    pool = engine.kv_pool
    n, bs = 257, pool.shape[3]
    free = torch.randperm(pool.shape[0] * bs, device=pool.device)[: 2 * n]
    src, dst = free[:n], free[n:]
    angles = torch.rand(n, pool.shape[-1] // 2, device=pool.device) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    want = pool.clone() if pool.numel() * pool.element_size() < 2**33 else None
    if want is not None:
        rerotate_copy_ref(want, src, dst, cos, sin)
        rerotate_copy(pool, src, dst, cos, sin)
        blocks = torch.unique(dst // bs)
        kernel_err = (pool[blocks].float() - want[blocks].float()).abs().max().item()
        del want
    else:
        kernel_err = float("nan")
    doc_len = min(300, (engine.max_model_len - SYSTEM - QUESTION - 8) // 3)
    docs = [[rng.randrange(2, vocab) for _ in range(doc_len)] for _ in range(3)]
    ids, spans = prompt(rng, docs, [0, 1, 2], vocab)
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)
    full = engine.run([EngineRequest("check-full", ids, params, cache_salt="check-a")])[0].outputs[0]
    every = DocumentRecompute(first_tokens=10**6)
    assembled = engine.run(
        [
            EngineRequest(
                "check-docs", ids, params, documents=spans, document_recompute=every, cache_salt="check-b"
            )
        ]
    )[0].outputs[0]
    diff = max(abs(full.logprobs[0][t] - assembled.logprobs[0].get(t, -1e9)) for t in full.logprobs[0])
    return {
        "rerotate_kernel_max_abs_err": kernel_err,
        "full_recompute_first_token_equal": assembled.token_ids[0] == full.token_ids[0],
        "full_recompute_logprob_max_diff": diff,
    }


def run_case(
    engine: LLMEngine, length: int, k: int, repeats: int, floors, rng, vocab, model: str
) -> list[dict]:
    flops_rate, copy_rate = floors
    cfg = engine.model_config
    params = 2 * (cfg.num_layers * (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size))
    kv_token_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * engine.kv_pool.element_size()
    doc_len = (length - SYSTEM - QUESTION) // k
    times: dict[str, list[float]] = {name: [] for name in ["full", "prefix_cache", *SELECTIONS]}
    fractions: dict[str, list[float]] = {name: [] for name in SELECTIONS}
    for r in range(repeats):
        docs = [[rng.randrange(2, vocab) for _ in range(doc_len)] for _ in range(k)]
        first, second = rng.sample(range(k), k), rng.sample(range(k), k)
        ids, spans = prompt(random.Random(r), docs, second, vocab)
        warm, warm_spans = prompt(random.Random(r), docs, first, vocab)
        times["full"].append(ttft(engine, f"full-{length}-{k}-{r}", ids, salt=f"full-{r}-{time.time()}"))
        salt = f"prefix-{length}-{k}-{r}"
        ttft(engine, f"warm-prefix-{length}-{k}-{r}", warm, salt=salt)
        times["prefix_cache"].append(ttft(engine, f"prefix-{length}-{k}-{r}", ids, salt=salt))
        for name, rc in SELECTIONS.items():
            salt = f"{name}-{length}-{k}-{r}"
            ttft(engine, f"warm-{salt}", warm, warm_spans, rc, salt)
            reused, recomputed = engine.stats.document_tokens_reused, engine.stats.document_tokens_recomputed
            times[name].append(ttft(engine, f"docs-{salt}", ids, spans, rc, salt))
            got_reused = engine.stats.document_tokens_reused - reused
            got_recomputed = engine.stats.document_tokens_recomputed - recomputed
            fractions[name].append(got_recomputed / max(got_reused + got_recomputed, 1))
    full = statistics.median(times["full"])
    rows = []
    for name, samples in times.items():
        t = statistics.median(samples)
        frac = (
            statistics.median(fractions[name])
            if name in fractions
            else (0.0 if name == "prefix_cache" else 1.0)
        )
        doc_tokens = doc_len * k
        computed = length - doc_tokens + frac * doc_tokens if name in SELECTIONS else length
        # matmuls, and attention: 4 x heads x head_dim FLOPs a layer per (query, key) pair, causal (a query at
        # position p has p keys; recomputed tokens counted at the prompt's middle on average)
        pairs = length * length / 2 if name not in SELECTIONS else computed * length / 2
        attention = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * pairs
        floor = (params * computed + attention) / flops_rate
        if name in SELECTIONS:
            floor += 2 * doc_tokens * kv_token_bytes / copy_rate
        rows.append(
            {
                "device": device_name(),
                "model": model,
                "documents": k,
                "prompt_tokens": length,
                "selection": name,
                "first_tokens": SELECTIONS[name].first_tokens if name in SELECTIONS else None,
                "ratio": SELECTIONS[name].ratio if name in SELECTIONS else None,
                "recompute_fraction": round(frac, 4),
                "ttft_s": round(t, 5),
                "full_prefill_ttft_s": round(full, 5),
                "ttft_speedup": round(full / t, 3),
                "floor_s": round(floor, 5),
                "ttft_over_floor": round(t / floor, 3),
                "samples_s": [round(x, 5) for x in samples],
            }
        )
        print(
            f"{length:>6} {k:>3} {name:>13} ttft {t * 1e3:8.2f} ms  {full / t:5.2f}x  floor {floor * 1e3:7.2f} ms"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--documents", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model-dir", default=None, help="a checkpoint dir (default: Llama-3-8B shape, dummy)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else write_model_dir(Path(tmp))
        engine = LLMEngine.from_pretrained(
            str(model_dir),
            load_format="dummy" if args.model_dir is None else "auto",
            dtype="bfloat16" if device.type == "cuda" else "float32",
            device=str(device),
            max_model_len=max(args.lengths) + 64,
            max_num_batched_tokens=max(args.lengths) + 64,
            enforce_eager=True,
        )
        vocab = engine.model_config.vocab_size
        model = (
            "llama-3-8b-shape (random bf16)"
            if args.model_dir is None
            else f"{Path(args.model_dir).name} ({str(engine.dtype).removeprefix('torch.')})"
        )
        rng = random.Random(20261208)
        checks = check(engine, rng, vocab)
        print(checks, flush=True)
        floors = measure_floors(device)
        print(f"matmul {floors[0] / 1e12:.1f} TFLOP/s, copy {floors[1] / 1e9:.0f} GB/s", flush=True)
        rows = []
        for length in args.lengths:
            for k in args.documents:
                rows += run_case(engine, length, k, args.repeats, floors, rng, vocab, model)
    write_result(
        "document_kv_gpu",
        {
            "note": __doc__.split("\n\n")[1].replace("\n", " "),
            "model_config": "custom" if args.model_dir else LLAMA3_8B,
            "checks": checks,
            "matmul_flops_per_s": floors[0],
            "copy_bytes_per_s": floors[1],
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
