"""KV tiers on a GPU: block moves between HBM and the DRAM / SSD tiers against plain copies of the same
bytes measured in the same run, and time to first token for a long shared prefix of a Llama-3-8B-shaped
model served from each tier against recomputing it.

    python -m benchmarks.gpu_kv_tiers [--prompt-lens 2048 6144] [--ssd-dir DIR]

Block moves use Llama-3-8B blocks (32 layers x K/V x 16 tokens x 8 heads x 128, bf16 = 2 MiB):
- write-through: HBM -> pinned DRAM tier, one batch of async copies on a side stream (what the engine
  does after each step for the blocks it completed); offload at eviction: one block at a time,
  synchronous (the fallback for blocks write-through could not place);
- load: DRAM tier -> HBM through `TieredKVStore.load` (one batched call: async DMAs on a side stream),
  into scattered blocks (the engine's free blocks are not contiguous);
- shm: the KV memory service's path on one host: another process owns the pool in a shared-memory file,
  this process maps and page-locks it and copies blocks to HBM;
- ssd: SSD tier -> HBM (reads past a one-block DRAM tier).
TTFT runs one engine (dummy weights, CUDA graphs) and swaps stores: recompute, DRAM, SSD with every held
block loaded (forced), and SSD with the engine's choice (load only what is faster than computing it).
"""

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_engine import LLAMA3_8B, write_model_dir
from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs
from benchmarks.results_io import write_result
from services.kv_memory import shm
from services.kv_memory.dram_tier import DramTier
from services.kv_memory.ssd_tier import SsdTier
from services.kv_memory.tiered_store import TieredKVStore
from services.transport.block_copy import copy_blocks

BLOCK_SHAPE = (32, 2, 16, 8, 128)
BLOCK_BYTES = 2 * 2**20
SIZES = (1, 16, 128, 1024)


def _timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floors() -> dict:
    n = 256 * 2**20
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    return {
        "h2d_pinned_gbps": n / _timed(lambda: dev.copy_(pinned, non_blocking=True)) / 1e9,
        "d2h_pinned_gbps": n / _timed(lambda: pinned.copy_(dev, non_blocking=True)) / 1e9,
        "h2d_pageable_gbps": n / _timed(lambda: dev.copy_(pageable)) / 1e9,
        "device_copy_gbps": copy_bandwidth_GBps(1.0),
        "matmul_tflops": matmul_TFLOPs(),
        "copy_bytes": n,
    }


def _pattern(pool: torch.Tensor, start: int = 0) -> None:
    """Block i of a [n, BLOCK_BYTES] uint8 pool gets words w*7 + i: distinct per block, cheap to make."""
    words = pool.view(torch.int32)
    ramp = torch.arange(words.shape[1], dtype=torch.int32, device=pool.device) * 7
    for i in range(words.shape[0]):
        words[i] = ramp + (start + i)


def _shm_owner(path: str, blocks: int, ready, done) -> None:
    pool = shm.create(path, blocks, BLOCK_BYTES, pin=True)
    _pattern(pool)
    ready.set()
    done.wait(600)
    shm.remove(path, pool)


