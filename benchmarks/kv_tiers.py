"""KV tiers below HBM: block bandwidth of the DRAM and SSD tiers against plain copies of the same bytes,
and time to first token for a long shared prefix served from each tier against recomputing it.

    python -m benchmarks.kv_tiers [--blocks 64] [--prompt-len 1008] [--ssd-dir /tmp/x] [--no-service]

Bandwidth uses 2 MiB blocks (Llama-3-8B bf16, 16 tokens): write-through (one batched offload), offload at
eviction (one block at a time), load (one batched call), SSD. TTFT uses the `small` model of the offline
benchmark with an engine pool too small to keep the prefix, so the second request finds it in DRAM (or,
with a small DRAM tier, on SSD). The service section starts a local Ray cluster: worker A serves the
prompt and evicts it into the node's KV memory service, worker B (another process, never saw it) serves
it from the service over shared memory and over NIXL, against recomputing it. benchmarks/gpu_kv_tiers.py is
the H200 version with a Llama-3-8B-shaped model.
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
from engine.envs import local_cluster_env
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
    downs, writes = [], []
    for _ in range(3):  # each round into a fresh tier: a put of a present hash is a no-op
        dram = DramTier(num_blocks, BLOCK_BYTES)
        _sync()
        t0 = time.perf_counter()
        for i, h in enumerate(hashes):  # offload at eviction: one block at a time
            dram.put(h, pool[i])
        _sync()
        downs.append(time.perf_counter() - t0)
        through = TieredKVStore(DramTier(num_blocks, BLOCK_BYTES))
        t0 = time.perf_counter()
        through.offload(hashes, [0] * num_blocks, pool, list(range(num_blocks)))  # write-through: one batch
        through.flush()
        writes.append(time.perf_counter() - t0)
        through.close()
    down, write_through = statistics.median(downs), statistics.median(writes)
    store = TieredKVStore(dram)
    scattered = list(range(num_blocks - 1, -1, -1))  # the engine's free blocks are not in order
    up = _timed(lambda: store.load(hashes, pool, scattered))  # what the engine's loader calls
    ssd = SsdTier(ssd_dir, num_blocks, BLOCK_BYTES)
    data = [host[i].numpy().tobytes() for i in range(num_blocks)]
    t0 = time.perf_counter()
    for h, d in zip(hashes, data, strict=True):
        ssd.put(h, d)
    ssd_write = time.perf_counter() - t0
    os.posix_fadvise(os.open(os.path.join(ssd_dir, "slab.bin"), os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    ssd_read = _timed(
        lambda: [
            pool[i].copy_(torch.frombuffer(bytearray(ssd.get(h)), dtype=torch.uint8))
            for i, h in enumerate(hashes)
        ],
        repeats=1,
    )
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
    return {
        "device": device,
        "blocks": num_blocks,
        "bytes": total,
        "pool_to_host_copy_gbps": gbps(plain_down),
        "dram_put_gbps": gbps(down),
        "write_through_gbps": gbps(write_through),
        "write_through_vs_copy": plain_down / write_through,
        "dram_load_to_pool_gbps": gbps(up),
        "dram_load_vs_copy": plain_down / up,
        "dram_put_vs_copy": plain_down / down,
        "ssd_put_gbps": gbps(ssd_write),
        "ssd_get_to_pool_gbps": gbps(ssd_read),
        "plain_file_write_fsync_gbps": gbps(plain_write),
        "plain_file_read_gbps": gbps(plain_read),
        "ssd_put_vs_plain_write": plain_write / ssd_write,
        "ssd_get_vs_plain_read": plain_read / ssd_read,
        "note": "ssd reads may hit the page cache (fadvise DONTNEED is advisory)",
    }


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
            dram = DramTier(
                4 * num_blocks if tier == "dram" else 8, block_bytes
            )  # "dram" holds prompt and filler
            ssd = (
                SsdTier(os.path.join(ssd_dir, f"ttft-{prompt_len}"), 4 * num_blocks, block_bytes)
                if tier == "ssd"
                else None
            )
            store = TieredKVStore(dram, ssd)
        llm = LLM(path, num_blocks=num_blocks, kv_store=store)
        times = []
        for _ in range(3):
            llm.generate([prompt], params)
            llm.generate([filler], params)  # pushes the prompt's blocks out of the pool
            if store is not None and store.ssd is not None:
                llm.engine.offloader.drain()
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


def service_ttft(path: str, prompt_len: int) -> dict:
    """TTFT on worker B for a prompt worker A evicted into the node's KV memory service (Ray actors)."""
    os.environ.update(local_cluster_env())
    import ray

    from services.kv_memory.service import shutdown_services

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    prompt = [(7 * i) % 300 + 4 for i in range(prompt_len)]
    filler = [(11 * i) % 300 + 4 for i in range(prompt_len)]
    engine = {"num_blocks": prompt_len // 16 + 2, "max_model_len": prompt_len + 16}
    out = {}
    try:
        worker = ray.remote(num_cpus=0)(_ServiceWorker)
        for path_name, use_shm in (("shm", True), ("nixl", False)):
            tiers = {
                "dram_blocks": 8 * engine["num_blocks"],
                "service": True,
                "staging_blocks": 256,
                "use_shm": use_shm,
            }
            a, b = worker.remote(path, engine, tiers), worker.remote(path, engine, tiers)
            times, recompute, computed = [], [], None
            for i in range(3):
                ray.get(b.run.remote(filler), timeout=600)  # b's pool holds the filler, not the prompt
                ray.get(
                    a.run.remote([(t + 1 + i) % 380 for t in prompt]), timeout=600
                )  # a fresh prompt each round
                ray.get(a.run.remote(filler), timeout=600)  # a evicts it into the service
                ray.get(a.flush.remote(), timeout=600)
                s, computed = ray.get(b.run.remote([(t + 1 + i) % 380 for t in prompt]), timeout=600)
                times.append(s)
                recompute.append(
                    ray.get(b.run.remote([(t + 150 + i) % 380 for t in prompt]), timeout=600)[0]
                )  # never seen
            out[path_name] = {
                "ttft_s": statistics.median(times),
                "prompt_tokens_computed": computed,
                "recompute_ttft_s": statistics.median(recompute),
                "vs_recompute": statistics.median(times) / statistics.median(recompute),
                "worker_b": ray.get(b.stats.remote()),
            }
            for w in (a, b):
                ray.get(w.close.remote(), timeout=60)
                ray.kill(w)
            shutdown_services()
    finally:
        shutdown_services()
        ray.shutdown()
    return out


class _ServiceWorker:
    def __init__(self, path: str, engine: dict, tiers: dict):
        from services.engine_worker import EngineWorker
        from services.messages.pools import TierSettings

        self.worker = EngineWorker(path, engine, kv_transport="nixl", kv_tiers=TierSettings(**tiers))

    async def run(self, prompt: list[int]) -> tuple[float, int]:
        from engine.sampling_params import SamplingParams

        engine = self.worker.engine
        before = engine.stats.prompt_tokens_computed
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        t0 = time.perf_counter()
        async for _ in self.worker.llm.generate(self.worker.llm.new_request_id(), prompt, params):
            pass
        return time.perf_counter() - t0, engine.stats.prompt_tokens_computed - before

    def flush(self) -> None:
        self.worker.engine.offloader.drain()
        self.worker.kv_store.flush()

    def stats(self) -> dict:
        return self.worker.snapshot()["kv_store"]

    def close(self) -> None:
        self.worker.__del__()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1008)
    parser.add_argument("--ssd-dir", default=None)
    parser.add_argument("--no-service", action="store_true", help="skip the Ray KV memory service section")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.ssd_dir) as tmp:
        bw = bandwidth(args.blocks, os.path.join(tmp, "bw"))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in bw.items()}, flush=True)
        path = str(make_tiny_model(f"{tmp}/small", "llama", max_position_embeddings=2048, **SIZES["small"]))
        first = ttft(path, args.prompt_len, tmp)
        print(first, flush=True)
        service = None if args.no_service else service_ttft(path, args.prompt_len)
        print(service, flush=True)
    out = os.environ.get("OUT")
    name = "kv_tiers_gpu" if torch.cuda.is_available() else "kv_tiers_cpu"
    print(
        write_result(
            name,
            {
                "bandwidth": bw,
                "ttft_long_prefix": first,
                "ttft_from_node_service": service,
                "prompt_len": args.prompt_len,
                "model": "small (512 hidden, 6 layers)",
            },
            out_dir=__import__("pathlib").Path(out) if out else None,
        )
    )


if __name__ == "__main__":
    main()
