"""Attention kernels on the GPU against the copy/matmul ceilings and torch SDPA, in one run.

    python -m benchmarks.gpu_kernels [--out DIR] [--quick]

Decode: Llama-3-8B heads (32 q / 8 kv, d=128), bf16, block size 16, shuffled pages; SDPA runs on the same
K/V laid out contiguously ([B, 8, ctx, 128], enable_gqa), FlexAttention on the same pages when it runs.
Prefill: one causal sequence of 2k-16k tokens, TFLOP/s counting the causal half.
Skinny GEMM: Llama-3-8B's projections at decode batch sizes (M <= 64), each timed over enough copies of the
weight that none stays in L2, cuBLAS against the candidates the engine tries at start and a wider sweep.
"""

import argparse
import itertools
import json
import math
import traceback

import torch
import torch.nn.functional as F
import triton

from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs
from benchmarks.results_io import write_result
from engine.gemm_tuning import graph_time_ms
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.prefill_attention import prefill_attention
from kernels.skinny_gemm import SkinnyConfig, candidate_configs, skinny_gemm, split_to_fill

HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D**-0.5


def bench(fn) -> float:
    """Median milliseconds of GPU time: replays of a captured CUDA graph, as the engine runs decode, so
    Python and launch overhead (ours and SDPA's alike) stay out of the number."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def paged_problem(batch: int, ctx: int, query_len: int):
    blocks_per_seq = math.ceil(ctx / BS)
    num_blocks = batch * blocks_per_seq
    pool = torch.randn((num_blocks, 1, 2, BS, HKV, D), device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    q = torch.randn((batch * query_len, HQ, D), device="cuda", dtype=torch.bfloat16)
    return pool[:, 0], tables, q


def contiguous_kv(cache, tables, batch: int, ctx: int):
    """The same K and V as [B, Hkv, ctx, D] contiguous tensors (one gathered half at a time: less memory)."""
    out = []
    for kv in (0, 1):
        pages = cache[:, kv][tables.long()]  # [B, n, bs, Hkv, D]
        out.append(pages.reshape(batch, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous())
        del pages
    return out


def flex_decode_time(q, k, v, batch: int, ctx: int) -> float | None:
    """FlexAttention decode over the contiguous copy of the pages (compiled once for this shape)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        q4 = q.view(batch, HQ, 1, D)
        flex(q4, k, v, enable_gqa=True, scale=SCALE)
        return bench(lambda: flex(q4, k, v, enable_gqa=True, scale=SCALE))
    except Exception:  # noqa: BLE001 - record that it did not run, keep the run going
        traceback.print_exc()
        return None


def best_time(make_fn, configs) -> tuple[dict, float, float]:
    """(best config, its median ms, the first config's median ms) over `configs`."""
    times = [bench(make_fn(cfg)) for cfg in configs]
    best = min(range(len(configs)), key=times.__getitem__)
    return configs[best], times[best], times[0]


def decode_row(batch: int, ctx: int, copy_bw: float, sms: int, configs: list[dict], with_flex: bool) -> dict:
    kv_bytes = batch * ctx * 2 * HKV * D * 2
    cache, tables, q = paged_problem(batch, ctx, 1)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)

    def split_count(cfg):
        return num_kv_splits(batch, HKV, ctx, sms, block_n=cfg["block_n"], waves=cfg["waves"])

    def make(cfg):
        kw = {k: v for k, v in cfg.items() if k != "waves"}
        return lambda: decode_attention(q, cache, tables, seq_lens, SCALE, split_count(cfg), out=out, **kw)

    cfg, t, t_default = best_time(make, configs)
    k, v = contiguous_kv(cache, tables, batch, ctx)
    q4 = q.view(batch, HQ, 1, D)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=True)

    make(cfg)()
    ref = sdpa()
    err = ((out.view_as(ref).float() - ref.float()).norm() / ref.float().norm()).item()
    sdpa_ms = bench(sdpa)
    flex_ms = flex_decode_time(q, k, v, batch, ctx) if with_flex else None
    gbps = kv_bytes / (t * 1e-3) / 1e9
    return {
        "kernel": "decode_attention",
        "batch": batch,
        "context": ctx,
        "num_kv_splits": split_count(cfg),
        "config": cfg,
        "time_us": round(t * 1e3, 2),
        "default_config_time_us": round(t_default * 1e3, 2),
        "kv_bytes": kv_bytes,
        "achieved_GBps": round(gbps, 1),
        "fraction_of_copy": round(gbps / copy_bw, 3),
        "sdpa_time_us": round(sdpa_ms * 1e3, 2),
        "time_ratio_vs_sdpa": round(t / sdpa_ms, 3),
        "sdpa_fraction_of_copy": round(kv_bytes / (sdpa_ms * 1e-3) / 1e9 / copy_bw, 3),
        "flex_time_us": round(flex_ms * 1e3, 2) if flex_ms else None,
        "rel_err_vs_sdpa": round(err, 5),
    }


