"""Choose, at engine start, where the skinny GEMM replaces cuBLAS: measured, per weight shape and row bucket.

For every distinct (out, in, bias, FP8) shape among the model's Linear layers and every power-of-two row count
up to the decode batch, the dense path (cuBLAS; W8A8 for FP8 weights) and each candidate config of
kernels/skinny_gemm.py are timed over all the
layers that share the shape, one after another in a replayed CUDA graph: the weights stream from HBM as in
a real step (no L2 reuse) and launch costs stay out, as in the engine's graphs. The kernel is kept only
where it beats the dense path by MIN_GAIN. The table of timings is returned for the startup log and benchmarks.
"""

import dataclasses
import functools
import logging
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from triton.runtime.errors import OutOfResources

from engine.models.linear import Linear
from kernels.skinny_gemm import MAX_SKINNY_M, SkinnyConfig, candidate_configs, skinny_gemm

logger = logging.getLogger(__name__)

MIN_GAIN = 0.03  # the kernel must be this much faster than cuBLAS to replace it

Timer = Callable[[Callable[[], object]], float]  # a step -> its time in ms


def graph_time_ms(fn: Callable[[], object], replays: int = 10) -> float:
    """Mean milliseconds of `fn` replayed from a CUDA graph (captured after one warm-up call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles a Triton config outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def row_buckets(max_rows: int) -> list[int]:
    top = min(max_rows, MAX_SKINNY_M)
    return [1 << i for i in range(top.bit_length()) if 1 << i <= top] + (
        [] if top & (top - 1) == 0 else [1 << top.bit_length()]
    )


def tune_skinny_linears(model: nn.Module, max_rows: int, timer: Timer = graph_time_ms) -> list[dict]:
    """Set each Linear's `skinny` plan; -> one row per (shape, rows) with both times and the choice."""
    groups: dict[tuple[int, int, bool, bool], list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear):
            module.skinny = {}
            key = (module.out_features, module.in_features, module.bias is not None, module.is_fp8)
            groups[key].append(module)
    if not groups:
        return []
    device = next(iter(groups.values()))[0].weight.device
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    # the activations' dtype: the first 16/32-bit parameter's (FP8 weights take 16-bit inputs)
    act_dtype = next(
        p.dtype for p in model.parameters() if p.dtype.is_floating_point and p.element_size() > 1
    )
    table = [
        _tune_shape(layers, rows, timer, num_sms, act_dtype)
        for layers in groups.values()
        for rows in row_buckets(max_rows)
    ]
    won = sum(r["chosen"] for r in table)
    logger.info("skinny GEMM replaces cuBLAS at %d of %d (shape, rows) points", won, len(table))
    return table


def _tune_shape(layers: list[Linear], rows: int, timer: Timer, num_sms: int, act_dtype: torch.dtype) -> dict:
    """Time cuBLAS and the candidates over `layers` (one shape) at `rows`; plan the winner if it is the kernel."""
    n, k = layers[0].out_features, layers[0].in_features
    x = torch.randn(rows, k, device=layers[0].weight.device, dtype=act_dtype)

    def time_of(gemm: Callable[[Linear], torch.Tensor]) -> float:
        return timer(lambda: [gemm(layer) for layer in layers]) / len(layers)

    dense = time_of(lambda layer: layer.dense(x))
    best: tuple[SkinnyConfig, float] | None = None
    for cfg in candidate_configs(rows, n, k, num_sms):
        try:
            t = time_of(functools.partial(_skinny, x, cfg))
        except OutOfResources:  # more shared memory than this GPU has (stages x tiles): not a candidate here
            continue
        if best is None or t < best[1]:
            best = (cfg, t)
    chosen = best is not None and best[1] < dense * (1 - MIN_GAIN)
    if best is not None and chosen:
        for layer in layers:
            layer.skinny[rows] = best[0]
    return {
        "out_features": n,
        "in_features": k,
        "fp8": layers[0].is_fp8,
        "rows": rows,
        "layers": len(layers),
        "dense_us": round(dense * 1e3, 2),
        "skinny_us": None if best is None else round(best[1] * 1e3, 2),
        "config": None if best is None else dataclasses.asdict(best[0]),
        "chosen": chosen,
    }


def _skinny(x: torch.Tensor, cfg: SkinnyConfig, layer: Linear) -> torch.Tensor:
    return skinny_gemm(x, layer.weight, layer.bias, cfg, layer.weight_scale)
