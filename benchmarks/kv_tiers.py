"""KV tiers below HBM: block bandwidth of the DRAM and SSD tiers against plain copies of the same bytes,
and time to first token for a long shared prefix served from each tier against recomputing it.

    python -m benchmarks.kv_tiers [--blocks 64] [--prompt-len 1008] [--ssd-dir /tmp/x]

Bandwidth uses 2 MiB blocks (Llama-3-8B bf16, 16 tokens). TTFT uses the `small` model of the offline
benchmark with an engine pool too small to keep the prefix, so the second request finds it in DRAM (or, with
a one-block DRAM tier, on SSD). Runs on the CPU here and on a GPU (the pool in HBM) unchanged.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from benchmarks.engine_offline import SIZES
from benchmarks.results_io import write_result
from engine import LLM, SamplingParams
from engine.tiny_model import make_tiny_model
from services.kv_memory.dram_tier import DramTier
from services.kv_memory.ssd_tier import SsdTier
from services.kv_memory.tiered_store import TieredKVStore

BLOCK_BYTES = 2 * 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int = 3) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(num_blocks: int, ssd_dir: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pool = torch.randint(0, 256, (num_blocks, BLOCK_BYTES), dtype=torch.uint8, device=device)  # "HBM"
    host = torch.empty((num_blocks, BLOCK_BYTES), dtype=torch.uint8, pin_memory=device == "cuda")
    total = num_blocks * BLOCK_BYTES
    plain_down = _timed(lambda: host.copy_(pool))  # one large copy: the floor
    hashes = [i.to_bytes(16, "little") for i in range(num_blocks)]
    downs = []
    for _ in range(3):  # each round into a fresh tier: a put of a present hash is a no-op
        dram = DramTier(num_blocks, BLOCK_BYTES)
        _sync()
        t0 = time.perf_counter()
        for i, h in enumerate(hashes):
            dram.put(h, pool[i])
        _sync()
        downs.append(time.perf_counter() - t0)
    down = statistics.median(downs)
    up = _timed(lambda: [dram.copy_into(h, pool[i]) for i, h in enumerate(hashes)])  # what the engine uses
    ssd = SsdTier(ssd_dir, num_blocks, BLOCK_BYTES)
    data = [host[i].numpy().tobytes() for i in range(num_blocks)]
    t0 = time.perf_counter()
    for h, d in zip(hashes, data, strict=True):
        ssd.put(h, d)
    ssd_write = time.perf_counter() - t0
    os.posix_fadvise(os.open(os.path.join(ssd_dir, "slab.bin"), os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    ssd_read = _timed(lambda: [pool[i].copy_(torch.frombuffer(bytearray(ssd.get(h)), dtype=torch.uint8))
                               for i, h in enumerate(hashes)], repeats=1)
    path = os.path.join(ssd_dir, "plain.bin")
    with open(path, "wb") as f:  # the floor for the SSD: one large write + fsync, one large read
        t0 = time.perf_counter()
        f.write(b"".join(data))
        f.flush()
        os.fsync(f.fileno())
        plain_write = time.perf_counter() - t0
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        f.read()
        plain_read = time.perf_counter() - t0
    ssd.close()
    gbps = lambda s: total / s / 1e9  # noqa: E731
    return {"device": device, "blocks": num_blocks, "bytes": total,
            "pool_to_host_copy_gbps": gbps(plain_down), "dram_put_gbps": gbps(down), "dram_get_to_pool_gbps": gbps(up),
            "dram_put_vs_copy": plain_down / down, "ssd_put_gbps": gbps(ssd_write), "ssd_get_to_pool_gbps": gbps(ssd_read),
            "plain_file_write_fsync_gbps": gbps(plain_write), "plain_file_read_gbps": gbps(plain_read),
            "ssd_put_vs_plain_write": plain_write / ssd_write, "ssd_get_vs_plain_read": plain_read / ssd_read,
            "note": "ssd reads may hit the page cache (fadvise DONTNEED is advisory)"}


def ttft(path: str, prompt_len: int, ssd_dir: str) -> dict:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompt = [(7 * i) % 300 + 4 for i in range(prompt_len)]
    filler = [(11 * i) % 300 + 4 for i in range(prompt_len)]
    num_blocks = prompt_len // 16 + 2  # holds one prompt, not two
    out = {}
    for tier in ("recompute", "dram", "ssd"):
        store = None
        if tier != "recompute":
            llm0 = LLM(path, num_blocks=1)
            block_bytes = llm0.engine.kv_pool[0].numel() * llm0.engine.kv_pool.element_size()
            dram = DramTier(4 * num_blocks if tier == "dram" else 1, block_bytes)  # holds prompt and filler
            ssd = SsdTier(os.path.join(ssd_dir, f"ttft-{prompt_len}"), 4 * num_blocks, block_bytes) \
                if tier == "ssd" else None
            store = TieredKVStore(dram, ssd)
        llm = LLM(path, num_blocks=num_blocks, kv_store=store)
        times = []
        for _ in range(3):
            llm.generate([prompt], params)
            llm.generate([filler], params)  # pushes the prompt's blocks out of the pool
            if store is not None and store.ssd is not None:
                store.flush()
            before = llm.engine.stats.prompt_tokens_computed
            t0 = time.perf_counter()
            llm.generate([prompt], params)
            _sync()
            times.append(time.perf_counter() - t0)
            computed = llm.engine.stats.prompt_tokens_computed - before
        out[tier] = {"ttft_s": statistics.median(times), "prompt_tokens_computed": computed}
        if store is not None:
            store.close()
    for tier in ("dram", "ssd"):
        out[tier]["vs_recompute"] = out[tier]["ttft_s"] / out["recompute"]["ttft_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1008)
    parser.add_argument("--ssd-dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.ssd_dir) as tmp:
        bw = bandwidth(args.blocks, os.path.join(tmp, "bw"))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in bw.items()}, flush=True)
        path = str(make_tiny_model(f"{tmp}/small", "llama", max_position_embeddings=2048, **SIZES["small"]))
        first = ttft(path, args.prompt_len, tmp)
        print(first, flush=True)
    out = os.environ.get("OUT")
    name = "kv_tiers_gpu" if torch.cuda.is_available() else "kv_tiers_cpu"
    print(write_result(name, {"bandwidth": bw, "ttft_long_prefix": first, "prompt_len": args.prompt_len,
                              "model": "small (512 hidden, 6 layers)"},
                       out_dir=__import__("pathlib").Path(out) if out else None))


if __name__ == "__main__":
    main()