def prefill_row(n: int, matmul_rate: float, configs: list[dict]) -> dict:
    cache, tables, q = paged_problem(1, n, n)
    seq_lens = torch.tensor([n], device="cuda", dtype=torch.int32)
    qsl = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)

    def make(cfg):
        return lambda: prefill_attention(q, cache, tables, seq_lens, qsl, n, SCALE, out=out, **cfg)

    cfg, t, t_default = best_time(make, configs)
    k, v = contiguous_kv(cache, tables, 1, n)
    q4 = q.view(1, n, HQ, D).transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

    make(cfg)()
    ref = sdpa()
    err = ((out.view(1, n, HQ, D).transpose(1, 2).float() - ref.float()).norm() / ref.float().norm()).item()
    sdpa_ms = bench(sdpa)
    flops = 4 * HQ * D * n * n / 2  # QK^T and PV, causal half
    tflops = flops / (t * 1e-3) / 1e12
    return {
        "kernel": "prefill_attention",
        "tokens": n,
        "config": cfg,
        "time_us": round(t * 1e3, 1),
        "default_config_time_us": round(t_default * 1e3, 1),
        "TFLOPs": round(tflops, 1),
        "fraction_of_matmul": round(tflops / matmul_rate, 3),
        "sdpa_time_us": round(sdpa_ms * 1e3, 1),
        "sdpa_TFLOPs": round(flops / (sdpa_ms * 1e-3) / 1e12, 1),
        "time_ratio_vs_sdpa": round(t / sdpa_ms, 3),
        "rel_err_vs_sdpa": round(err, 5),
    }


