"""nn.Linear with FP8 weights as an option, and decode-sized inputs on the skinny GEMM where it measured faster.

`skinny` maps a row bucket (the next power of two of the input's rows, at most MAX_SKINNY_M) to the kernel
config that won at that bucket (engine/gemm_tuning.py); buckets not in it and larger inputs take the dense
path: cuBLAS for 16-bit weights; for FP8 weights W8A8 on the FP8 tensor cores (per-token activation scales)
on a GPU, the dequantizing reference on the CPU. Parameter names stay nn.Linear's, so checkpoints load
unchanged; an FP8 layer adds `weight_scale` [out] (per output channel).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fp8 import fp8_linear_ref, fp8_linear_w8a8, quantize_per_channel
from kernels.skinny_gemm import MAX_SKINNY_M, SkinnyConfig, skinny_gemm


def row_bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


class Linear(nn.Linear):
    weight_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.skinny: dict[int, SkinnyConfig] = {}
        self.register_buffer("weight_scale", None)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale is not None

    def quantize_fp8(self) -> None:
        """The loaded 16-bit weight -> e4m3 with one fp32 scale per output channel (dynamic quantization)."""
        w_q, scale = quantize_per_channel(self.weight.data)
        self.weight = nn.Parameter(w_q, requires_grad=False)
        self.weight_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and x.dim() == 2 and x.shape[0] <= MAX_SKINNY_M:
            config = self.skinny.get(row_bucket(x.shape[0]))
            if config is not None:
                return skinny_gemm(x, self.weight, self.bias, config, self.weight_scale)
        return self.dense(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The path without the skinny kernel (the tuner's baseline)."""
        if self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        if not x.is_cuda:
            return fp8_linear_ref(x, self.weight, self.weight_scale, self.bias)
        if (
            x.dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        ):
            return fp8_linear_w8a8(
                x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.bias
            ).view(*x.shape[:-1], self.out_features)
        # shapes or dtypes the scaled matmul does not take: dequantize (correct, not fast)
        w = (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(x.dtype)
        return F.linear(x, w, self.bias)
