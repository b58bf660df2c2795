"""Where the skinny GEMM replaces cuBLAS: Linear's dispatch by row bucket (the real kernel, interpreted on
the CPU) and the startup choice, made from a timer's numbers, kept only past MIN_GAIN."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import LLM
from engine.config import EngineConfig
from engine.errors import ParameterError
from engine.gemm_tuning import MIN_GAIN, row_buckets, tune_skinny_linears
from engine.models.linear import Linear, row_bucket
from kernels.skinny_gemm import SkinnyConfig, candidate_configs


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Linear(32, 48, bias=False), Linear(32, 48, bias=False), Linear(48, 32, bias=True))


def test_row_buckets_cover_every_batch_up_to_the_kernels_limit():
    assert row_buckets(1) == [1]
    assert row_buckets(48) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(8192) == [1, 2, 4, 8, 16, 32, 64]
    assert [row_bucket(r) for r in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]


def test_linear_runs_the_kernel_in_planned_buckets_and_torch_elsewhere():
    layer = _model()[2]
    layer.skinny = {4: SkinnyConfig(block_n=16, block_k=16, split_k=2, num_stages=2)}
    calls = []
    original = layer.skinny.get

    class Spy(dict):
        def get(self, key, default=None):
            calls.append(key)
            return original(key, default)

    layer.skinny = Spy(layer.skinny)
    for rows in (3, 7, 80):  # bucket 4 (kernel), 8 (no plan: torch), past the kernel's limit (torch)
        x = torch.randn(rows, 48)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == [4, 8]


def _scripted_timer(cublas_ms: float, kernel_ms: list[float]):
    """Runs each step once (the real GEMMs) and answers cuBLAS's time first, then the candidates' in turn."""
    answers = itertools.cycle([cublas_ms, *kernel_ms])

    def timer(fn):
        fn()
        return next(answers)

    return timer


def test_tuning_keeps_the_fastest_candidate_only_where_it_beats_cublas():
    model = _model()
    # every candidate list at these shapes has the same length: the script lines up with each (shape, rows)
    lengths = {len(candidate_configs(r, n, k, 1)) for r in row_buckets(8) for n, k in ((48, 32), (32, 48))}
    assert len(lengths) == 1
    n_candidates = lengths.pop()
    times = [1.0] * n_candidates
    times[1] = 0.5  # the second candidate wins, well past MIN_GAIN
    table = tune_skinny_linears(model, 8, _scripted_timer(1.0, times))
    assert len(table) == 2 * len(row_buckets(8))  # two shapes: (48, 32) shared by two layers, (32, 48)
    assert all(r["chosen"] for r in table)
    assert {r["layers"] for r in table if r["out_features"] == 48} == {2}
    for layer in model:
        assert sorted(layer.skinny) == row_buckets(8)
        for rows, cfg in layer.skinny.items():
            assert cfg == candidate_configs(rows, layer.out_features, layer.in_features, 1)[1]
    # a kernel within MIN_GAIN of cuBLAS is not worth it: cuBLAS stays, and old plans are cleared
    close = [1.0 - MIN_GAIN / 2] * n_candidates
    table = tune_skinny_linears(model, 8, _scripted_timer(1.0, close))
    assert not any(r["chosen"] for r in table)
    assert all(layer.skinny == {} for layer in model)


def test_skinny_gemm_option_is_checked(llama):
    with pytest.raises(ValueError, match="skinny_gemm"):
        EngineConfig(model=llama, skinny_gemm="yes")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="skinny_gemm"):
        LLM(llama, skinny_gemm=True)  # the CPU: nothing to tune, refused rather than ignored
    assert LLM(llama, skinny_gemm=False).engine.gemm_table == []