GEMM_SHAPES = {  # Llama-3-8B: (out, in)
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


def sweep_configs(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """A wider grid than the engine's candidates: what they may miss."""
    out = []
    for block_n, block_k, stages in itertools.product((16, 32, 64, 128), (128, 256), (3, 5)):
        split = split_to_fill(n, k, block_n, block_k, sms)
        for split_k in sorted({1, split, split * 2}):
            if k // split_k >= block_k:
                out.append(SkinnyConfig(block_n, block_k, split_k, 8 if block_n == 128 else 4, stages))
    return out


def gemm_row(name: str, m: int, copy_bw: float, sms: int, wide: bool) -> dict:
    n, k = GEMM_SHAPES[name]
    weight_bytes = n * k * 2
    copies = max(2, math.ceil(512e6 / weight_bytes))  # > 10x L2: every GEMM reads its weight from HBM
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def time_of(gemm) -> float:
        return graph_time_ms(lambda: [gemm(w) for w in weights]) / copies

    cublas = time_of(lambda w: F.linear(x, w))
    ref = F.linear(x.float(), weights[0].float())

    def best_of(configs):
        times = [time_of(lambda w, c=c: skinny_gemm(x, w, None, c)) for c in configs]
        i = min(range(len(configs)), key=times.__getitem__)
        return configs[i], times[i]

    cand_cfg, cand_t = best_of(candidate_configs(m, n, k, sms))
    out = skinny_gemm(x, weights[0], None, cand_cfg).float()
    err = ((out - ref).norm() / ref.norm()).item()
    row = {
        "kernel": "skinny_gemm",
        "weight": name,
        "m": m,
        "n": n,
        "k": k,
        "floor_us": round(weight_bytes / (copy_bw * 1e9) * 1e6, 2),
        "cublas_us": round(cublas * 1e3, 2),
        "cublas_fraction_of_copy": round(weight_bytes / (cublas * 1e-3) / 1e9 / copy_bw, 3),
        "skinny_us": round(cand_t * 1e3, 2),
        "skinny_fraction_of_copy": round(weight_bytes / (cand_t * 1e-3) / 1e9 / copy_bw, 3),
        "skinny_config": vars(cand_cfg),
        "time_ratio_vs_cublas": round(cand_t / cublas, 3),
        "rel_err_vs_fp32": round(err, 5),
    }
    if wide:
        sweep_cfg, sweep_t = best_of(sweep_configs(m, n, k, sms))
        row |= {
            "sweep_us": round(sweep_t * 1e3, 2),
            "sweep_fraction_of_copy": round(weight_bytes / (sweep_t * 1e-3) / 1e9 / copy_bw, 3),
            "sweep_config": vars(sweep_cfg),
        }
    return row


def run_rows(make_row, cases) -> list[dict]:
    rows = []
    for case in cases:
        row = make_row(*case)
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles once)")
    parser.add_argument("--only", nargs="+", choices=["decode", "prefill", "gemm"], default=None)
    parser.add_argument("--sweep", action="store_true", help="skinny GEMM: also a wider grid of configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw, mm = copy_bandwidth_GBps(), matmul_TFLOPs()
    print(f"copy {copy_bw:.0f} GB/s, matmul {mm:.0f} TFLOP/s", flush=True)
    sms = torch.cuda.get_device_properties().multi_processor_count
    base = [
        dict(block_n=64, num_warps=4, num_stages=2),
        dict(block_n=64, num_warps=4, num_stages=3),
        dict(block_n=128, num_warps=4, num_stages=2),
        dict(block_n=32, num_warps=4, num_stages=3),
    ]
    decode_cfgs = [dict(base[0], waves=4)] + (
        []
        if args.quick
        else [dict(c, waves=w) for w in (2, 4, 8) for c in base if dict(c, waves=w) != dict(base[0], waves=4)]
    )
    prefill_cfgs = [dict(block_m=64, block_n=64, num_warps=4, num_stages=2)] + (
        []
        if args.quick
        else [
            dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
            dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
            dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
            dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
            dict(block_m=128, block_n=32, num_warps=4, num_stages=4),
            dict(block_m=128, block_n=64, num_warps=8, num_stages=3, k_rows=True),
            dict(block_m=128, block_n=128, num_warps=8, num_stages=3, k_rows=True),
            dict(block_m=64, block_n=64, num_warps=4, num_stages=3, k_rows=True),
            dict(block_m=64, block_n=128, num_warps=4, num_stages=3, k_rows=True),
            dict(block_m=128, block_n=64, num_warps=4, num_stages=3, k_rows=True),
        ]
    )
    # FlexAttention compiles per shape: try it on one row (it failed to compile on torch 2.11 here)
    cases = [
        (b, c, copy_bw, sms, decode_cfgs, (b, c) == (16, 8192) and args.flex)
        for b in (1, 16, 64, 256)
        for c in (256, 2048, 8192, 32768)
    ]
    only = set(args.only or ["decode", "prefill", "gemm"])
    # the pool, its contiguous copy for SDPA and the gathers: keep the KV under a fifth of the memory
    kv_limit = torch.cuda.get_device_properties().total_memory / 5
    rows = []
    if "decode" in only:
        rows += run_rows(
            decode_row, [case for case in cases if case[0] * case[1] * 2 * HKV * D * 2 <= kv_limit]
        )
    if "prefill" in only:
        rows += run_rows(prefill_row, [(n, mm, prefill_cfgs) for n in (2048, 4096, 8192, 16384)])
    if "gemm" in only:
        m_values = (1, 8, 16, 32, 64)
        rows += run_rows(gemm_row, [(w, m, copy_bw, sms, args.sweep) for w in GEMM_SHAPES for m in m_values])
    from pathlib import Path

    path = write_result(
        "gpu_kernels",
        {
            "copy_bandwidth_GBps": round(copy_bw, 1),
            "matmul_TFLOPs": round(mm, 1),
            "dtype": "bfloat16",
            "block_size": BS,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
