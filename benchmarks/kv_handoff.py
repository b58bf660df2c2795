"""KV handoff bandwidth between two processes on this machine: NIXL (UCX) vs the Ray object store.

    python -m benchmarks.kv_handoff [--block-mib 2] [--blocks 1 4 16 64 256] [--repeats 5]

A block is sized like Llama-3-8B's bf16 KV for 16 tokens (32 layers x 2 x 16 x 8 heads x 128 = 2 MiB).
The owner process holds the pool and hands out handles; this process pulls them into its own pool.
Reported per size: the transfer alone, the checksum verification, and the whole pull, with bandwidth and
the ratio to an in-process memcpy of the same bytes measured in the same run (the floor on one host).
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from benchmarks.results_io import write_result

LAYOUT = (32, 2, 16, 8, 128)  # [layers, k/v, block_size, kv_heads, head_dim] of bf16 = 2 MiB


def _pool(num_blocks: int, shape: tuple) -> torch.Tensor:
    return torch.randn((num_blocks, *shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


class Owner:
    """Owns a pool and hands out handles, in its own process (a child process for NIXL, a Ray actor for
    the Ray backend, so handle references travel the way they do in serving)."""

    def __init__(self, backend: str, num_blocks: int, shape: tuple):
        from services.transport.factory import make_transport

        self.transport = make_transport(backend)
        self.transport.register(_pool(num_blocks, shape))
        self.block_size = shape[2]

    def handle(self, block_ids: list[int]):
        t0 = time.perf_counter()
        handle = self.transport.handle(block_ids, num_tokens=len(block_ids) * self.block_size)
        self.transport.take_released()  # the benchmark owner frees nothing; it drains notifications
        return handle, time.perf_counter() - t0


def _owner_process(conn, backend: str, num_blocks: int, shape: tuple) -> None:
    owner = Owner(backend, num_blocks, shape)
    while (block_ids := conn.recv()) is not None:
        conn.send(owner.handle(block_ids))
    owner.transport.close()


def _start_owner(backend: str, num_blocks: int, shape: tuple):
    """-> ask(block_ids) -> (handle, owner seconds), stop()"""
    if backend == "ray":
        import ray

        actor = ray.remote(num_cpus=0)(Owner).remote(backend, num_blocks, shape)
        return (lambda ids: ray.get(actor.handle.remote(ids))), (lambda: ray.kill(actor))
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_owner_process, args=(there, backend, num_blocks, shape), daemon=True)
    proc.start()

    def ask(ids):
        here.send(ids)
        return here.recv()

    def stop():
        here.send(None)
        proc.join(timeout=10)

    return ask, stop


def memcpy_gbps(num_bytes: int, repeats: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times) / 1e9


def bench_backend(backend: str, sizes: list[int], shape: tuple, repeats: int) -> list[dict]:
    from services.transport.checksum import block_checksums
    from services.transport.factory import make_transport

    num_blocks = max(sizes)
    ask, stop = _start_owner(backend, num_blocks, shape)
    puller = make_transport(backend)
    puller.register(torch.zeros((num_blocks, *shape), dtype=torch.bfloat16))
    rows = []
    try:
        for n in sizes:
            ids = list(range(n))
            reads, verifies, handles = [], [], []
            for _ in range(repeats + 1):  # the first round warms up (connection, registration)
                handle, handle_s = ask(ids)
                t0 = time.perf_counter()
                puller._read(handle, puller.pool, ids, 60.0)
                t1 = time.perf_counter()
                ok = block_checksums(puller.pool, ids, handle.checksum_algorithm) == handle.checksums
                t2 = time.perf_counter()
                assert ok, f"{backend}: pulled blocks do not verify"
                puller.release(handle)
                reads.append(t1 - t0)
                verifies.append(t2 - t1)
                handles.append(handle_s)
            read, verify, made = (statistics.median(x[1:]) for x in (reads, verifies, handles))
            num_bytes = handle.num_bytes
            rows.append(
                {
                    "backend": backend,
                    "blocks": n,
                    "bytes": num_bytes,
                    "handle_s": made,
                    "read_s": read,
                    "verify_s": verify,
                    "pull_s": read + verify,
                    "read_gbps": num_bytes / read / 1e9,
                    "pull_gbps": num_bytes / (read + verify) / 1e9,
                }
            )
            print(
                f"{backend:5s} {n:4d} blocks {num_bytes / 2**20:7.1f} MiB  read {read * 1e3:8.2f} ms "
                f"({rows[-1]['read_gbps']:6.2f} GB/s)  verify {verify * 1e3:7.2f} ms  "
                f"handle {made * 1e3:7.2f} ms",
                flush=True,
            )
    finally:
        stop()
        puller.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["nixl", "ray"])
    args = parser.parse_args()
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    block_bytes = _pool(1, LAYOUT).numel() * 2
    floor = memcpy_gbps(max(args.blocks) * block_bytes, args.repeats)
    print(f"memcpy floor: {floor:.2f} GB/s")
    rows = []
    for backend in args.backends:
        if backend == "ray":
            import ray

            ray.init(
                num_cpus=2,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                object_store_memory=4 * 2**30,
            )
        rows += bench_backend(backend, args.blocks, LAYOUT, args.repeats)
    for row in rows:
        row["read_vs_memcpy"] = (row["bytes"] / floor / 1e9) / row["read_s"]  # 1.0 = memcpy speed
        row["handoff_s"] = row["handle_s"] + row["pull_s"]  # owner's handle + read + verify
        row["handoff_gbps"] = row["bytes"] / row["handoff_s"] / 1e9
    path = write_result(
        "kv_handoff_cpu",
        {
            "block_layout": list(LAYOUT),
            "block_dtype": "bfloat16",
            "block_bytes": block_bytes,
            "memcpy_gbps": floor,
            "ucx_net_devices": os.environ.get("UCX_NET_DEVICES"),
            "rows": rows,
            "note": "read = transfer into the puller's pool; verify = per-block checksums of the pulled blocks; "
            "handle = owner side (checksums, and for ray the copy into the object store); "
            "handoff = handle + read + verify, what a request waits for; "
            "read_vs_memcpy = memcpy time of the same bytes / read time",
        },
    )
    print(path)


if __name__ == "__main__":
    main()
