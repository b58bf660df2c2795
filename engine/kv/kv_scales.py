"""An FP8 KV cache's scales: each attention layer's `kv_scales` [2, kv_heads], given by the checkpoint or
calibrated at engine start (engine/kv/kv_format.py says why there and how)."""

import logging

import torch

from engine.attention import AttentionBackend, AttentionMetadata, ForwardContext
from engine.kv.block_manager import BlockManager
from engine.kv.pool import layer_views
from engine.models.decoder import DecoderForCausalLM, SelfAttention

logger = logging.getLogger(__name__)

CALIBRATION_ID = "kv-scale-calibration"


def attention_layers(model: DecoderForCausalLM) -> list[SelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


def prepare_fp8_kv(model: DecoderForCausalLM) -> None:
    """Give every attention layer scales to fill: NaN until the checkpoint or calibration sets them."""
    for attn in attention_layers(model):
        attn.kv_scales = torch.full(
            (2, attn.num_kv_heads), float("nan"), dtype=torch.float32, device=attn.qkv_proj.weight.device
        )


def stacked_scales(model: DecoderForCausalLM) -> torch.Tensor | None:
    """Every layer's scales [L, 2, kv_heads] (on the host), or None for a 16-bit cache."""
    layers = [a.kv_scales for a in attention_layers(model)]
    if not layers or layers[0] is None:
        return None
    return torch.stack([s for s in layers if s is not None]).cpu()


def needs_calibration(model: DecoderForCausalLM) -> bool:
    """True when the checkpoint gave no KV scales; ValueError when it gave some layers' only."""
    scales = stacked_scales(model)
    if scales is None:
        return False
    unset = scales.isnan()
    if unset.all():
        return True
    if unset.any():
        missing = sorted({int(i) for i in unset.nonzero()[:, 0]})
        raise ValueError(f"checkpoint: KV scales (k_scale, v_scale) missing for layers {missing[:8]}")
    return False


@torch.inference_mode()
def calibrate_kv_scales(
    model: DecoderForCausalLM,
    kv_pool: torch.Tensor,
    backend: AttentionBackend,
    block_manager: BlockManager,
    token_ids: list[int],
) -> None:
    """One eager prefill of `token_ids` into blocks borrowed from the pool (given back after): each layer sets
    its scales from its own K and V before writing them, so later layers see quantized attention as served."""
    bs = block_manager.block_size
    token_ids = token_ids[: block_manager.num_free_blocks * bs]
    n = len(token_ids)
    if n == 0:
        raise ValueError("kv_cache_dtype: fp8 calibration needs at least one token and one free block")
    blocks = block_manager.allocate_blocks(CALIBRATION_ID, -(-n // bs), [])
    assert blocks is not None
    try:
        dev = kv_pool.device
        table = torch.tensor(blocks, dtype=torch.int32, device=dev)
        positions = torch.arange(n, device=dev)
        attn = AttentionMetadata(
            slot_mapping=table.long()[positions // bs] * bs + positions % bs,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=table[None, :],
            max_query_len=n,
            max_seq_len=n,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[n],
            block_size=bs,
        )
        backend.plan(attn, model.config.num_kv_heads)
        cos, sin = model.rotary.cos_sin(positions)
        ctx = ForwardContext(attn, layer_views(kv_pool), backend, cos, sin, calibrate_kv=True)
        model(torch.tensor(token_ids, device=dev), ctx)
    finally:
        block_manager.free_blocks(CALIBRATION_ID)
    scales = stacked_scales(model)
    assert scales is not None and torch.isfinite(scales).all()
    logger.info(
        "FP8 KV scales calibrated on %d tokens: K %.3g..%.3g, V %.3g..%.3g",
        n,
        scales[:, 0].min(),
        scales[:, 0].max(),
        scales[:, 1].min(),
        scales[:, 1].max(),
    )
