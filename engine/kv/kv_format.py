"""The KV cache's format: the activations' dtype, or FP8 (e4m3) with one fp32 scale per (layer, K/V, KV head).

An FP8 cache stores K / k_scale and V / v_scale (kernels/attention_ref.py). The scales come from the
checkpoint (vLLM's `self_attn.k_scale` / `v_scale`, or compressed-tensors' `k_proj.output_scale`), or are
calibrated at engine start by one prefill of a fixed text (`CALIBRATION_TEXT`): every layer sets its scales
from the K and V it computes before writing them. Calibrating at start, not on a user's first prompt, fixes
the format before any block is hashed, and gives every replica of a model on one device type the same
scales, so their blocks are interchangeable.

Rotary embedding turns each (i, i + D/2) pair of a key by a position's angle, so an element of a rotated key
never exceeds its pair's norm: calibration takes the pairs' norms of the unrotated keys, a bound that holds
at every position, not only the calibration text's. `HEADROOM` keeps room above what calibration saw
(vLLM's defaults leave 2.2x for K, 4.5x for V), and each scale is then rounded up to a power of two (so 2x
to 4x in all): dividing by a power of two is exact in every kernel and in the torch reference alike, and
replicas whose calibration differs in the last bits (another GPU, another BLAS) still land on the same
scales. Values past the scaled range saturate.

The format is part of every block hash (`KVFormat.tag`): an FP8 cache's tag carries a digest of its scales,
since the same bytes under other scales are other values.
"""

import hashlib
from dataclasses import dataclass

import torch

FP8_KV = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV).max  # 448
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names: auto = the activations' dtype
HEADROOM = 2.0
MIN_AMAX = 1e-4  # a head that calibration saw all zeros still gets a usable scale

CALIBRATION_TEXT = (
    "The committee met on Tuesday morning to review the budget for the coming year. After a short "
    "discussion of the previous minutes, the treasurer presented three options: keep spending flat, cut the "
    "travel allowance by a fifth, or raise membership fees for the first time since 2019. Questions "
    "followed. How many members would leave if fees rose? Nobody knew, but a survey from March suggested "
    "that most would stay. In the end the vote was close, 7 to 5, and the travel allowance was cut.\n\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    return total / len(values) if values else 0.0\n\n"
    "Rain is expected across the north on Friday, with temperatures between 4 and 9 degrees; the south "
    "stays dry and bright. Q: What is 12 times 14? A: 168. Q: Name a prime between 20 and 30. A: 23 or 29."
)


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        extra = " (e5m2 is not implemented: use fp8, which is e4m3)" if name == "fp8_e5m2" else ""
        raise ValueError(f"kv_cache_dtype: got {name!r}, allowed {list(KV_CACHE_DTYPES)}{extra}")


def cache_torch_dtype(name: str, activations: torch.dtype) -> torch.dtype:
    check_kv_cache_dtype(name)
    return activations if name == "auto" else FP8_KV


def calibrated_scales(k: torch.Tensor, v: torch.Tensor, headroom: float = HEADROOM) -> torch.Tensor:
    """k, v [T, kv_heads, head_dim] (K before rotary) -> scales [2, kv_heads] fp32: the power of two at or
    above headroom x the largest magnitude seen (K: the largest rotation pair's norm) / the format's maximum."""
    k = k.float()
    half = k.shape[-1] // 2
    k_pairs = torch.sqrt(k[..., :half] ** 2 + k[..., half : 2 * half] ** 2)  # what rotation can reach
    k_amax = torch.maximum(k_pairs.amax(dim=(0, 2)), k.abs().amax(dim=(0, 2)))  # odd D: the last element
    v_amax = v.float().abs().amax(dim=(0, 2))
    amax = torch.stack([k_amax, v_amax]).clamp_min(MIN_AMAX)
    return torch.exp2(torch.ceil(torch.log2(amax * headroom / FP8_MAX))).contiguous()


@dataclass(frozen=True)
class KVFormat:
    """How an engine's KV bytes read: the cache dtype and, for FP8, every layer's scales [L, 2, kv_heads]."""

    dtype: torch.dtype
    scales: torch.Tensor | None = None  # on the host, fp32

    @property
    def name(self) -> str:
        """For people and the control plane: fp8, or the dtype's name (bfloat16, ...)."""
        return "fp8" if self.dtype == FP8_KV else str(self.dtype).removeprefix("torch.")

    @property
    def tag(self) -> str:
        """For block hashes: the name, and for FP8 a digest of the scales."""
        if self.scales is None:
            return self.name
        digest = hashlib.sha256(self.scales.float().contiguous().numpy().tobytes()).hexdigest()[:16]
        return f"{self.name}:{digest}"
