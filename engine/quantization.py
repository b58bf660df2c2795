"""Weight quantization at load: which methods exist, where they can run, and applying one to a model.

`fp8`: every Linear of the decoder layers (attention QKV and output, MLP gate/up and down, shared experts)
goes to e4m3 with per-output-channel scales, computed from the loaded 16-bit weights (dynamic). The
embedding, the LM head and MoE routed experts stay 16-bit. On a GPU the FP8 tensor cores need compute
capability 8.9 or newer; on the CPU the reference path emulates them (slow: for tests and quality numbers).
"""

import logging

import torch
from torch import nn

from engine.config import QUANTIZATIONS
from engine.errors import ParameterError
from engine.models.linear import Linear
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
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.quantize_fp8()
    return len(layers)