def block_moves(ssd_dir: str) -> dict:
    n_max = max(SIZES)
    hbm = torch.empty((2 * n_max, BLOCK_BYTES), dtype=torch.uint8, device="cuda")
    _pattern(hbm[:n_max])
    rng = torch.Generator().manual_seed(0)
    scattered = (n_max + torch.randperm(n_max, generator=rng)).tolist()  # destinations: not contiguous
    hashes = [i.to_bytes(16, "little") for i in range(n_max)]
    rows = []

    dram = DramTier(n_max, BLOCK_BYTES, pin=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, h in enumerate(hashes):  # the engine's on_evict: one block per eviction
        dram.put(h, hbm[i])
    torch.cuda.synchronize()
    offload_s = time.perf_counter() - t0
    store = TieredKVStore(dram)
    for n in SIZES:
        dst = scattered[:n]
        s = _timed(lambda n=n, dst=dst: store.load(hashes[:n], hbm, dst))
        ok = torch.equal(hbm[dst], hbm[:n])
        rows.append(
            {
                "path": "dram_to_hbm",
                "blocks": n,
                "seconds": s,
                "gbps": n * BLOCK_BYTES / s / 1e9,
                "correct": ok,
            }
        )
    for n in SIZES:  # write-through: one batch per step, async on a side stream, committed when landed
        wt = TieredKVStore(DramTier(n, BLOCK_BYTES, pin=True))
        side = torch.cuda.Stream()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        taken = wt.offload(hashes[:n], [0] * n, hbm, list(range(n)), side)
        wt.flush()
        s = time.perf_counter() - t0
        ok = all(taken) and torch.equal(wt.dram.pool[wt.dram._slots[hashes[n - 1]]].cuda(), hbm[n - 1])
        rows.append(
            {
                "path": "hbm_to_dram_write_through",
                "blocks": n,
                "seconds": s,
                "gbps": n * BLOCK_BYTES / s / 1e9,
                "correct": ok,
            }
        )
        wt.close()
    rows.append(
        {
            "path": "hbm_to_dram_offload_at_eviction",
            "blocks": n_max,
            "seconds": offload_s,
            "gbps": n_max * BLOCK_BYTES / offload_s / 1e9,
            "correct": torch.equal(dram.pool[dram._slots[hashes[5]]].cuda(), hbm[5]),
        }
    )

    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    path = os.path.join(shm.SHM_DIR, f"ridgeline-bench-{os.getpid()}")
    owner = None
    if shm.fits(n_max * BLOCK_BYTES):
        owner = ctx.Process(target=_shm_owner, args=(path, n_max, ready, done))
        owner.start()
        assert ready.wait(300), "shm owner did not start"
        mapped = shm.open_pool(path, n_max, BLOCK_BYTES)  # page-locked here with cudaHostRegister
        side = torch.cuda.Stream()
        for n in SIZES:
            dst = scattered[:n]
            hbm[dst] = 0
            torch.cuda.synchronize()  # the side stream does not wait for the default one
            s = _timed(lambda n=n, dst=dst: copy_blocks(mapped, list(range(n)), hbm, dst, side))
            rows.append(
                {
                    "path": "shm_other_process_to_hbm",
                    "blocks": n,
                    "seconds": s,
                    "gbps": n * BLOCK_BYTES / s / 1e9,
                    "correct": torch.equal(hbm[dst], hbm[:n]),
                }
            )
        shm.unpin(mapped)  # the owner removes the file
        done.set()
        owner.join(60)
    else:
        rows.append({"path": "shm_other_process_to_hbm", "skipped": "/dev/shm too small"})

    ssd = SsdTier(os.path.join(ssd_dir, "bw"), n_max, BLOCK_BYTES)
    host = hbm[:n_max].cpu()
    t0 = time.perf_counter()
    for i, h in enumerate(hashes):
        ssd.put(h, host[i].numpy())
    ssd_write_s = time.perf_counter() - t0
    ssd_store = TieredKVStore(
        DramTier(256, BLOCK_BYTES, pin=True), ssd
    )  # smaller than the reads: SSD serves them
    for n in (16, 128, n_max):
        fd = os.open(os.path.join(ssd_dir, "bw", "slab.bin"), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        dst = scattered[:n]
        hbm[dst] = 0
        for h in hashes:  # nothing of it in DRAM
            ssd_store.dram.discard(h)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = ssd_store.load(hashes[:n], hbm, dst)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append(
            {
                "path": "ssd_to_hbm",
                "blocks": n,
                "seconds": s,
                "gbps": n * BLOCK_BYTES / s / 1e9,
                "correct": got == n and torch.equal(hbm[dst], hbm[:n]),
            }
        )
    plain = os.path.join(ssd_dir, "plain.bin")
    with open(plain, "wb") as f:
        t0 = time.perf_counter()
        f.write(host.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
        plain_write_s = time.perf_counter() - t0
    fd = os.open(plain, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    with open(plain, "rb") as f:
        t0 = time.perf_counter()
        f.read()
        plain_read_s = time.perf_counter() - t0
    plain_parallel_s = _parallel_read(plain, n_max * BLOCK_BYTES)
    ssd_store.close()
    total = n_max * BLOCK_BYTES
    return {
        "rows": rows,
        "ssd_put_gbps": total / ssd_write_s / 1e9,
        "plain_write_fsync_gbps": total / plain_write_s / 1e9,
        "plain_read_gbps": total / plain_read_s / 1e9,
        "plain_read_8_threads_gbps": total / plain_parallel_s / 1e9,
    }


def _parallel_read(path: str, size: int, threads: int = 8) -> float:
    """The SSD floor for parallel reads: 8 threads preadv 2 MiB pieces of one file into one buffer."""
    from concurrent.futures import ThreadPoolExecutor

    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = memoryview(bytearray(size))
    offsets = range(0, size, BLOCK_BYTES)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda off: os.preadv(fd, [buf[off : off + BLOCK_BYTES]], off), offsets))
    seconds = time.perf_counter() - t0
    os.close(fd)
    return seconds


def ttft(
    model_dir: Path,
    prompt_lens: list[int],
    ssd_dir: str,
    tiers: tuple[str, ...] = ("recompute", "dram", "ssd_forced", "ssd_auto"),
) -> list[dict]:
    from engine import LLMEngine, SamplingParams
    from engine.kv.block_hash import update_block_hashes
    from engine.llm_engine import ready_store
    from engine.request import EngineRequest, Request

    longest = max(prompt_lens)
    num_blocks = longest // 16 + 4
    if (num_blocks - 1) * 16 >= LLAMA3_8B["max_position_embeddings"]:
        raise ValueError(
            f"prompt-lens: at most {LLAMA3_8B['max_position_embeddings'] - 80} (the filler must fit)"
        )
    engine = LLMEngine.from_pretrained(
        str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=LLAMA3_8B["max_position_embeddings"],
        num_blocks=num_blocks,
        max_num_batched_tokens=8192,
        max_num_seqs=8,
    )
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    filler = [(11 * i) % 120000 + 5 for i in range((num_blocks - 1) * 16)]  # takes the whole pool

    steps: list[tuple] = []  # the last run's steps: (ms since add, ms the step took, tokens, loading)

    def run(prompt: list[int]) -> tuple[float, list[int], int]:
        before = engine.stats.prompt_tokens_computed
        rid = f"r{time.monotonic_ns()}"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_request(EngineRequest(rid, prompt, one, stream=False))
        outs = []
        steps.clear()
        while engine.has_unfinished_requests():
            s0 = time.perf_counter()
            tokens0 = engine.stats.scheduled_tokens
            outs += engine.step()
            steps.append(
                (
                    round((s0 - t0) * 1e3, 2),
                    round((time.perf_counter() - s0) * 1e3, 2),
                    engine.stats.scheduled_tokens - tokens0,
                    engine.scheduler.num_loading,
                )
            )
        torch.cuda.synchronize()
        return (
            time.perf_counter() - t0,
            outs[-1].outputs[0].token_ids,
            engine.stats.prompt_tokens_computed - before,
        )

    block_bytes = engine.kv_pool[0].numel() * engine.kv_pool.element_size()

    def engine_hashes(prompt: list[int]) -> list[bytes]:
        probe = Request("probe", prompt, one, hash_extra=engine._hash_extra(None))
        update_block_hashes(probe, engine.block_manager.block_size)
        return probe.block_hashes

    rows = []
    for prompt_len in prompt_lens:
        prompt = [(7 * i) % 120000 + 5 for i in range(prompt_len)]
        reference = None
        for tier in tiers:
            store = None
            if tier == "dram":
                store = TieredKVStore(DramTier(2 * num_blocks, block_bytes, pin=True))
            elif tier.startswith("ssd"):
                store = TieredKVStore(
                    DramTier(64, block_bytes, pin=True),  # the prompt's blocks end up on SSD
                    SsdTier(
                        os.path.join(ssd_dir, f"ttft-{prompt_len}-{tier}"),
                        2 * num_blocks,
                        block_bytes,
                        sync=False,
                    ),
                )
            engine.replace_kv_store(None if store is None else ready_store(store))
            times, loads, tokens, computed = [], [], None, None
            for i in range(4 if tier == "ssd_auto" else 3):  # auto: a first round measures the disk
                run(prompt)
                run(filler)  # pushes the prompt's blocks out of HBM (into the store)
                if store is not None and store.ssd is not None:
                    engine.offloader.drain(300)
                    store.flush(300)
                    fd = os.open(os.path.join(ssd_dir, f"ttft-{prompt_len}-{tier}", "slab.bin"), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                if tier == "ssd_forced":  # forget the prefill rate: every held block is loaded
                    engine.offloader.prefill_tokens_per_s = None
                loaded_before = store.stats["load_seconds"] if store is not None else 0.0
                if store is not None:  # what the engine's choice sees
                    off = engine.offloader
                    decision = {
                        "prefill_tokens_per_s": off.prefill_tokens_per_s,
                        "load_cost_first_blocks_s": store.load_costs(engine_hashes(prompt)[:2]),
                        "tier_bandwidth": dict(store.bandwidth),
                    }
                s, tokens, computed = run(prompt)
                if tier == "ssd_auto" and i == 0:
                    continue
                times.append(s)
                loads.append(store.stats["load_seconds"] - loaded_before if store is not None else 0.0)
            reference = reference or tokens
            rows.append(
                {
                    "prompt_len": prompt_len,
                    "tier": tier,
                    "ttft_s": statistics.median(times),
                    "ttft_all_s": times,
                    "store_load_s": statistics.median(loads),
                    "last_decision_inputs": decision if store is not None else None,
                    "last_run_steps_ms_tokens_loading": [x for x in steps if x[2] or x[1] > 0.5][:20],
                    "prompt_tokens_computed": computed,
                    "same_first_token_as_recompute": tokens == reference,
                    "blocks_computed_because_slower_to_load": engine.offloader.stats.skipped_slower_than_compute
                    if store is not None
                    else 0,
                    "tier_bandwidth_bytes_per_s": dict(store.bandwidth) if store is not None else None,
                    "kv_bytes": (prompt_len // 16) * block_bytes,
                }
            )
            if store is not None:
                engine.replace_kv_store(None)
                store.close()
        base = next(r["ttft_s"] for r in rows if r["prompt_len"] == prompt_len and r["tier"] == "recompute")
        for r in rows:
            if r["prompt_len"] == prompt_len:
                r["vs_recompute"] = r["ttft_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 6144])
    parser.add_argument("--ssd-dir", default=None)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-moves", action="store_true")
    parser.add_argument("--tiers", nargs="+", default=["recompute", "dram", "ssd_forced", "ssd_auto"])
    args = parser.parse_args()
    result = {"floors": floors()}
    print(result, flush=True)
    with tempfile.TemporaryDirectory(dir=args.ssd_dir) as tmp:
        result["block_moves"] = {"rows": []} if args.skip_moves else block_moves(tmp)
        fl = result["floors"]
        for r in result["block_moves"]["rows"]:
            if "gbps" in r:
                floor = fl["d2h_pinned_gbps"] if r["path"].startswith("hbm_to") else fl["h2d_pinned_gbps"]
                r["vs_pinned_copy"] = r["gbps"] / floor
            print(r, flush=True)
        if not args.skip_ttft:
            result["ttft"] = ttft(write_model_dir(Path(tmp)), args.prompt_lens, tmp, tuple(args.tiers))
            for r in result["ttft"]:
                print(r, flush=True)
    result["block_shape"] = list(BLOCK_SHAPE)
    result["model"] = f"Llama-3-8B shape ({LLAMA3_8B['num_hidden_layers']} layers), dummy bf16 weights"
    out = os.environ.get("OUT")
    print(write_result("kv_tiers_gpu_8b", result, out_dir=Path(out) if out else None))


if __name__ == "__main__":
    main()
