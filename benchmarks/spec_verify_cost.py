"""What verifying k drafted tokens costs against a plain decode step — the curve the speculative-decoding
policy rests on (a step that verifies k drafts must cost less than the 1 + E[accepted] steps it replaces).

    python -m benchmarks.spec_verify_cost                 # H200: Llama-3-8B shape, random bf16 weights
    python -m benchmarks.spec_verify_cost --cpu           # this CPU: the tiny model

For batch B (all requests decoding at `--context` tokens) and k = 0..8, the wall time of LLMEngine.step()
with k random drafts per request (acceptance does not change the cost of the pass). On the GPU every
point is timed as served (a CUDA graph of the (batch, 1 + k) shape replayed) and eager (the same engine
with its graphs set aside); `ratio_to_plain_step` is the served verify step over the served plain step
(k = 0). The copy bandwidth and matmul rate are measured in the same run, and the bytes floor of a plain
decode step (weights + KV read) is reported beside it.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results_io import write_result
from engine import LLMEngine, SamplingParams
from engine.request import EngineRequest
from engine.spec.drafter import NullDrafter

STEPS = 12
WARMUP = 6  # steps before timing each point: Triton compiles kernels for each new query shape


def _engine(model: str, gpu: bool, batch_max: int, k_max: int) -> LLMEngine:
    """Drafting on (prompt lookup), so verification shapes up to k_max are captured as graphs on a GPU."""
    options = dict(
        max_num_seqs=batch_max,
        max_num_batched_tokens=16384,
        enable_prefix_caching=False,
        speculative_method="ngram",
        num_speculative_tokens=max(k_max, 1),
        spec_max_batch_tokens=batch_max * (k_max + 1),
    )
    if gpu:
        options |= dict(
            load_format="dummy", dtype="bfloat16", max_model_len=4096, kv_cache_memory_bytes=32 * 2**30
        )
    else:
        options |= dict(num_blocks=2048, max_model_len=512)
    return LLMEngine.from_pretrained(model, **options)


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def measure(
    engine: LLMEngine, batch: int, context: int, ks: list[int], gpu: bool, vocab: int
) -> dict[int, float]:
    """Median step ms for each k, the batch decoding at about `context` tokens."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=engine.max_model_len - context - 1, ignore_eos=True)
    ids = [f"b{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid in ids:
        engine.add_request(
            EngineRequest(
                rid, torch.randint(10, vocab - 10, (context,), generator=gen).tolist(), params, stream=False
            )
        )
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    out = {}
    for k in ks:
        times = []
        for i in range(STEPS + WARMUP):
            for req in engine.scheduler.running:  # k drafts each (random: mostly rejected, same work)
                req.spec_token_ids = torch.randint(10, vocab - 10, (k,), generator=gen).tolist() if k else []
            _sync(gpu)
            t0 = time.perf_counter()
            engine.step()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        out[k] = statistics.median(times) * 1e3
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    return out


def step_floor_ms(engine: LLMEngine, context: int, extra: dict):
    """-> floor(batch, k): max(bytes / copy bandwidth, FLOPs / matmul rate) of a step verifying k drafts a
    sequence: weights and each sequence's KV read once; 2 FLOPs a weight a token, plus attention's."""
    weights = [p for n, p in engine.model.named_parameters() if "embed_tokens" not in n]
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    cfg = engine.model_config
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    extra["weight_bytes"] = weight_bytes
    extra["floor_ms_plain_b1"] = round(weight_bytes / (extra["copy_bandwidth_GBps"] * 1e9) * 1e3, 3)

    def floor(batch: int, k: int) -> float:
        tokens = batch * (1 + k)
        bytes_ms = (
            (weight_bytes + batch * context * kv_per_token) / (extra["copy_bandwidth_GBps"] * 1e9) * 1e3
        )
        attn_flops = 4 * tokens * context * cfg.num_heads * cfg.head_dim * cfg.num_layers
        flops_ms = (
            (2 * sum(p.numel() for p in weights) * tokens + attn_flops)
            / (extra["matmul_TFLOPs"] * 1e12)
            * 1e3
        )
        return max(bytes_ms, flops_ms)

    return floor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--ks", nargs="+", type=int, default=list(range(0, 9)))
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gpu = not args.cpu and torch.cuda.is_available()
    extra = {}
    if gpu:
        from benchmarks.gpu_engine import write_model_dir
        from benchmarks.gpu_floor import copy_bandwidth_GBps, matmul_TFLOPs

        model = str(write_model_dir(Path(tempfile.mkdtemp())))
        extra = {
            "copy_bandwidth_GBps": round(copy_bandwidth_GBps(), 1),
            "matmul_TFLOPs": round(matmul_TFLOPs(), 1),
            "model": "Llama-3-8B shape, random bf16 weights",
        }
        context = args.context or 2048
    else:
        from engine.tiny_model import cached_tiny_model

        model, context = str(cached_tiny_model()), args.context or 256
        extra = {"model": "tiny random llama (cached_tiny_model)", "threads": torch.get_num_threads()}
    served = _engine(model, gpu, max(args.batches), max(args.ks))
    served.drafter = NullDrafter()  # the drafts are set by hand; no step pays for proposing any
    served.async_scheduling = False  # verify steps read their tokens before the next; plain ones alike here
    vocab = served.model_config.vocab_size
    graphs = served.runner.graphs
    floor = step_floor_ms(served, context, extra) if gpu else None
    rows = []
    for batch in args.batches:
        times = measure(served, batch, context, args.ks, gpu, vocab)
        runner = served.runner
        runner.graphs, runner.static_inputs = None, None  # the same engine, eager
        eager = measure(served, batch, context, args.ks, gpu, vocab) if graphs is not None else times
        runner.graphs, runner.static_inputs = graphs, None if graphs is None else graphs.inputs
        for k, ms in times.items():
            rows.append(
                {
                    "batch": batch,
                    "k": k,
                    "step_ms": round(ms, 3),
                    "ratio_to_plain_step": round(ms / times[0], 3),
                    "eager_step_ms": round(eager[k], 3),
                    "eager_ratio_to_plain_step": round(eager[k] / times[0], 3),
                    "cuda_graphs": graphs is not None,
                }
            )
            if floor is not None:  # a verify step of many tokens is bound by FLOPs, not bytes
                rows[-1] |= {
                    "floor_ms": round(floor(batch, k), 3),
                    "ratio_to_floor": round(ms / floor(batch, k), 3),
                }
            print(rows[-1], flush=True)
    name = "spec_verify_cost_gpu" if gpu else "spec_verify_cost_cpu"
    path = write_result(
        name,
        {"context": context, "steps_per_point": STEPS, **extra, "rows": rows},
        Path(args.out) if args.out else None,
    )
    print(path)


if __name__ == "__main__":
    main()
