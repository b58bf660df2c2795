"""nn.Linear whose decode-sized inputs run the skinny GEMM where a startup measurement found it faster.

`skinny` maps a row bucket (the next power of two of the input's rows, at most MAX_SKINNY_M) to the kernel
config that won at that bucket (engine/gemm_tuning.py); buckets not in it, larger inputs and CPU tensors go
to torch (cuBLAS). Parameter names stay nn.Linear's, so checkpoints load unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kernels.skinny_gemm import MAX_SKINNY_M, SkinnyConfig, skinny_gemm


def row_bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.skinny: dict[int, SkinnyConfig] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and x.dim() == 2 and x.shape[0] <= MAX_SKINNY_M:
            config = self.skinny.get(row_bucket(x.shape[0]))
            if config is not None:
                return skinny_gemm(x, self.weight, self.bias, config)
        return F.linear(x, self.weight, self.bias)
