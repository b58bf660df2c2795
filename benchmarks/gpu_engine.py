"""Engine decode step for a Llama-3-8B-shaped model (random bf16 weights) against the bytes floor and HF.

    python -m benchmarks.gpu_engine [--out DIR] [--batches 1 8 64] [--contexts 2048 8192] [--e2e]

Floor of a decode step = (weight bytes + KV bytes read) / measured copy bandwidth. Our step is the wall
time of DECODE_STEPS consecutive LLMEngine.step() calls (schedule, launch, CUDA-graph replay, sampling,
update) at steady state, over DECODE_STEPS, with async scheduling on (the GPU default) and off.
HF transformers runs `generate` with a static cache on the same GPU in the same run; its per-token time
is the difference between generating 40 and 8 tokens, over 32. `--e2e`: LLM.generate-style offline
throughput (64 prompts, 2k in, 256 out) against HF generate of the same batch.
"""

import argparse
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs
from benchmarks.results_io import write_result
from engine import LLMEngine, SamplingParams
from engine.request import EngineRequest
from engine.tiny_model import train_tokenizer

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
DECODE_STEPS = 30


def write_model_dir(root: Path) -> Path:
    (root / "config.json").write_text(json.dumps(LLAMA3_8B))
    train_tokenizer().save(str(root / "tokenizer.json"))  # ids are fed directly; the vocab does not matter
    return root


def kv_bytes_read(batch: int, context: int) -> int:
    cfg = LLAMA3_8B
    return batch * context * cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2


class PhaseTimer:
    """Wall time spent in each named engine method, per step (host view: what the GPU waits on)."""

    def __init__(self, engine: LLMEngine):
        self.totals: dict[str, float] = {}
        for name, owner, attr in [
            ("schedule", engine.scheduler, "schedule"),
            ("prepare", engine.runner, "prepare"),
            ("launch", engine.runner, "launch"),
            ("sample", engine.runner.sampler, "sample"),
            ("update", engine, "_update"),
        ]:
            self._wrap(name, owner, attr)
        if engine.runner.graphs is not None:
            self._wrap("graph_replay", engine.runner.graphs, "replay")

    def _wrap(self, name, owner, attr):
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {k: round(v / steps * 1e3, 3) for k, v in self.totals.items()}


