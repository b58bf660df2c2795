"""The decoder-only transformer shared by Llama, Mistral, Qwen2/2.5/3 and their MoE variants.

Families differ only in config flags (qkv bias, q/k norm, sliding window, MoE layers), so one module
tree serves them all. Parameter names follow HF's, except q/k/v and gate/up, which are fused.
"""

import torch
from torch import nn

from engine.attention import ForwardContext
from engine.kv.kv_format import calibrated_scales
from engine.models.config import ModelConfig
from engine.models.linear import Linear
from engine.models.mlp import GatedMLP
from engine.models.moe import SparseMoE
from engine.models.norm import RMSNorm
from engine.models.rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_windows[layer_idx]
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # an FP8 KV cache's scales [2 (K, V), kv_heads] fp32 (engine/kv/kv_format.py); None: 16-bit KV
        self.kv_scales: torch.Tensor | None
        self.register_buffer("kv_scales", None)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.o_proj(self.attend(self.project(x, ctx), ctx).flatten(1))

    def project(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [T, hidden] -> rotated q [T, Hq, D]; the new K/V are written to the pool."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.calibrate_kv and self.kv_scales is not None:  # before this layer's first write
            self.kv_scales.copy_(calibrated_scales(k, v))
        return ctx.backend.rope_and_write_kv(
            q, k, v, ctx.cos, ctx.sin, ctx.kv_caches[self.layer_idx], ctx.attn, self.kv_scales
        )

    def attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [T, Hq, D] -> attention output [T, Hq, D] over the paged pool."""
        kv_cache = ctx.kv_caches[self.layer_idx]
        coded = ctx.coded[self.layer_idx] if ctx.coded is not None else None
        return ctx.backend.attend(
            q, kv_cache, ctx.attn, self.scale, self.sliding_window, self.kv_scales, coded
        )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.mlp: SparseMoE | GatedMLP
        if cfg.moe is not None and layer_idx in cfg.moe.sparse_layers:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        q, residual = self.before_attention(x, residual, ctx)
        return self.after_attention(self.self_attn.attend(q, ctx), residual)

    def before_attention(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        """-> (q [T, Hq, D], residual): everything up to attention (the K/V written)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(x, ctx), residual

    def after_attention(self, o: torch.Tensor, residual: torch.Tensor):
        """Attention output [T, Hq, D] -> (x, residual) for the next layer."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(o.flatten(1)), residual)
        return self.mlp(x), residual


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer in self.layers:
            x, residual = layer(x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    """input_ids [T] (a flattened batch) -> hidden states [T, H]; compute_logits -> fp32 [N, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()
