"""KV block transfers between two processes through the KV transport, on every path one GPU host offers,
each checked byte for byte and timed against a torch copy of the same bytes in the same run.

    python -m benchmarks.gpu_kv_transfer [--blocks 1 16 128 1024] [--paths ...]

Paths (owner pool -> puller pool): gpu->gpu over CUDA IPC (what the transport picks on one host),
gpu->gpu, host->gpu, gpu->host and host->host over NIXL/UCX. Host pools are pinned. Blocks are
Llama-3-8B-sized (bf16, 32 layers x 2 x 16 tokens x 8 heads x 128 = 2 MiB). Needs CUDA and NIXL; no Ray.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.results_io import write_result

LAYOUT = (32, 2, 16, 8, 128)
PATHS = {  # name: (owner device, puller device, use CUDA IPC)
    "gpu->gpu cuda_ipc": ("cuda", "cuda", True),
    "gpu->gpu ucx": ("cuda", "cuda", False),
    "host->gpu ucx": ("cpu", "cuda", False),
    "gpu->host ucx": ("cuda", "cpu", False),
    "host->host ucx": ("cpu", "cpu", False),
    # two GPUs (the prefill process on GPU0, the decode process on GPU1)
    "gpu0->gpu1 cuda_ipc": ("cuda:0", "cuda:1", True),
    "gpu0->gpu1 ucx": ("cuda:0", "cuda:1", False),
    "host->gpu1 ucx": ("cpu", "cuda:1", False),
    "gpu0->host ucx": ("cuda:0", "cpu", False),
}


def _sync(*devices: str) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def _pool(num_blocks: int, device: str) -> torch.Tensor:
    pool = torch.randn((num_blocks, *LAYOUT), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return pool.to(device) if device.startswith("cuda") else pool.pin_memory()


def _owner(conn, num_blocks: int, device: str, busy: bool) -> None:
    from services.transport.nixl_backend import NixlTransport

    transport = NixlTransport(busy_progress=busy)
    transport.register(_pool(num_blocks, device))
    while (ids := conn.recv()) is not None:
        conn.send(transport.handle(ids, num_tokens=len(ids) * LAYOUT[2]))
        transport.take_released()
    transport.close()


def torch_copy_gbps(num_bytes: int, src: str, dst: str, repeats: int = 5) -> float:
    def buffer(device: str) -> torch.Tensor:
        t = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        return t if device.startswith("cuda") else t.pin_memory()

    a, b = buffer(src), buffer(dst)
    b.copy_(a, non_blocking=True)
    _sync(src, dst)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a, non_blocking=True)
        _sync(src, dst)
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times) / 1e9


def bench_path(
    name: str, sizes: list[int], repeats: int, busy: bool, isolate: str | None = None
) -> list[dict]:
    """isolate: the physical GPU the owner alone sees (CUDA_VISIBLE_DEVICES), as Ray gives each replica its
    own; this process is then started seeing only the puller's GPU, and both use cuda:0."""
    from services.transport.checksum import block_checksums
    from services.transport.nixl_backend import NixlTransport

    owner_dev, puller_dev, ipc = PATHS[name]
    if isolate is not None:
        owner_dev, puller_dev = (d if d == "cpu" else "cuda:0" for d in (owner_dev, puller_dev))
    n_max = max(sizes)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if isolate is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = isolate  # the child reads it when it starts
    proc = ctx.Process(target=_owner, args=(there, n_max, owner_dev, busy), daemon=True)
    proc.start()
    if isolate is not None:
        os.environ.pop("CUDA_VISIBLE_DEVICES") if saved is None else os.environ.update(
            CUDA_VISIBLE_DEVICES=saved
        )
    puller = NixlTransport(busy_progress=busy, use_cuda_ipc=ipc)
    puller.register(_pool(n_max, puller_dev).zero_())
    expected = _pool(n_max, puller_dev)
    block_bytes = expected[0].numel() * 2
    # one process cannot see both GPUs when isolated: the floor comes from the run that can
    floor = (
        None
        if isolate is not None and owner_dev == puller_dev != "cpu"
        else torch_copy_gbps(n_max * block_bytes, owner_dev, puller_dev)
    )
    rows = []
    try:
        for n in sizes:
            ids, dst = list(range(n)), list(range(n_max - n, n_max))  # other slots than the source's
            reads, verifies = [], []
            for _ in range(repeats + 1):
                here.send(ids)
                handle = here.recv()
                puller.pool[dst] = 0
                _sync(owner_dev, puller_dev)  # the zeroing must not count as transfer time
                t0 = time.perf_counter()
                puller._read(handle, dst, 300.0)
                _sync(puller_dev)
                t1 = time.perf_counter()
                ok = block_checksums(puller.pool, dst, handle.checksum_algorithm) == handle.checksums
                _sync(puller_dev)
                reads.append(t1 - t0)
                verifies.append(time.perf_counter() - t1)
                puller.release(handle)
            read, verify = statistics.median(reads[1:]), statistics.median(verifies[1:])
            num_bytes = n * block_bytes
            rows.append(
                {
                    "path": name + (f" (owner sees only GPU {isolate})" if isolate is not None else ""),
                    "busy_progress": busy,
                    "taken": puller.path_for(handle.source),
                    "blocks": n,
                    "bytes": num_bytes,
                    "read_s": read,
                    "verify_s": verify,
                    "read_gbps": num_bytes / read / 1e9,
                    "torch_copy_gbps": floor,
                    "fraction_of_torch_copy": num_bytes / read / 1e9 / floor if floor else None,
                    "checksums_match": ok,
                    "bytes_equal": torch.equal(puller.pool[dst], expected[ids]),
                }
            )
            print({k: round(v, 5) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    finally:
        here.send(None)
        proc.join(timeout=30)
        puller.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument(
        "--busy-paths",
        nargs="*",
        default=["gpu->gpu cuda_ipc"],
        choices=list(PATHS),
        help="paths measured again with NIXL's spinning progress thread on both sides",
    )
    parser.add_argument(
        "--isolate",
        default=None,
        help="the owner sees only this physical GPU (start this "
        "process with CUDA_VISIBLE_DEVICES set to the puller's)",
    )
    parser.add_argument("--name", default="kv_transfer_gpu")
    args = parser.parse_args()
    rows = []
    for name in args.paths:
        rows += bench_path(name, args.blocks, args.repeats, busy=False, isolate=args.isolate)
    for name in args.busy_paths:
        rows += bench_path(name, args.blocks, args.repeats, busy=True, isolate=args.isolate)
    out = Path(os.environ["OUT"]) if "OUT" in os.environ else None
    two = any(":" in PATHS[p][0] + PATHS[p][1] for p in args.paths)
    path = write_result(
        args.name,
        {
            "layout": list(LAYOUT),
            "dtype": "bfloat16",
            "gpus": torch.cuda.device_count(),
            "processes": ("owner on GPU0, puller on GPU1" if two else "owner and puller on the same GPU")
            + (f"; each process sees only its own GPU (owner: {args.isolate})" if args.isolate else ""),
            "rows": rows,
            "note": "read = the transport's data movement into the puller's pool (CUDA IPC copies "
            "or a NIXL READ); busy_progress = NIXL's own spinning progress thread instead of Ridgeline's 1 ms "
            "poll; verify = per-block checksums of the pulled blocks; torch_copy_gbps = a torch copy "
            "of the same bytes in one process between the same kinds of memory (host memory pinned)",
        },
        out_dir=out,
    )
    print(path)


if __name__ == "__main__":
    main()
