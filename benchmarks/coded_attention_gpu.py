"""Decode attention over rotated low-bit KV blocks on the GPU against bf16 and fp8 pages, in one run (issue 23).

    python -m benchmarks.coded_attention_gpu [--bits 4 2] [--out DIR]

Llama-3-8B heads (32 q / 8 kv, d=128), block size 16, shuffled pages, one layer. The coded context follows
the 4-bit age policy: the first block (sinks) and the last 512 tokens stay bf16, the rest is 4-bit codes.
Each kernel is replayed from a CUDA graph; the floor is the bytes it must read (codes, norms, 16-bit
blocks) at the copy bandwidth measured in the same run. Error: against SDPA over the bf16 K/V.
Writes benchmarks/results/kv_coded_attention.json.
"""

import argparse
import functools
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_floor import copy_bandwidth_GBps
from benchmarks.gpu_kernels import BS, HKV, HQ, SCALE, D, contiguous_kv, paged_problem
from benchmarks.results_io import write_result
from engine.gemm_tuning import graph_time_ms
from engine.kv.age_policy import BASE, KVAgePolicy
from kernels.attention_ref import quantize_kv
from kernels.coded_attention import coded_decode_attention
from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.turboquant import encode, rotation_signs

POLICY = KVAgePolicy(bits=4, sinks=16, window=512)


def coded_pool(cache, tables, ctx: int, bits: int):
    """The policy (at `bits`) applied to every sequence: (block tables with coded entries, codes, norms, signs,
    bytes)."""
    num_base = cache.shape[0]
    per_block = POLICY.block_bits(ctx, BS)
    coded_cols = [i for i, b in enumerate(per_block) if b != BASE]
    ids = tables[:, coded_cols].reshape(-1).long()  # the blocks to code, [n]
    signs = rotation_signs(1, 1, HKV, D)[0].cuda()
    rows = cache[ids].reshape(-1, HKV, D)  # [n * 2 * bs, Hkv, D]
    packed, norms = encode(rows, signs, bits)
    codes = packed.view(len(ids), 2, BS, HKV, -1)
    norms = norms.view(len(ids), 2, BS, HKV)
    coded_tables = tables.clone()
    coded_tables[:, coded_cols] = (num_base + torch.arange(len(ids), device="cuda", dtype=torch.int32)).view(
        tables.shape[0], -1
    )
    base_blocks = tables.shape[0] * (len(per_block) - len(coded_cols))
    nbytes = codes.numel() + norms.numel() * 4 + base_blocks * 2 * BS * HKV * D * 2
    return coded_tables, codes, norms, signs, nbytes


def compiled_kernels() -> dict:
    """The decode kernel's compiled variants so far: key -> (registers a thread, spilled bytes), as Triton's
    cache holds them (empty where this Triton keeps them elsewhere)."""
    from kernels.coded_attention import _coded_decode_kernel

    found = {}
    for cache in getattr(_coded_decode_kernel, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for key, kernel in getattr(kernels, "items", lambda: [])():
            found[str(key)] = (getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None))
    return found


def _coded_into(holder: dict, *args, **kwargs) -> None:
    holder["out"] = coded_decode_attention(*args, **kwargs)


def row(kind, batch, ctx, ms, bf16_ms, nbytes, copy_bw, out, ref) -> dict:
    err = (out.view_as(ref).float() - ref.float()).norm() / ref.float().norm()
    return {
        "kv": kind,
        "batch": batch,
        "context": ctx,
        "ms": round(ms, 4),
        "time_vs_bf16": round(ms / bf16_ms, 3),
        "bytes": nbytes,
        "floor_ms": round(nbytes / (copy_bw * 1e9) * 1e3, 4),
        "ratio_to_floor": round(ms / (nbytes / (copy_bw * 1e9) * 1e3), 3),
        "rel_error_vs_sdpa": float(f"{err:.3g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["1x8192", "64x8192", "8x32768", "64x32768"])
    parser.add_argument("--tiles", nargs="+", type=int, default=[32, 64], help="tokens a coded-kernel step")
    parser.add_argument(
        "--dequants", nargs="+", type=int, default=[0, 1], help="centroid table or polynomial"
    )
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument(
        "--passes", nargs="+", type=int, default=[1, 2], help="one launch, or 16-bit then coded"
    )
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=[4],
        help="code widths (2 bits: half the bytes, one Horner step)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    copy_bw = copy_bandwidth_GBps()
    sms = torch.cuda.get_device_properties().multi_processor_count
    rows = []
    for case in args.cases:
        batch, ctx = map(int, case.split("x"))
        cache, tables, q = paged_problem(batch, ctx, 1)
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        splits = num_kv_splits(batch, HKV, ctx, sms)
        k, v = contiguous_kv(cache, tables, batch, ctx)
        ref = F.scaled_dot_product_attention(q.view(batch, HQ, 1, D), k, v, scale=SCALE, enable_gqa=True)
        del k, v
        bf16_bytes = batch * ctx * 2 * HKV * D * 2
        out = torch.empty_like(q)
        bf16_ms = graph_time_ms(
            functools.partial(decode_attention, q, cache, tables, seq_lens, SCALE, splits, out=out)
        )
        rows.append(row("bf16", batch, ctx, bf16_ms, bf16_ms, bf16_bytes, copy_bw, out, ref))
        scales = (cache.float().abs().amax(dim=(0, 2, 4)) / 448).contiguous()
        fp8 = torch.stack([quantize_kv(cache[:, i], scales[i], torch.float8_e4m3fn) for i in (0, 1)], dim=1)
        out8 = torch.empty_like(q)
        fp8_ms = graph_time_ms(
            functools.partial(
                decode_attention, q, fp8, tables, seq_lens, SCALE, splits, out=out8, kv_scales=scales
            )
        )
        rows.append(row("fp8", batch, ctx, fp8_ms, bf16_ms, bf16_bytes // 2, copy_bw, out8, ref))
        del fp8
        variants = list(itertools.product(args.bits, args.tiles, args.dequants, args.warps, args.passes))
        pools: dict = {}  # bits -> the coded pool (encoded once)
        for bits, tile, dequant, warps, passes in variants:
            if bits not in pools:
                pools.clear()  # one width in memory at a time
                pools[bits] = coded_pool(cache, tables, ctx, bits)
            coded_tables, codes, norms, signs, nbytes = pools[bits]
            holder: dict = {}
            args_ = (q, cache, codes, norms, signs, bits, coded_tables, seq_lens, SCALE, splits)
            kernel = functools.partial(
                _coded_into, holder, *args_, tile_n=tile, dequant=dequant, num_warps=warps, passes=passes
            )
            before = compiled_kernels()
            coded_ms = graph_time_ms(kernel)
            new = [v for k, v in compiled_kernels().items() if k not in before]
            rows.append(
                row(f"{bits}-bit policy", batch, ctx, coded_ms, bf16_ms, nbytes, copy_bw, holder["out"], ref)
            )
            rows[-1].update(tile_n=tile, dequant=dequant, num_warps=warps, passes=passes)
            if new:
                rows[-1].update(registers=new[0][0], spilled_bytes=new[0][1])
        for r in rows[-2 - len(variants) :]:
            print(r, flush=True)
        del cache, codes, norms, coded_tables, q, pools
        torch.cuda.empty_cache()
    path = write_result(
        "kv_coded_attention",
        {
            "copy_bandwidth_GBps": round(copy_bw, 1),
            "shape": "Llama-3-8B heads (32 q / 8 kv, d=128), one layer, block 16",
            "policy": {"bits": POLICY.bits, "sinks": POLICY.sinks, "window": POLICY.window},
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
