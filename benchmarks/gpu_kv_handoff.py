"""KV handoff between two processes on one GPU through the NIXL transport (VRAM pools), checked byte for
byte and timed against a device-to-device torch copy of the same bytes in the same run.

    python -m benchmarks.gpu_kv_handoff [--blocks 1 16 64 256]

The owner process holds a bf16 pool of Llama-3-8B-sized blocks (2 MiB); this process pulls handles into
its own pool. Also checks that the GPU checksum (wsum64) catches a corrupted block. Needs CUDA and NIXL;
no Ray.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from benchmarks.results_io import write_result

LAYOUT = (32, 2, 16, 8, 128)


def _pool(num_blocks: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn((num_blocks, *LAYOUT), generator=gen, device=device).to(torch.bfloat16)


def _owner(conn, num_blocks: int, busy_progress: bool) -> None:
    from services.transport.nixl_backend import NixlTransport

    transport = NixlTransport(busy_progress=busy_progress)
    pool = _pool(num_blocks, "cuda")
    transport.register(pool)
    while (command := conn.recv()) is not None:
        kind, ids = command
        if kind == "corrupt":
            pool[ids[0]].view(-1)[3] += 1
            conn.send(True)
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        handle = transport.handle(ids, num_tokens=len(ids) * LAYOUT[2])
        conn.send((handle, time.perf_counter() - t0))
        transport.take_released()
    transport.close()


def d2d_gbps(num_bytes: int, repeats: int = 10) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy-progress", action="store_true", help="NIXL's own spinning progress thread")
    parser.add_argument("--no-ipc", action="store_true", help="force the UCX read (no CUDA IPC data path)")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args()
    from services.transport import TransferError
    from services.transport.checksum import block_checksums
    from services.transport.nixl_backend import NixlTransport

    n_max = max(args.blocks)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(there, n_max, args.busy_progress), daemon=True)
    proc.start()
    puller = NixlTransport(busy_progress=args.busy_progress, use_cuda_ipc=not args.no_ipc)
    puller.register(torch.zeros((n_max, *LAYOUT), dtype=torch.bfloat16, device="cuda"))
    expected = _pool(n_max, "cuda")
    floor = d2d_gbps(n_max * expected[0].numel() * 2)
    rows = []
    for n in args.blocks:
        ids = list(range(n))
        dst = list(range(n_max - n, n_max))  # land in other slots than the source's
        reads = []
        for _ in range(args.repeats + 1):
            here.send(("handle", ids))
            handle, handle_s = here.recv()
            puller.pool[dst] = 0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            puller._read(handle, dst, 120.0)
            torch.cuda.synchronize()
            reads.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            ok = block_checksums(puller.pool, dst, handle.checksum_algorithm) == handle.checksums
            verify_s = time.perf_counter() - t1
            exact = torch.equal(puller.pool[dst], expected[ids])
            puller.release(handle)
        read = statistics.median(reads[1:])
        rows.append({"path": puller.path_for(handle.source), "blocks": n, "bytes": handle.num_bytes, "read_s": read, "verify_s": verify_s,
                     "handle_s": handle_s, "read_gbps": handle.num_bytes / read / 1e9,
                     "read_vs_d2d_copy": (handle.num_bytes / floor / 1e9) / read,
                     "checksums_match": ok, "bytes_equal": exact})
        print(rows[-1], flush=True)
    here.send(("corrupt", [0]))
    here.recv()
    here.send(("handle", [0, 1]))
    stale, _ = here.recv()  # checksums taken after the corruption: a fresh pull verifies
    stale.checksums[0] ^= 1  # now claim the old content: the pull must fail
    try:
        puller.pull(stale, [5, 6])
        caught = False
    except TransferError:
        caught = True
    here.send(None)
    proc.join(timeout=30)
    puller.close()
    print({"d2d_copy_gbps": floor, "corruption_caught": caught})
    path = write_result("gpu_kv_handoff" + args.tag, {
        "layout": list(LAYOUT), "dtype": "bfloat16", "d2d_copy_gbps": floor, "rows": rows,
        "corruption_caught": caught, "ucx_tls": os.environ.get("UCX_TLS"), "busy_progress": args.busy_progress,
        "note": "two processes on one GPU, NIXL READ VRAM->VRAM via UCX; read_vs_d2d_copy = time of a "
                "torch device-to-device copy of the same bytes / read time"},
        out_dir=__import__("pathlib").Path(os.environ["OUT"]) if "OUT" in os.environ else None)
    print(path)


if __name__ == "__main__":
    main()
