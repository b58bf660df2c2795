"""Safetensors weights (one file or a sharded index, memory-mapped) mapped onto our parameter names."""

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.models.decoder import DecoderForCausalLM
from kernels.fp8 import quantize_per_channel

logger = logging.getLogger(__name__)

# HF name -> (our name, which part of our parameter). Parts: ("rows", k, n) = the k-th of n equal row blocks
# along dim 0 (or by explicit offsets for q/k/v); ("expert", e, k, n) = expert e, then as "rows".
_EXPERT = re.compile(
    r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.(weight|weight_scale)$"
)
_QKV = re.compile(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias|weight_scale)$")
_GATE_UP = re.compile(r"^(.*)\.(gate|up)_proj\.(weight|weight_scale)$")
# FP8 checkpoints' static activation scales: activations are quantized per token at run time instead
_UNUSED = re.compile(r"\.input_scale$")
# FP8 KV cache scales: vLLM's names, and compressed-tensors' (the K and V projections' output scales)
_KV_SCALE = re.compile(r"^(.*)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir}")
    return files


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def _target(name: str, params: dict[str, torch.Tensor], q_size: int, kv_size: int):
    """Our parameter and the slice of it that HF weight `name` fills."""
    if m := _EXPERT.match(name):
        prefix, expert, kind = m.group(1), int(m.group(2)), m.group(3)
        suffix = "_scale" if m.group(4) == "weight_scale" else ""
        if kind in ("w2", "down_proj"):
            return params[f"{prefix}.mlp.w2{suffix}"], (expert,)
        w13 = params[f"{prefix}.mlp.w13{suffix}"]
        half = w13.shape[1] // 2
        rows = slice(0, half) if kind in ("w1", "gate_proj") else slice(half, 2 * half)
        return w13, (expert, rows)
    if m := _QKV.match(name):
        prefix, which, kind = m.groups()
        start = {"q": 0, "k": q_size, "v": q_size + kv_size}[which]
        size = q_size if which == "q" else kv_size
        return params[f"{prefix}.self_attn.qkv_proj.{kind}"], (slice(start, start + size),)
    if m := _GATE_UP.match(name):
        param = params[f"{m.group(1)}.gate_up_proj.{m.group(3)}"]
        half = param.shape[0] // 2
        return param, (slice(0, half) if m.group(2) == "gate" else slice(half, 2 * half),)
    name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    return params[name], ()


def load_weights(model: DecoderForCausalLM, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy every checkpoint tensor into the model; unknown, missing or mis-shaped weights are errors."""
    cfg = model.config
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    # FP8 layers' per-channel scales (buffers), filled from the checkpoint's scales
    params |= {k: b for k, b in model.named_buffers() if k.endswith("_scale")}
    names = {id(p): k for k, p in params.items()}
    filled: dict[str, int] = {}
    unused = 0
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.lm_head is None):
            continue
        if _UNUSED.search(name):
            unused += 1
            continue
        if m := _KV_SCALE.match(name):
            _load_kv_scale(model, m.group(1), m.group(2) or m.group(3), tensor)
            continue
        try:
            param, index = _target(name, params, q_size, kv_size)
        except KeyError:
            raise ValueError(f"checkpoint: weight {name!r} has no place in {cfg.architecture}") from None
        dest = param.data[index] if index else param.data
        if tensor.dtype == torch.float8_e4m3fn and dest.dtype != tensor.dtype:
            raise ValueError(
                f"checkpoint: weight {name!r} is stored in FP8, but its layer is not quantized here "
                "(allowed: the decoder layers' Linear weights)"
            )
        if name.endswith("_scale"):  # per channel [n, 1], or one per tensor: one a row here
            tensor = (
                tensor.float().reshape(-1).expand(dest.shape) if tensor.numel() == 1 else tensor.reshape(-1)
            )
        if dest.shape != tensor.shape:
            raise ValueError(
                f"checkpoint: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
            )
        key = names[id(param)]
        if dest.dtype == torch.float8_e4m3fn and tensor.dtype != dest.dtype:
            # a layer an FP8 checkpoint left in 16 bits (its `ignore` list): quantized here, per channel
            tensor, scale = quantize_per_channel(tensor.reshape(-1, tensor.shape[-1]))
            scale_param = params[f"{key}_scale"]
            scale_dest = scale_param.data[index] if index else scale_param.data
            scale_dest.copy_(scale.view(scale_dest.shape))
            filled[f"{key}_scale"] = filled.get(f"{key}_scale", 0) + scale_dest.numel()
            tensor = tensor.view(dest.shape)
        dest.copy_(tensor)
        filled[key] = filled.get(key, 0) + dest.numel()
    if unused:
        logger.info(
            "checkpoint: %d static input scales not used (activations are quantized per token)", unused
        )
    missing = [k for k, p in params.items() if filled.get(k, 0) < p.numel()]
    if missing:
        raise ValueError(f"checkpoint: missing weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _load_kv_scale(model: DecoderForCausalLM, prefix: str, which: str, tensor: torch.Tensor) -> None:
    """One layer's K or V scale (one a tensor, or one a KV head) into its attention's `kv_scales`; ignored
    when the KV cache is not FP8 (the scales then have no use)."""
    try:
        attn = model.get_submodule(f"{prefix}.self_attn")
    except AttributeError:
        raise ValueError(f"checkpoint: KV scale of {prefix!r} has no place in the model") from None
    scales = attn.kv_scales
    if not isinstance(scales, torch.Tensor):  # a 16-bit cache
        return
    heads = int(scales.shape[1])
    if tensor.numel() not in (1, heads):
        raise ValueError(
            f"checkpoint: {prefix}.self_attn {which} scale has {tensor.numel()} values, allowed 1 or {heads}"
        )
    value = tensor.float().reshape(-1).expand(heads)
    if not torch.isfinite(value).all() or (value <= 0).any():
        raise ValueError(f"checkpoint: {prefix}.self_attn {which} scale must be finite and > 0")
    scales[0 if which == "k" else 1].copy_(value)
