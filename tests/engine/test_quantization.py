"""quantization="fp8": the decoder layers' Linear weights become e4m3 with per-channel scales at load, the
engine runs them (the dequantizing reference on the CPU, the skinny kernel where planned), and the
quantized model is a different model for the KV cache."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.models.linear import Linear
from kernels.fp8 import FP8_DTYPE, fp8_linear_ref
from kernels.skinny_gemm import SkinnyConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_fp8_load_quantizes_every_decoder_linear(tiny_model):
    path = tiny_model("qwen2_moe")  # qkv bias, shared experts, routed experts
    plain = load_model(path, "auto", torch.device("cpu"))
    fp8 = load_model(path, "auto", torch.device("cpu"), quantization="fp8")
    linears = {n: m for n, m in fp8.model.named_modules() if isinstance(m, Linear)}
    assert linears and all(
        m.weight.dtype == FP8_DTYPE and m.weight_scale is not None for m in linears.values()
    )
    assert any("shared_expert" in n for n in linears) and any("qkv_proj" in n for n in linears)
    assert fp8.fingerprint == plain.fingerprint + ":fp8"
    # the embedding and the LM head stay 16-bit
    assert fp8.model.model.embed_tokens.weight.dtype == plain.model.model.embed_tokens.weight.dtype
    # each layer's output is the reference's, close to the 16-bit layer's
    ref_layers = dict(plain.model.named_modules())
    x = torch.randn(3, next(iter(linears.values())).in_features)
    for name, layer in linears.items():
        if layer.in_features != x.shape[1]:
            continue
        out = layer(x.to(layer.bias.dtype if layer.bias is not None else torch.float32))
        torch.testing.assert_close(out, fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.bias))
        want = ref_layers[name](x)
        assert (out - want).norm() / want.norm() < 0.06


def test_fp8_engine_generates_and_the_skinny_path_matches_the_reference(llama):
    llm = LLM(llama, num_blocks=64, quantization="fp8")
    prompts = [[5, 9, 13, 200, 41], list(range(30, 70))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert all(len(t) == 8 for t in want)
    # every decode-sized matmul on the skinny kernel (interpreted here) reading e4m3 + scales
    for layer in llm.engine.model.modules():
        if isinstance(layer, Linear):
            layer.skinny = {
                b: SkinnyConfig(block_n=32, block_k=32, split_k=2, num_stages=2) for b in (1, 2, 4)
            }
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want


def test_fp8_option_is_checked(llama):
    with pytest.raises(ValueError, match="quantization: got 'int4'"):
        LLM(llama, quantization="int4")
    assert EngineConfig(model=llama, quantization="fp8").quantization == "fp8"
