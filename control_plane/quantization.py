"""The quantization policy: which weight and KV formats each pool runs, and whether KV can move between two
pools. Checked when the app is configured, so a mismatch is one clear error, never a recompute per request.

A pool's activations are in the engine's dtype: `weight_dtype` when it names one, else `engine.dtype`, else
the checkpoint's; on a CPU float16 becomes bfloat16, as the engine does (engine/model_loader.py).
`weight_dtype: fp8` (or engine.quantization fp8) changes the weights only. The KV cache is in the
activations' dtype, or e4m3 with per-(layer, KV head) scales with `kv_dtype: fp8` (or
engine.kv_cache_dtype fp8).

KV hands off between pools whose KV formats are equal as it is, and between 16-bit and e4m3 formats (either
way) converted by the puller as it lands (services/transport/base.py, kernels/kv_convert.py). Pools whose
blocks hold different numbers of tokens cannot hand off: that is refused here.
"""

from dataclasses import dataclass

CONVERTIBLE = frozenset({"float32", "bfloat16", "float16", "fp8"})  # the puller converts between these


@dataclass(frozen=True)
class PoolFormats:
    weights: str  # fp8, or a dtype name
    kv: str  # fp8, or the KV cache's dtype name ("auto": the checkpoint's, not known here)
    block_size: int = 16


def pool_formats(
    weight_dtype: str, kv_dtype: str, engine: dict, device: str, checkpoint_dtype: str | None
) -> PoolFormats:
    """The formats a pool runs. device: "cpu" or a GPU; checkpoint_dtype: config.json's, if known."""
    activations = weight_dtype if weight_dtype not in ("auto", "fp8") else engine.get("dtype", "auto")
    if activations == "auto" and checkpoint_dtype:
        activations = checkpoint_dtype.removeprefix("torch.")
    if device == "cpu" and activations == "float16":
        activations = "bfloat16"
    fp8_weights = weight_dtype == "fp8" or engine.get("quantization") == "fp8"
    fp8_kv = kv_dtype == "fp8" or engine.get("kv_cache_dtype", "auto") in ("fp8", "fp8_e4m3")
    return PoolFormats(
        "fp8" if fp8_weights else activations,
        "fp8" if fp8_kv else activations,
        engine.get("block_size", 16),
    )


def check_kv_handoff(prefill: PoolFormats, decode: PoolFormats) -> str:
    """How the decode pool takes the prefill pool's KV: "as_is" or "converted"; ValueError when it cannot."""
    if prefill.block_size != decode.block_size:
        raise ValueError(
            f"pools: the prefill pool's KV blocks hold {prefill.block_size} tokens and the decode pool's "
            f"{decode.block_size}; KV handoff needs one block size (engine.block_size)"
        )
    if prefill.kv == decode.kv:
        return "as_is"
    known = {prefill.kv, decode.kv} - {"auto"}
    if not known <= CONVERTIBLE:
        raise ValueError(
            f"pools: KV in {prefill.kv} (prefill) and {decode.kv} (decode) cannot be converted in transit; "
            f"allowed {sorted(CONVERTIBLE)}"
        )
    return "converted"
