"""A long prompt's KV handed from one process to another over NIXL (UCX, loopback), 16-bit against aged by a
KV age policy, in one run (issue 23: the transport moves coded blocks as they are).

    python -m benchmarks.kv_handoff_aged [--tokens 8192] [--repeats 5]

Llama-3-8B's KV geometry (32 layers, 8 KV heads, d=128, block 16; a bf16 block is 2 MiB). The aged handle
lists the blocks the 4-bit policy (16 sink tokens, a 512-token window) holds coded at the prompt's length as
4-bit blocks (codes and fp32 norms, 0.53 MiB), the rest as bf16. The puller has pools of both formats, so
nothing is converted. Reported: bytes, the owner's handle time (checksums), the pull (read and verify) and
the whole handoff, with the ratio of aged to 16-bit; the floor is an in-process memcpy of the same bytes.
Writes benchmarks/results/kv_handoff_aged_cpu.json.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kv_handoff import LAYOUT, _pool, memcpy_gbps
from benchmarks.results_io import write_result
from engine.kv.age_policy import BASE, KVAgePolicy
from engine.kv.coded_pool import CodedFormat

POLICY = KVAgePolicy(bits=4, sinks=16, window=512)
FORMAT = CodedFormat(POLICY.bits, POLICY.seed, LAYOUT[0], LAYOUT[2], LAYOUT[3], LAYOUT[4])


def _transport(num_blocks: int, num_coded: int, fill: bool):
    from services.transport.nixl_backend import NixlTransport

    transport = NixlTransport()
    base = _pool(num_blocks, LAYOUT) if fill else torch.zeros((num_blocks, *LAYOUT), dtype=torch.bfloat16)
    transport.register(base)
    coded = torch.zeros((num_coded, FORMAT.block_bytes), dtype=torch.uint8)
    if fill:  # codes of random KV, 64 blocks at a time
        for i in range(0, num_coded, 64):
            coded[i : i + 64] = FORMAT.encode(base[i : i + 64].float())
    transport.register_coded(coded, FORMAT, num_blocks)
    return transport


def _owner(conn, num_blocks: int, num_coded: int) -> None:
    transport = _transport(num_blocks, num_coded, fill=True)
    conn.send("ready")
    while (block_ids := conn.recv()) is not None:
        t0 = time.perf_counter()
        handle = transport.handle(block_ids, num_tokens=len(block_ids) * LAYOUT[2])
        conn.send((handle, time.perf_counter() - t0))
        transport.take_released()
    transport.close()


def handoff_ids(tokens: int, aged: bool, num_blocks: int) -> list[int]:
    """The owner's block ids of a `tokens` prompt: bf16 ids 0.., coded ids from num_blocks on where aged."""
    bits = POLICY.block_bits(tokens, LAYOUT[2]) if aged else [BASE] * -(-tokens // LAYOUT[2])
    return [num_blocks + i if b != BASE else i for i, b in enumerate(bits)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    n = -(-args.tokens // LAYOUT[2])
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(there, n, n), daemon=True)
    proc.start()
    assert here.recv() == "ready"
    puller = _transport(n, n, fill=False)
    rows = []
    try:
        for aged in (False, True):
            ids = handoff_ids(args.tokens, aged, n)
            handles, pulls = [], []
            for _ in range(args.repeats + 1):  # the first round warms up (connection, registration)
                here.send(ids)
                handle, handle_s = here.recv()
                t0 = time.perf_counter()
                puller.pull(handle, ids, timeout_s=120.0)  # the same ids on this side: same formats
                pulls.append(time.perf_counter() - t0)
                puller.release(handle)
                handles.append(handle_s)
            made, pull = statistics.median(handles[1:]), statistics.median(pulls[1:])
            rows.append(
                {
                    "handoff": "aged 4-bit" if aged else "bf16",
                    "tokens": args.tokens,
                    "blocks": len(ids),
                    "coded_blocks": sum(i >= n for i in ids),
                    "bytes": handle.num_bytes,
                    "handle_s": made,
                    "pull_s": pull,
                    "handoff_s": made + pull,
                    "converted_blocks": puller.converted_blocks,
                }
            )
            print(rows[-1], flush=True)
    finally:
        here.send(None)
        proc.join(timeout=30)
        puller.close()
    floor = memcpy_gbps(rows[0]["bytes"], args.repeats)
    for row in rows:
        row["memcpy_floor_s"] = row["bytes"] / floor / 1e9
        row["bytes_vs_bf16"] = row["bytes"] / rows[0]["bytes"]
        row["handoff_vs_bf16"] = row["handoff_s"] / rows[0]["handoff_s"]
    path = write_result(
        "kv_handoff_aged_cpu",
        {
            "block_layout": list(LAYOUT),
            "policy": {"bits": POLICY.bits, "sinks": POLICY.sinks, "window": POLICY.window},
            "coded_block_bytes": FORMAT.block_bytes,
            "memcpy_gbps": floor,
            "ucx_net_devices": os.environ.get("UCX_NET_DEVICES"),
            "rows": rows,
            "note": "handle = owner side (per-block CRC32s); pull = NIXL read into the puller's pools of the "
            "same formats + CRC32 verification; handoff = handle + pull",
        },
        None if args.out is None else Path(args.out),
    )
    print(path)


if __name__ == "__main__":
    main()
