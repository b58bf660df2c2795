"""Quality of quantized weights and KV cache on the trained reference target: held-out perplexity and greedy top-1 agreement
with the 16-bit model, through the engine's own forward pass (its Linear layers, paged KV cache, attention).

    python -m benchmarks.quant_quality [--windows 200] [--out DIR]

Windows of 256 tokens (the models' training context) of the held-out split (benchmarks/train_reference.py),
each prefilled in one pass into the engine's KV pool; every position's logits score the next token.
Writes benchmarks/results/quant_quality.json (rows: weights, kv, perplexity, ppl_delta_vs_bf16,
top1_agreement).
"""

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.results_io import write_result
from benchmarks.spec_acceptance import MODELS
from benchmarks.train_reference import corpus
from engine import LLM
from engine.attention import AttentionMetadata, ForwardContext
from engine.tokenizer import Tokenizer

SEQ = 256


def heldout_windows(model: str, count: int) -> list[list[int]]:
    tok = Tokenizer(model)
    stream: list[int] = []
    for text in corpus()["heldout"]:
        stream += tok.encode(text, add_special_tokens=False)
        if len(stream) >= count * SEQ + 1:
            break
    return [stream[i : i + SEQ + 1] for i in range(0, count * SEQ, SEQ)]


@torch.inference_mode()
def window_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one sequence prefilled in one step into the (idle) engine's pool."""
    engine = llm.engine
    runner, bs = engine.runner, engine.config.cache.block_size
    T, dev = len(ids), engine.device
    blocks = torch.arange(-(-T // bs), dtype=torch.int32, device=dev)  # blocks 0..: nothing else runs
    attn = AttentionMetadata(
        slot_mapping=torch.arange(T, device=dev),
        query_start_loc=torch.tensor([0, T], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
        block_tables=blocks[None, :],
        max_query_len=T,
        max_seq_len=T,
        query_start_loc_cpu=[0, T],
        seq_lens_cpu=[T],
        block_size=bs,
    )
    runner.backend.plan(attn, engine.model_config.num_kv_heads)
    positions = torch.arange(T, device=dev)
    cos, sin = engine.model.rotary.cos_sin(positions)
    ctx = ForwardContext(attn, runner.kv_caches, runner.backend, cos, sin)
    hidden = engine.model(torch.tensor(ids, device=dev), ctx)
    return engine.model.compute_logits(hidden)


def score(llm: LLM, windows: list[list[int]]) -> tuple[float, list[torch.Tensor]]:
    """(perplexity, each window's greedy next tokens)."""
    nll, count, greedy = 0.0, 0, []
    for w in windows:
        logits = window_logits(llm, w[:-1])
        target = torch.tensor(w[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += len(target)
        greedy.append(logits.argmax(-1).cpu())
    return math.exp(nll / count), greedy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = str(MODELS / "ridgeline-ref-target")
    windows = heldout_windows(model, args.windows)
    fp8_kv = {"kv_cache_dtype": "fp8"}
    configs = [
        ("bf16", "bf16", {}),
        ("fp8", "bf16", {"quantization": "fp8"}),
        ("bf16", "fp8", fp8_kv),
        ("fp8", "fp8", {"quantization": "fp8", **fp8_kv}),
    ]
    rows, base_ppl, base_greedy = [], None, None
    for weights, kv, options in configs:
        llm = LLM(model, device=args.device, dtype="bfloat16", num_blocks=64, **options)
        t0 = time.perf_counter()
        ppl, greedy = score(llm, windows)
        if base_ppl is None:
            base_ppl, base_greedy = ppl, greedy
        assert base_greedy is not None
        agree = sum((a == b).sum().item() for a, b in zip(greedy, base_greedy, strict=True))
        rows.append(
            {
                "weights": weights,
                "kv": kv,
                "perplexity": round(ppl, 4),
                "ppl_delta_vs_bf16": round(ppl / base_ppl - 1, 5),
                "top1_agreement": round(agree / sum(len(g) for g in greedy), 5),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    path = write_result(
        "quant_quality",
        {
            "model": "ridgeline-ref-target",
            "tokens": len(windows) * SEQ,
            "window": SEQ,
            "split": "held-out (benchmarks/train_reference.py)",
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(path)


if __name__ == "__main__":
    main()
