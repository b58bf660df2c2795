"""Loads a HF-format checkpoint (a directory, or a Hub id: engine/model_source.py): config, weights, and a
fingerprint for cache keys."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.kv.kv_format import FP8_KV, cache_torch_dtype
from engine.kv.kv_scales import prepare_fp8_kv
from engine.model_source import resolve_model
from engine.models import ModelConfig, build_model, resolve_architecture
from engine.models.config import model_config_from_hf
from engine.models.decoder import DecoderForCausalLM
from engine.models.weights import iter_weights, load_weights, safetensors_files
from engine.quantization import (
    check_quantization,
    checkpoint_quantization,
    prepare_fp8_storage,
    quantize_model,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: DecoderForCausalLM
    config: ModelConfig
    dtype: torch.dtype
    fingerprint: str  # identifies the weights: part of every KV block hash


def read_hf_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ValueError(f"model: {model_dir} has no config.json")
    return json.loads(config_path.read_text())


def read_model_config(model_dir: Path) -> ModelConfig:
    hf = read_hf_config(model_dir)
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
    return model_config_from_hf(hf, resolve_architecture(hf), gen)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    name = cfg.dtype if dtype == "auto" else dtype
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, allowed 'auto' or {sorted(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        return torch.bfloat16  # CPU fp16 matmuls are slow or missing
    return DTYPES[name]


def fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in safetensors_files(model_dir):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Small uniform random weights, as vLLM's dummy format: for timing, never for quality."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for param in model.parameters():
        param.data.uniform_(-1e-3, 1e-3, generator=gen)


def load_model(
    model_dir: str | Path,
    dtype: str,
    device: torch.device,
    load_format: str = "auto",
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> LoadedModel:
    """kv_cache_dtype fp8: the attention layers get KV scales to fill (from the checkpoint when it has them,
    else calibrated by the engine: engine/kv/kv_scales.py)."""
    model_dir = resolve_model(model_dir)
    cfg = read_model_config(model_dir)
    stored = checkpoint_quantization(read_hf_config(model_dir))
    if stored is not None:
        if quantization not in (None, stored):
            raise ValueError(f"quantization: got {quantization!r}, but the checkpoint is stored in {stored}")
        quantization = stored
    torch_dtype = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):  # no random init of weights that the checkpoint overwrites
        model = build_model(cfg).to(torch_dtype)
    model = model.to_empty(device=device)
    if stored is not None and load_format == "auto":
        prepare_fp8_storage(model)  # filled as stored: nothing left to quantize below
    if cache_torch_dtype(kv_cache_dtype, torch_dtype) == FP8_KV:
        prepare_fp8_kv(model)
    if load_format == "dummy":
        init_dummy_weights(model)
        model_id = f"dummy:{model_dir.resolve()}"
    elif load_format == "auto":
        load_weights(model, iter_weights(model_dir))
        model_id = fingerprint(model_dir)
    else:
        raise ValueError(f"load_format: got {load_format!r}, allowed 'auto', 'dummy'")
    model.eval().requires_grad_(False)
    check_quantization(quantization, device)
    if stored is None or load_format == "dummy":
        quantize_model(model, quantization)  # dynamic: from the loaded 16-bit weights
    if quantization is not None:
        model_id = f"{model_id}:{quantization}"  # other weights: other KV
    return LoadedModel(model, cfg, torch_dtype, model_id)
