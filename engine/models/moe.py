"""Sparse mixture-of-experts block: softmax top-k routing, stacked expert weights, optional shared expert.

Expert weights are stacked ([E, 2I, H] and [E, H, I]) so the grouped-matmul kernel takes them whole; on
the CPU the kernels' reference loops over the experts that received tokens.
"""

import torch
from torch import nn

from engine.models.config import MoEConfig
from engine.models.mlp import GatedMLP
from kernels.fp8 import quantize_per_channel
from kernels.moe import fused_moe, fused_moe_ref


class SparseMoE(nn.Module):
    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, hidden_size, cfg.intermediate_size))
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        self.register_buffer("w13_scale", None)  # FP8 experts: [E, 2I] and [E, H] fp32
        self.register_buffer("w2_scale", None)

    def quantize_fp8(self) -> None:
        """Routed experts' weights -> e4m3 with one scale per (expert, output channel)."""
        for name in ("w13", "w2"):
            w = getattr(self, name).data
            q, scale = quantize_per_channel(w.reshape(-1, w.shape[-1]))
            setattr(self, name, nn.Parameter(q.view(w.shape), requires_grad=False))
            setattr(self, f"{name}_scale", scale.view(w.shape[0], w.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = fused_moe if x.is_cuda else fused_moe_ref
        out = moe(
            x,
            self.w13,
            self.w2,
            self.gate(x),
            self.cfg.top_k,
            self.cfg.renormalize,
            self.w13_scale,
            self.w2_scale,
        )  # [T, H]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
