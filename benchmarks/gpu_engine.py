"""Engine decode step for a Llama-3-8B-shaped model (random bf16 weights) against the bytes floor and HF.

    python -m benchmarks.gpu_engine [--out DIR] [--batches 1 8 64] [--context 2048]

Floor of a decode step = (weight bytes + KV bytes read) / measured copy bandwidth. Our step is timed as
the wall time of LLMEngine.step() (schedule, CUDA-graph replay, sampling, bookkeeping) at steady state.
HF transformers runs `generate` with a static cache on the same GPU in the same run; its per-token time
is the difference between generating 40 and 8 tokens, over 32.
"""

import argparse
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
    "max_position_embeddings": 8192,
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
            ("sample", engine.runner, "sampler"),
        ]:
            self._wrap(name, owner, attr)
        if engine.runner.graphs is not None:
            self._wrap("graph_replay", engine.runner.graphs, "run")

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


def ours(
    model_dir: Path, batches: list[int], context: int, copy_bw: float, profile_dir: Path | None = None
) -> list[dict]:
    t0 = time.perf_counter()
    engine = LLMEngine.from_pretrained(
        str(model_dir),
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=max(batches),
        max_num_batched_tokens=16384,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=40 * 2**30,
    )
    print(f"engine up (weights + graph capture) in {time.perf_counter() - t0:.1f} s", flush=True)
    # a decode step reads every weight except the embedding table, of which it gathers B rows
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed_tokens" not in n
    )
    gen = torch.Generator().manual_seed(0)
    phases = PhaseTimer(engine)
    rows = []
    for batch in batches:
        params = SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS + 20, ignore_eos=True)
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for rid in ids:
            # final-only outputs, as LLM.generate asks for them
            engine.add_request(
                EngineRequest(
                    rid, torch.randint(10, 128000, (context,), generator=gen).tolist(), params, stream=False
                )
            )
        while (
            any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
            or engine.scheduler.waiting
        ):
            engine.step()  # prefill
        for _ in range(3):
            engine.step()  # settle
        times = []
        phases.totals.clear()
        for _ in range(DECODE_STEPS):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()  # ends in a device->host read of the sampled tokens
            times.append(time.perf_counter() - t0)
        breakdown = phases.per_step_ms(DECODE_STEPS)
        if profile_dir is not None and batch == 8:
            profile_steps(engine, profile_dir / "profile_decode_b8.txt")
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        step_s = statistics.median(times)
        ctx = context + 4 + DECODE_STEPS // 2  # mean context over the timed steps
        floor_s = (weight_bytes + kv_bytes_read(batch, ctx)) / (copy_bw * 1e9)
        rows.append(
            {
                "batch": batch,
                "context": context,
                "step_ms": round(step_s * 1e3, 3),
                "floor_ms": round(floor_s * 1e3, 3),
                "ratio_to_floor": round(step_s / floor_s, 3),
                "tokens_per_s": round(batch / step_s, 1),
                "weight_bytes": weight_bytes,
                "kv_bytes_read": kv_bytes_read(batch, ctx),
                "step_ms_p90": round(sorted(times)[27] * 1e3, 3),
                "host_breakdown_ms_per_step": breakdown,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del engine
    torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def transformers_peer(batches: list[int], context: int, compiled: bool) -> dict[int, float]:
    """Tokens/s of HF generate with a static cache; `compiled` is transformers' default (it compiles the
    static-cache decode step), warmed up for both lengths so no compilation lands in the timing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    out = {}
    for batch in batches:
        ids = torch.randint(10, 128000, (batch, context), device="cuda")

        def generate(n: int, ids: torch.Tensor = ids) -> float:
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

        generate(8), generate(40)  # warm-up both lengths
        short, long = generate(8), generate(40)
        out[batch] = batch / ((long - short) / 32)
        print(f"hf batch {batch}: {out[batch]:.1f} tokens/s", flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-only", action="store_true", help="only the HF peer, compiled and eager")
    parser.add_argument("--hf-eager", action="store_true", help="the in-run HF peer without compilation")
    parser.add_argument(
        "--profile", action="store_true", help="write a per-kernel table of B=8 steps to --out"
    )
    args = parser.parse_args()
    copy_bw, mm = copy_bandwidth_GBps(), matmul_TFLOPs()
    print(f"copy {copy_bw:.0f} GB/s, matmul {mm:.0f} TFLOP/s", flush=True)
    if args.hf_only:
        hf = {
            mode: transformers_peer(args.batches, args.context, mode == "compiled")
            for mode in ("compiled", "eager")
        }
        write_result(
            "gpu_engine_hf",
            {"copy_bandwidth_GBps": round(copy_bw, 1), "hf_tokens_per_s": hf},
            Path(args.out) if args.out else None,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = ours(
            write_model_dir(Path(tmp)),
            args.batches,
            args.context,
            copy_bw,
            Path(args.out) if args.out and args.profile else None,
        )
    hf = {} if args.skip_hf else transformers_peer(args.batches, args.context, compiled=not args.hf_eager)
    for row in rows:
        row["hf_tokens_per_s"] = round(hf[row["batch"]], 1) if row["batch"] in hf else None
        row["speedup_vs_hf"] = (
            round(row["tokens_per_s"] / hf[row["batch"]], 2) if row["batch"] in hf else None
        )
        hf_step = row["batch"] / hf[row["batch"]] if row["batch"] in hf else None
        row["hf_ratio_to_floor"] = round(hf_step / (row["floor_ms"] / 1e3), 3) if hf_step else None
        row["table"] = "engine_decode"
    path = write_result(
        "gpu_engine",
        {
            "copy_bandwidth_GBps": round(copy_bw, 1),
            "matmul_TFLOPs": round(mm, 1),
            "model": "Llama-3-8B shape, random bf16 weights",
            "cuda_graphs": True,
            "outputs": "final only (as LLM.generate)",
            "attention_backend": "triton",
            "torch": torch.__version__,
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
