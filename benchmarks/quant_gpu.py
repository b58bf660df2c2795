"""FP8 weights and KV cache on the GPU against bf16, in one run: decode steps of the Llama-3-8B shape, decode
attention over e4m3 pages at 8k/32k context, KV capacity, and the skinny GEMMs.

    python -m benchmarks.quant_gpu [--batches 1 8 64] [--context 2048] [--out DIR]

Decode: the same engine benchmark as benchmarks/gpu_engine.py (random weights, async scheduling, CUDA
graphs), built once with bf16 weights and once with quantization="fp8"; the floor counts each weight's
stored bytes (1 a parameter for the FP8 Linear layers) and the KV read. Skinny GEMM: Llama-3-8B's
projections at decode batch sizes, each over enough weight copies that none stays in L2: ours reading e4m3
(best of the engine's candidates), torch._scaled_mm W8A8 (activations quantized per token, included), and
bf16 cuBLAS, as fractions of the copy bandwidth of the bytes each reads.
Writes benchmarks/results/quant_gpu.json.
"""

import argparse
import functools
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from benchmarks.gpu_engine import ours, release_gpu_memory, write_model_dir
from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs
from benchmarks.gpu_kernels import BS, GEMM_SHAPES, HKV, HQ, SCALE, D, contiguous_kv, paged_problem
from benchmarks.results_io import write_result
from engine.gemm_tuning import graph_time_ms
from engine.kv.kv_format import FP8_KV
from engine.kv.pool import bytes_per_block
from kernels.attention_ref import quantize_kv
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.fp8 import fp8_linear_ref, fp8_linear_w8a8, quantize_per_channel
from kernels.skinny_gemm import candidate_configs, skinny_gemm


def gemm_row(name: str, m: int, bf16: list[torch.Tensor], fp8: list, copy_bw: float, sms: int) -> dict:
    n, k = bf16[0].shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def per_copy(fn) -> float:
        return graph_time_ms(fn) / len(bf16)

    def skinny(cfg):
        return lambda: [skinny_gemm(x, q, None, cfg, s) for q, s in fp8]

    t_bf16 = per_copy(lambda: [F.linear(x, w) for w in bf16])
    t_w8a8 = per_copy(lambda: [fp8_linear_w8a8(x, q, s) for q, s in fp8])
    cands, times = [], []
    for cfg in candidate_configs(m, n, k, sms):
        try:
            times.append(per_copy(skinny(cfg)))
        except OutOfResources:  # more shared memory than this GPU has: not a candidate here (as in the tuner)
            continue
        cands.append(cfg)
    best = min(range(len(cands)), key=times.__getitem__)
    q, s = fp8[0]
    ref = fp8_linear_ref(x, q, s).float()
    err = (skinny_gemm(x, q, None, cands[best], s).float() - ref).norm() / ref.norm()
    fp8_bytes, bf16_bytes = n * k + 4 * n, 2 * n * k

    def frac(nbytes: int, ms: float) -> float:
        return round(nbytes / (ms * 1e-3) / 1e9 / copy_bw, 3)

    return {
        "table": "skinny_gemm",
        "weight": name,
        "m": m,
        "n": n,
        "k": k,
        "ours_us": round(times[best] * 1e3, 2),
        "fraction_of_copy": frac(fp8_bytes, times[best]),
        "ours_config": vars(cands[best]),
        "scaled_mm_us": round(t_w8a8 * 1e3, 2),
        "scaled_mm_fraction_of_copy": frac(fp8_bytes, t_w8a8),
        "bf16_cublas_us": round(t_bf16 * 1e3, 2),
        "bf16_fraction_of_copy": frac(bf16_bytes, t_bf16),
        "speedup_vs_bf16": round(t_bf16 / times[best], 3),
        "rel_err_vs_reference": round(err.item(), 5),
    }


def gemm_rows(copy_bw: float, sms: int) -> list[dict]:
    rows = []
    for name, (n, k) in GEMM_SHAPES.items():
        copies = max(2, math.ceil(512e6 / (n * k)))
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        fp8 = [quantize_per_channel(w) for w in bf16]
        for m in (1, 8, 16, 32, 64):
            rows.append(gemm_row(name, m, bf16, fp8, copy_bw, sms))
            print(rows[-1], flush=True)
        del bf16, fp8
        torch.cuda.empty_cache()
    return rows


