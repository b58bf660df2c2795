"""Weight quantization at load: which methods exist, where they can run, and applying one to a model.

`fp8`: every Linear of the decoder layers (attention QKV and output, MLP gate/up and down, shared experts)
and the MoE routed experts go to e4m3 with per-output-channel scales (per expert), computed from the loaded
16-bit weights (dynamic). The embedding, the LM head and the routers stay 16-bit. On a GPU the FP8 tensor cores need compute
capability 8.9 or newer; on the CPU the reference path emulates them (slow: for tests and quality numbers).

Pre-quantized checkpoints load as they are when config.json's `quantization_config` is compressed-tensors
FP8 (float, 8 bits) with per-channel or per-tensor weight scales, as llm-compressor writes them for vLLM
(per-tensor scales of q, k and v fill their rows of the fused QKV's per-channel scales). Their static
activation scales (`input_scale`) are not used: activations are quantized per token at run time. Block-wise
and other methods are refused by name.
"""

import logging

import torch
from torch import nn

from engine.config import QUANTIZATIONS
from engine.errors import ParameterError
from engine.models.linear import Linear
from engine.models.moe import SparseMoE
from kernels.fp8 import supports_fp8

logger = logging.getLogger(__name__)


def check_quantization(method: str | None, device: torch.device) -> None:
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ParameterError("quantization", f"got {method!r}, allowed None or {list(QUANTIZATIONS)}")
    if device.type == "cuda" and not supports_fp8(device):
        cap = torch.cuda.get_device_capability(device)
        raise ParameterError(
            "quantization", f"fp8 needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}"
        )
    if device.type == "cpu":
        logger.warning("quantization=fp8 on the CPU: emulated by the dequantizing reference (slow)")


def quantize_model(model: nn.Module, method: str | None) -> int:
    """Quantize the model's Linear layers in place; -> how many."""
    if method is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear | SparseMoE)]
    for layer in layers:
        layer.quantize_fp8()
    return len(layers)


def checkpoint_quantization(hf_config: dict) -> str | None:
    """The weight format a checkpoint is stored in: "fp8" for compressed-tensors FP8 (channel or tensor
    scales), None for none; anything else is a ValueError naming what is not supported."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"quantization_config: quant_method {method!r} is not supported; allowed: compressed-tensors (FP8)"
        )
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config: compressed-tensors without config_groups")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if kind[:2] != ("float", 8) or kind[2] not in ("channel", "tensor"):
            raise ValueError(
                f"quantization_config: group {name!r} stores weights as {kind}; allowed: float 8-bit with "
                "channel or tensor scales"
            )
        if not set(group.get("targets") or []) <= {"Linear"}:
            raise ValueError(
                f"quantization_config: group {name!r} targets {group.get('targets')}; allowed: Linear"
            )
    return "fp8"


def prepare_fp8_storage(model: nn.Module) -> None:
    """Before loading a pre-quantized checkpoint: every Linear and routed expert holds e4m3 weights and fp32
    scales."""
    for layer in model.modules():
        if isinstance(layer, Linear):
            layer.weight = nn.Parameter(layer.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
            layer.weight_scale = torch.ones(
                layer.out_features, dtype=torch.float32, device=layer.weight.device
            )
        elif isinstance(layer, SparseMoE):
            for name in ("w13", "w2"):
                w = getattr(layer, name).data
                setattr(layer, name, nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False))
                setattr(layer, f"{name}_scale", torch.ones(w.shape[:2], dtype=torch.float32, device=w.device))