def profile_steps(engine: LLMEngine, out_path: Path, steps: int = 3) -> None:
    """Per-kernel CUDA time of a few decode steps (graph replays included), as a table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    out_path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def build_engine(
    model_dir: Path,
    max_num_seqs: int,
    max_model_len: int,
    max_num_batched_tokens: int = 16384,
    cuda_graph_max_tokens: int = 0,
    quantization: str | None = None,
    **options,
) -> LLMEngine:
    t0 = time.perf_counter()
    engine = LLMEngine.from_pretrained(
        str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        cuda_graph_max_tokens=cuda_graph_max_tokens,
        quantization=quantization,
        enable_prefix_caching=False,
        gpu_memory_utilization=0.9,
        **options,
    )
    print(f"engine up (weights + graph capture) in {time.perf_counter() - t0:.1f} s", flush=True)
    return engine


def decode_weight_bytes(engine: LLMEngine) -> int:
    """A decode step reads every weight except the embedding table, of which it gathers B rows."""
    return sum(
        p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n
    )


def time_decode(
    engine: LLMEngine, batch: int, context: int, gen: torch.Generator, phases: PhaseTimer
) -> dict:
    """Steady-state decode of `batch` requests at `context` tokens: per-step wall times of consecutive
    steps (no synchronization between them, as served), and the host phases per step."""
    params = SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS + 20, ignore_eos=True)
    ids = [engine.new_request_id(f"b{batch}") for _ in range(batch)]
    for rid in ids:  # final-only outputs, as LLM.generate asks for them
        prompt = torch.randint(10, 128000, (context,), generator=gen).tolist()
        engine.add_request(EngineRequest(rid, prompt, params, stream=False))
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
        or engine.scheduler.waiting
    ):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()  # settle
    phases.totals.clear()
    times = []
    torch.cuda.synchronize()
    start = last = time.perf_counter()
    for _ in range(DECODE_STEPS):
        engine.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    breakdown = phases.per_step_ms(DECODE_STEPS)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "step_ms": round(total / DECODE_STEPS * 1e3, 3),
        "step_ms_median": round(statistics.median(times) * 1e3, 3),
        "step_ms_p90": round(sorted(times)[int(0.9 * len(times))] * 1e3, 3),
        "host_breakdown_ms_per_step": breakdown,
    }


def ours(
    model_dir: Path,
    batches: list[int],
    contexts: list[int],
    copy_bw: float,
    profile_dir: Path | None = None,
    quantization: str | None = None,
    overlaps: tuple[bool, ...] = (True, False),
) -> list[dict]:
    engine = build_engine(
        model_dir, max(batches), max(contexts) + 2 * DECODE_STEPS + 64, quantization=quantization
    )
    weight_bytes = decode_weight_bytes(engine)
    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
    gen = torch.Generator().manual_seed(0)
    phases = PhaseTimer(engine)
    rows = []
    for context in contexts:
        for batch in batches:
            if batch * (context + DECODE_STEPS + 24) > capacity:
                print(f"skip B={batch} context={context}: the KV pool holds {capacity} tokens", flush=True)
                continue
            ctx = context + 4 + DECODE_STEPS // 2  # mean context over the timed steps
            floor_s = (weight_bytes + kv_bytes_read(batch, ctx)) / (copy_bw * 1e9)
            for overlap in overlaps:
                engine.async_scheduling = overlap
                timed = time_decode(engine, batch, context, gen, phases)
                step_s = timed["step_ms"] / 1e3
                rows.append(
                    {
                        "batch": batch,
                        "context": context,
                        "async_scheduling": overlap,
                        **timed,
                        "floor_ms": round(floor_s * 1e3, 3),
                        "ratio_to_floor": round(step_s / floor_s, 3),
                        "tokens_per_s": round(batch / step_s, 1),
                        "weight_bytes": weight_bytes,
                        "kv_bytes_read": kv_bytes_read(batch, ctx),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            if profile_dir is not None and batch == 8 and context == contexts[0]:
                engine.async_scheduling = True
                profile_decode(engine, batch, context, gen, profile_dir / "gpu_engine_profile_decode_b8.txt")
    # where the skinny GEMM replaced cuBLAS, as measured at this engine's start
    rows += [{"table": "skinny_gemm_choice", **choice} for choice in engine.gemm_table]
    del engine, phases  # the timer's wrappers hold the engine too
    release_gpu_memory()
    return rows


def release_gpu_memory() -> None:
    """Before the next engine or peer loads: the last one's weights, KV pool and graphs are gone."""
    gc.collect()
    torch.cuda.empty_cache()


