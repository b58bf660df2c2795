"""The gated SiLU MLP with gate and up projections fused into one matmul."""

import torch
from torch import nn

from engine.models.linear import Linear
from kernels.activation import silu_and_mul, silu_and_mul_ref


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(silu_and_mul(h) if h.is_cuda else silu_and_mul_ref(h))  # [T, H]
