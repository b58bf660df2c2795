"""KV precision by age on the GPU (issue 23): decode throughput and KV capacity of the Llama-3-8B shape with a
4-bit aged pool, against bf16 and fp8 KV, in one run.

    python -m benchmarks.kv_precision_gpu [--cases 8x8192 32x8192 64x8192 8x32768] [--out DIR]

Each KV format gets its own engine (random bf16 weights, CUDA graphs, async scheduling, the same 0.9 memory
utilization), and the same decode measurement as benchmarks/gpu_engine.py: steady-state steps of B requests
at a context, after their prefill (during which the aged engine moves every block past the sinks and the
window into the 4-bit pool). A case a format's pool cannot hold is skipped and said so. Capacity: KV bytes a
token takes at the context (the aged pool's sinks and window stay 16-bit), against bf16. Encode cost: one
re-encode launch of 64 blocks, and what a decode step at B pays for the 1/16 block each sequence ages a step.
Writes benchmarks/results/kv_precision_gpu.json (rows: policy, workload, batch, context, capacity_vs_bf16,
throughput_vs_bf16).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import (
    DECODE_STEPS,
    PhaseTimer,
    build_engine,
    release_gpu_memory,
    time_decode,
    write_model_dir,
)
from benchmarks.gpu_floor import copy_bandwidth_GBps
from benchmarks.results_io import write_result
from engine.kv.age_policy import KVAgePolicy
from engine.kv.coded_pool import bytes_per_coded_block
from engine.kv.pool import bytes_per_block

POLICY = KVAgePolicy(bits=4, sinks=16, window=512)
FORMATS = {
    "bf16": {},
    "fp8": {"kv_cache_dtype": "fp8"},
    "4-bit aged (sinks 16, window 512)": {"kv_age_policy": POLICY},
}


def bytes_per_token(engine, context: int) -> float:
    """KV bytes one token of a `context`-token sequence takes in this engine's pools."""
    cfg, bs = engine.model_config, engine.config.cache.block_size
    base = bytes_per_block(cfg, bs, engine.kv_pool.dtype) / bs
    policy = engine.config.cache.kv_age_policy
    if policy is None:
        return base
    coded = bytes_per_coded_block(cfg, bs, policy.bits) / bs
    num_coded = len(policy.coded_ranges(context, bs)[0]) * bs
    return (num_coded * coded + (context - num_coded) * base) / context


def tokens_held(engine, context: int) -> int:
    """Tokens of `context`-token sequences the pools hold at once (the 16-bit pool bounds the aged one's
    sequences by their sinks, window and open blocks)."""
    bm, bs = engine.block_manager, engine.block_manager.block_size
    policy = engine.config.cache.kv_age_policy
    if policy is None:
        return bm.num_blocks * bs
    per_seq_coded = len(policy.coded_ranges(context, bs)[0])
    per_seq_base = -(-(context - per_seq_coded * bs) // bs)
    seqs = min(bm.num_blocks // per_seq_base, bm.num_coded_blocks // max(per_seq_coded, 1))
    return seqs * context


def encode_cost_ms(engine) -> float:
    """One re-encode launch of 64 blocks (all layers), CUDA time."""
    coded = engine.coded_kv
    moves = [(i, engine.block_manager.num_blocks + i) for i in range(64)]
    coded.apply(engine.kv_pool, moves)  # compile
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        coded.apply(engine.kv_pool, moves)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["8x8192", "32x8192", "64x8192", "8x32768"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases]
    copy_bw = copy_bandwidth_GBps()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp))
        for name in args.formats:
            t0 = time.perf_counter()
            engine = build_engine(
                model_dir,
                max(b for b, _ in cases),
                max(c for _, c in cases) + 2 * DECODE_STEPS + 64,
                **FORMATS[name],
            )
            gen = torch.Generator().manual_seed(0)
            phases = PhaseTimer(engine)
            extra = {"encode_64_blocks_ms": round(encode_cost_ms(engine), 3)} if engine.coded_kv else {}
            for batch, context in cases:
                held = tokens_held(engine, context + DECODE_STEPS + 24)
                row = {
                    "policy": name,
                    "workload": "decode",
                    "batch": batch,
                    "context": context,
                    "kv_bytes_per_token": round(bytes_per_token(engine, context), 1),
                    "tokens_held": held,
                    **extra,
                }
                if batch * (context + DECODE_STEPS + 24) > held:
                    rows.append({**row, "skipped": f"the pools hold {held} tokens of this context"})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                timed = time_decode(engine, batch, context, gen, phases)
                row.update(timed, tokens_per_s=round(batch / (timed["step_ms"] / 1e3), 1))
                if engine.coded_kv is not None and extra:
                    # each sequence ages 1/16 block a step; one launch of 64 blocks costs encode_64_blocks_ms
                    row["encode_ms_per_step"] = round(extra["encode_64_blocks_ms"] * batch / 16 / 64, 4)
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
            del engine, phases
            release_gpu_memory()
    base = {(r["batch"], r["context"]): r for r in rows if r["policy"] == "bf16"}
    for r in rows:
        b = base.get((r["batch"], r["context"]))
        if b is not None:
            r["capacity_vs_bf16"] = round(b["kv_bytes_per_token"] / r["kv_bytes_per_token"], 3)
            if "tokens_per_s" in r and "tokens_per_s" in b:
                r["throughput_vs_bf16"] = round(r["tokens_per_s"] / b["tokens_per_s"], 3)
    path = write_result(
        "kv_precision_gpu",
        {
            "model": "Llama-3-8B shape, random bf16 weights",
            "copy_bandwidth_GBps": round(copy_bw, 1),
            "policy": vars(POLICY),
            "decode_steps": DECODE_STEPS,
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(path)


if __name__ == "__main__":
    main()