def profile_decode(engine: LLMEngine, batch: int, context: int, gen: torch.Generator, out_path: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ids = [engine.new_request_id("prof") for _ in range(batch)]
    for rid in ids:
        prompt = torch.randint(10, 128000, (context,), generator=gen).tolist()
        engine.add_request(EngineRequest(rid, prompt, params, stream=False))
    for _ in range(4):
        engine.step()
    profile_steps(engine, out_path)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


MIXED_STEPS = 8  # three windows: 3 + 24 steps stay inside the long prompt's 511-token chunks


def mixed_steps(model_dir: Path, copy_bw: float, matmul_rate: float) -> list[dict]:
    """Steps packing D decodes (context 2k) with a prefill chunk, T tokens in all: the wall time per step
    with piecewise CUDA graphs and eager (the same engine), against max(bytes floor, FLOPs floor)."""
    engine = build_engine(model_dir, 64, 16384, max_num_batched_tokens=512, cuda_graph_max_tokens=512)
    weight_bytes = decode_weight_bytes(engine)
    params_count = weight_bytes // 2
    piecewise = engine.runner.piecewise
    gen = torch.Generator().manual_seed(2)
    base = engine.scheduler.config
    rows = []
    for decodes in (1, 8):
        for tokens in (64, 512):
            if tokens <= decodes:
                continue
            for graphs in (True, False):
                engine.runner.piecewise = piecewise if graphs else None
                engine.scheduler.config = dataclasses.replace(base, max_num_batched_tokens=16384)
                params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
                ids = [engine.new_request_id("mix") for _ in range(decodes)]
                for rid in ids:
                    prompt = torch.randint(10, 128000, (2048,), generator=gen).tolist()
                    engine.add_request(EngineRequest(rid, prompt, params, stream=False))
                while engine.scheduler.waiting or any(
                    r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
                ):
                    engine.step()
                engine.scheduler.config = dataclasses.replace(base, max_num_batched_tokens=tokens)
                long_id = engine.new_request_id("mix-long")
                prompt = torch.randint(10, 128000, (16000,), generator=gen).tolist()
                engine.add_request(EngineRequest(long_id, prompt, params, stream=False))
                for _ in range(3):
                    engine.step()  # warm: the long prompt's chunks join the decodes
                windows = []  # the best of three windows: a kernel compiled mid-window is not a step's cost
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(MIXED_STEPS):
                        engine.step()
                    torch.cuda.synchronize()
                    windows.append((time.perf_counter() - t0) / MIXED_STEPS)
                step_s = min(windows)
                for rid in [*ids, long_id]:
                    engine.abort_request(rid)
                while engine.has_unfinished_requests():
                    engine.step()
                kv = kv_bytes_read(decodes, 2048 + 8) + kv_bytes_read(
                    1, 8000
                )  # the chunk reads ~half its prompt
                bytes_floor = (weight_bytes + kv) / (copy_bw * 1e9)
                flops_floor = 2 * params_count * tokens / (matmul_rate * 1e12)
                floor = max(bytes_floor, flops_floor)
                rows.append(
                    {
                        "table": "mixed_step",
                        "decodes": decodes,
                        "tokens": tokens,
                        "piecewise_graphs": graphs,
                        "step_ms": round(step_s * 1e3, 3),
                        "bytes_floor_ms": round(bytes_floor * 1e3, 3),
                        "flops_floor_ms": round(flops_floor * 1e3, 3),
                        "ratio_to_floor": round(step_s / floor, 3),
                        "windows_ms": [round(w * 1e3, 3) for w in windows],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    engine.scheduler.config = base
    del engine, piecewise
    release_gpu_memory()
    return rows


def end_to_end(model_dir: Path, num_prompts: int, prompt_len: int, output_len: int) -> list[dict]:
    """Offline throughput as LLM.generate runs it (engine.run: all prompts at once), async on and off."""
    engine = build_engine(model_dir, num_prompts, prompt_len + output_len + 64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 128000, (prompt_len,), generator=gen).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    rows = []
    for overlap in (True, False, True):  # the first run warms Triton's kernels for every prefill shape
        engine.async_scheduling = overlap
        requests = [EngineRequest(engine.new_request_id("e2e"), p, params, stream=False) for p in prompts]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.run(requests)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        rows.append(
            {
                "table": "end_to_end",
                "async_scheduling": overlap,
                "num_prompts": num_prompts,
                "prompt_len": prompt_len,
                "output_len": output_len,
                "seconds": round(seconds, 3),
                "output_tokens_per_s": round(num_prompts * output_len / seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del engine
    release_gpu_memory()
    return rows[1:]


@torch.inference_mode()
def transformers_generate_throughput(num_prompts: int, prompt_len: int, output_len: int) -> dict:
    """HF generate (static cache, compiled decode) of the same batch: output tokens/s, warmed up once."""
    release_gpu_memory()
    model = hf_model()
    ids = torch.randint(10, 128000, (num_prompts, prompt_len), device="cuda")

    hf_generate_seconds(model, ids, output_len, compiled=True)  # warm-up (compiles)
    seconds = hf_generate_seconds(model, ids, output_len, compiled=True)
    return {"seconds": round(seconds, 3), "output_tokens_per_s": round(num_prompts * output_len / seconds, 1)}


def hf_generate_seconds(model, ids: torch.Tensor, n: int, compiled: bool) -> float:
    """Wall time of HF generate producing exactly n greedy tokens with a static cache."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
        disable_compile=not compiled,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def transformers_peer(batches: list[int], context: int, compiled: bool) -> dict[int, float]:
    """Tokens/s of HF generate with a static cache; `compiled` is transformers' default (it compiles the
    static-cache decode step), warmed up for both lengths so no compilation lands in the timing."""
    release_gpu_memory()
    model = hf_model()
    out = {}
    for batch in batches:
        ids = torch.randint(10, 128000, (batch, context), device="cuda")

        for n in (8, 40):  # warm-up both lengths
            hf_generate_seconds(model, ids, n, compiled)
        short, long = (hf_generate_seconds(model, ids, n, compiled) for n in (8, 40))
        out[batch] = batch / ((long - short) / 32)
        print(f"hf batch {batch}: {out[batch]:.1f} tokens/s", flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--hf-context", type=int, default=2048, help="the context of the HF decode peer")
    parser.add_argument("--e2e", action="store_true", help="also LLM.generate throughput against HF generate")
    parser.add_argument(
        "--mixed", action="store_true", help="only mixed prefill + decode steps, graphs vs eager"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-only", action="store_true", help="only the HF peer, compiled and eager")
    parser.add_argument("--hf-eager", action="store_true", help="the in-run HF peer without compilation")
    parser.add_argument(
        "--profile", action="store_true", help="write a per-kernel table of B=8 steps to --out"
    )
    args = parser.parse_args()
    out = Path(args.out) if args.out else None
    copy_bw, mm = copy_bandwidth_GBps(), matmul_TFLOPs()
    print(f"copy {copy_bw:.0f} GB/s, matmul {mm:.0f} TFLOP/s", flush=True)
    if args.hf_only:
        hf_modes = {
            mode: transformers_peer(args.batches, args.hf_context, mode == "compiled")
            for mode in ("compiled", "eager")
        }
        write_result(
            "gpu_engine_hf", {"copy_bandwidth_GBps": round(copy_bw, 1), "hf_tokens_per_s": hf_modes}, out
        )
        return
    result = {
        "copy_bandwidth_GBps": round(copy_bw, 1),
        "matmul_TFLOPs": round(mm, 1),
        "model": "Llama-3-8B shape, random bf16 weights",
        "cuda_graphs": True,
        "outputs": "final only (as LLM.generate)",
        "attention_backend": "triton",
        "torch": torch.__version__,
        "rows": [],
    }
    if args.mixed:
        with tempfile.TemporaryDirectory() as tmp:
            result["rows"] = mixed_steps(write_model_dir(Path(tmp)), copy_bw, mm)
        write_result("gpu_engine_mixed", result, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp))
        rows = ours(model_dir, args.batches, args.contexts, copy_bw, out if args.profile else None)
        for row in rows:
            row.setdefault("table", "engine_decode")
        result["rows"] = rows
        write_result("gpu_engine", result, out)  # kept if a peer below does not finish
        if args.e2e:
            result["rows"] += end_to_end(model_dir, 64, 2048, 256)
            write_result("gpu_engine", result, out)
    if not args.skip_hf:
        hf = transformers_peer(args.batches, args.hf_context, compiled=not args.hf_eager)
        result["hf_decode"] = {"context": args.hf_context, "compiled": not args.hf_eager}
        for row in rows:
            if (
                row.get("table") != "engine_decode"
                or row["context"] != args.hf_context
                or row["batch"] not in hf
            ):
                continue
            hf_step = row["batch"] / hf[row["batch"]]
            row["hf_tokens_per_s"] = round(hf[row["batch"]], 1)
            row["speedup_vs_hf"] = round(row["tokens_per_s"] / hf[row["batch"]], 2)
            row["hf_ratio_to_floor"] = round(hf_step / (row["floor_ms"] / 1e3), 3)
        write_result("gpu_engine", result, out)
        if args.e2e:
            result["rows"].append(
                {"table": "end_to_end_hf", **transformers_generate_throughput(64, 2048, 256)}
            )
    path = write_result("gpu_engine", result, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