def kv_rows(copy_bw: float, sms: int) -> list[dict]:
    """Decode attention over a bf16 and an e4m3 paged cache (Llama-3-8B heads, one layer, shuffled pages),
    same queries and values (the e4m3 pages are the bf16 ones quantized per KV head); time, and error of
    each against SDPA over the bf16 K/V."""
    rows = []
    for batch, ctx in ((1, 8192), (8, 8192), (1, 32768), (8, 32768)):
        cache, tables, q = paged_problem(batch, ctx, 1)
        scales = (cache.float().abs().amax(dim=(0, 2, 4)) / 448).contiguous()  # [2, Hkv]
        fp8 = torch.stack([quantize_kv(cache[:, i], scales[i], FP8_KV) for i in (0, 1)], dim=1)
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        splits = num_kv_splits(batch, HKV, ctx, sms)
        k, v = contiguous_kv(cache, tables, batch, ctx)
        ref = F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), k, v, scale=SCALE, enable_gqa=True)
        del k, v
        out = {}
        times = {}
        for kv, pages, kv_scales in (("bf16", cache, None), ("fp8", fp8, scales)):
            o = torch.empty_like(q)

            run = functools.partial(
                decode_attention, q, pages, tables, seq_lens, SCALE, splits, out=o, kv_scales=kv_scales
            )
            times[kv] = graph_time_ms(run)
            out[kv] = o
        for kv in ("bf16", "fp8"):
            kv_bytes = batch * ctx * 2 * HKV * D * (2 if kv == "bf16" else 1)
            err = (out[kv].view_as(ref).float() - ref.float()).norm() / ref.float().norm()
            rows.append(
                {
                    "table": "kv_attention",
                    "kv": kv,
                    "batch": batch,
                    "context": ctx,
                    "ms": round(times[kv], 4),
                    "time_vs_bf16": round(times[kv] / times["bf16"], 3),
                    "fraction_of_copy": round(kv_bytes / (times[kv] * 1e-3) / (copy_bw * 1e9), 3),
                    "rel_error_vs_sdpa": float(f"{err:.3g}"),
                }
            )
            print(rows[-1], flush=True)
        del cache, fp8, tables, q
        torch.cuda.empty_cache()
    return rows


def capacity_row(budget: int = 64 * 2**30) -> dict:
    """KV blocks a 64 GiB budget holds for the Llama-3-8B shape, bf16 against e4m3."""
    cfg = type("Shape", (), {"num_layers": 32, "num_kv_heads": HKV, "head_dim": D})()
    blocks = {
        name: budget // bytes_per_block(cfg, BS, dtype)
        for name, dtype in (("bf16", torch.bfloat16), ("fp8", FP8_KV))
    }
    return {
        "table": "kv_capacity",
        "budget_GiB": budget / 2**30,
        "bf16_blocks": blocks["bf16"],
        "fp8_blocks": blocks["fp8"],
        "ratio": round(blocks["fp8"] / blocks["bf16"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_bw, mm = copy_bandwidth_GBps(), matmul_TFLOPs()
    sms = torch.cuda.get_device_properties().multi_processor_count
    rows = [capacity_row(), *kv_rows(copy_bw, sms)]
    rows += [] if args.skip_gemm else gemm_rows(copy_bw, sms)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp))
        decode = {}
        for weights, quantization in (("bf16", None), ("fp8", "fp8")):
            decode[weights] = ours(
                model_dir, args.batches, [args.context], copy_bw, None, quantization, (True,)
            )
            release_gpu_memory()
    for weights in ("bf16", "fp8"):
        base = {(r["batch"], r["context"]): r for r in decode["bf16"] if "batch" in r}
        for r in decode[weights]:
            if "batch" not in r:
                continue
            rows.append(
                {
                    "table": "decode",
                    "weights": weights,
                    "kv": "bf16",
                    "batch": r["batch"],
                    "context": r["context"],
                    "step_ms": r["step_ms"],
                    "tokens_per_s": r["tokens_per_s"],
                    "speedup_vs_bf16": round(
                        r["tokens_per_s"] / base[r["batch"], r["context"]]["tokens_per_s"], 3
                    ),
                    "floor_ms": r["floor_ms"],
                    "ratio_to_floor": r["ratio_to_floor"],
                }
            )
            print(rows[-1], flush=True)
    path = write_result(
        "quant_gpu",
        {
            "copy_bandwidth_GBps": round(copy_bw, 1),
            "matmul_TFLOPs": round(mm, 1),
            "model": "Llama-3-8B shape, random weights",
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
