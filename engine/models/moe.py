"""Sparse mixture-of-experts block: softmax top-k routing, stacked expert weights, optional shared expert.

Expert weights are stacked ([E, 2I, H] and [E, H, I]) so a grouped-matmul kernel can take them whole; this
file's forward is the reference loop over the experts that received tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.config import MoEConfig
from engine.models.mlp import GatedMLP


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] fp32, expert ids [T, k])."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.cfg.top_k, self.cfg.renormalize)  # [T, k]
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)  # [T, H]
        for expert in ids.unique().tolist():
            token_idx, slot = torch.where(ids == expert)
            gate, up = F.linear(x[token_idx], self.w13[expert]).chunk(2, dim=-1)  # [t, I] each
            y = F.linear(F.silu(gate) * up, self.w2[expert])  # [t, H]
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
