"""The quantization policy: which weight and KV formats each pool runs, and whether KV can move between two
pools. Checked when the app is configured, so a mismatch is one clear error, never a recompute per request.

A pool's activations (and so its KV cache) are in the engine's dtype: `weight_dtype` when it names one,
else `engine.dtype`, else the checkpoint's; on a CPU float16 becomes bfloat16, as the engine does
(engine/model_loader.py). `weight_dtype: fp8` (or engine.quantization fp8) changes the weights only: the KV
stays in the activations' dtype. KV hands off between pools whose KV formats are equal, whatever their
weights; there is no KV format conversion in transit yet, so pools with different KV formats are refused.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolFormats:
    weights: str  # fp8, or a dtype name
    kv: str  # the KV cache's dtype name ("auto": the checkpoint's, not known here)


def pool_formats(weight_dtype: str, engine: dict, device: str, checkpoint_dtype: str | None) -> PoolFormats:
    """The formats a pool runs. device: "cpu" or a GPU; checkpoint_dtype: config.json's, if known."""
    activations = weight_dtype if weight_dtype not in ("auto", "fp8") else engine.get("dtype", "auto")
    if activations == "auto" and checkpoint_dtype:
        activations = checkpoint_dtype.removeprefix("torch.")
    if device == "cpu" and activations == "float16":
        activations = "bfloat16"
    fp8 = weight_dtype == "fp8" or engine.get("quantization") == "fp8"
    return PoolFormats("fp8" if fp8 else activations, activations)


def check_kv_handoff(prefill: PoolFormats, decode: PoolFormats) -> None:
    """ValueError unless the prefill pool's KV can be pulled by the decode pool as it is."""
    if prefill.kv != decode.kv:
        raise ValueError(
            f"pools: the prefill pool keeps KV in {prefill.kv} and the decode pool in {decode.kv}; KV "
            "handoff needs one KV format (no conversion in transit yet): give both pools the same dtype "
            "(weight_dtype or engine.dtype; fp8 weights keep the activations' dtype for KV)"
        )
