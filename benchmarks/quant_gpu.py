"""FP8 weights on the GPU against bf16, in one run: decode steps of the Llama-3-8B shape and the skinny GEMMs.

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
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_engine import ours, release_gpu_memory, write_model_dir
from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs
from benchmarks.gpu_kernels import GEMM_SHAPES
from benchmarks.results_io import write_result
from engine.gemm_tuning import graph_time_ms
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
    cands = candidate_configs(m, n, k, sms)
    times = [per_copy(skinny(c)) for c in cands]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_bw, mm = copy_bandwidth_GBps(), matmul_TFLOPs()
    sms = torch.cuda.get_device_properties().multi_processor_count
    rows = [] if args.skip_gemm else gemm_rows(copy_bw, sms)
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
