"""quantization="fp8": the decoder layers' Linear weights become e4m3 with per-channel scales at load, the
engine runs them (the dequantizing reference on the CPU, the skinny kernel where planned), and the
quantized model is a different model for the KV cache."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.models.linear import Linear
from engine.models.moe import SparseMoE
from engine.models.weights import iter_weights
from kernels.fp8 import FP8_DTYPE, FP8_MAX, fp8_linear_ref, quantize_per_channel
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
    experts = [m for m in fp8.model.modules() if isinstance(m, SparseMoE)]
    assert experts and all(m.w13.dtype == FP8_DTYPE and m.w2_scale.shape == m.w2.shape[:2] for m in experts)
    assert fp8.model.model.layers[0].mlp.gate.weight.dtype != FP8_DTYPE  # the router stays 16-bit
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


def test_fp8_moe_engine_runs_its_experts_in_fp8(tiny_model):
    llm = LLM(tiny_model("mixtral"), num_blocks=64, quantization="fp8")
    out = llm.generate([[5, 9, 13, 200, 41]], SamplingParams(temperature=0.0, max_tokens=6, logprobs=1))
    assert len(out[0].outputs[0].token_ids) == 6
    assert all(lp and all(v <= 0 for v in lp.values()) for lp in out[0].outputs[0].logprobs)


def test_fp8_option_is_checked(llama):
    with pytest.raises(ValueError, match="quantization: got 'int4'"):
        LLM(llama, quantization="int4")
    assert EngineConfig(model=llama, quantization="fp8").quantization == "fp8"


LINEAR = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


IGNORED = "model.layers.1.mlp.down_proj"  # left in 16 bits by the checkpoint (its ignore list)


def _compressed_tensors(src: str, out: Path, strategy: str, quantize_lm_head: bool = False) -> str:
    """The checkpoint as llm-compressor writes FP8 for vLLM: e4m3 Linear weights, their scales, static
    input scales, and a compressed-tensors quantization_config; one layer left in 16 bits."""
    shutil.copytree(src, out)
    tensors = dict(iter_weights(out))
    for path in out.glob("*.safetensors*"):
        path.unlink()
    for name in [n for n in tensors if LINEAR.search(n) or (quantize_lm_head and n == "lm_head.weight")]:
        if name.startswith(IGNORED):
            continue
        w = tensors[name]
        if strategy == "channel":
            q, scale = quantize_per_channel(w)
            scale = scale[:, None]
        else:
            scale = (w.abs().amax().float() / FP8_MAX).reshape(1)
            q = (w.float() / scale).to(FP8_DTYPE)
        tensors[name], tensors[f"{name}_scale"] = q, scale
        tensors[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": [IGNORED] + ([] if quantize_lm_head else ["lm_head"]),
    }
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_prequantized_channel_checkpoint_loads_as_stored(llama, tmp_path):
    path = _compressed_tensors(llama, tmp_path / "fp8-channel", "channel")
    stored = load_model(path, "auto", torch.device("cpu"))  # no option needed: the checkpoint says fp8
    dynamic = load_model(llama, "auto", torch.device("cpu"), quantization="fp8")
    stored_layers = dict(stored.model.named_modules())
    for name, layer in dynamic.model.named_modules():
        if isinstance(layer, Linear):  # per-channel: quantizing q, k, v apart equals the fused rows; the
            # ignored layer is quantized at load like the dynamic path
            assert torch.equal(stored_layers[name].weight.view(torch.uint8), layer.weight.view(torch.uint8))
            assert torch.equal(stored_layers[name].weight_scale, layer.weight_scale)
    prompts = [[5, 9, 13, 200, 41]]
    assert [o.outputs[0].token_ids for o in LLM(path, num_blocks=32).generate(prompts, GREEDY)] == [
        o.outputs[0].token_ids
        for o in LLM(llama, num_blocks=32, quantization="fp8").generate(prompts, GREEDY)
    ]


def test_prequantized_tensor_scales_fill_the_fused_rows(llama, tmp_path):
    path = _compressed_tensors(llama, tmp_path / "fp8-tensor", "tensor")
    raw = dict(iter_weights(Path(path)))
    model = load_model(path, "auto", torch.device("cpu")).model
    qkv = model.model.layers[0].self_attn.qkv_proj
    q, k, v = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    want = torch.cat([raw[n].float() * raw[f"{n}_scale"] for n in (q, k, v)])
    torch.testing.assert_close(qkv.weight.float() * qkv.weight_scale[:, None], want, rtol=0, atol=0)
    assert len(set(qkv.weight_scale.tolist())) == 3  # one scale per stored tensor


def test_unsupported_checkpoint_formats_are_named(llama, tmp_path):
    path = _compressed_tensors(llama, tmp_path / "fp8", "channel")
    config = json.loads((Path(path) / "config.json").read_text())
    for change, message in [
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
        (
            {"config_groups": {"g": {"targets": ["Linear"], "weights": {"type": "int", "num_bits": 4}}}},
            "allowed: float 8-bit with channel or tensor scales",
        ),
    ]:
        (Path(path) / "config.json").write_text(
            json.dumps({**config, "quantization_config": {**config["quantization_config"], **change}})
        )
        with pytest.raises(ValueError, match=re.escape(message)):
            load_model(path, "auto", torch.device("cpu"))
    lm_head = _compressed_tensors(llama, tmp_path / "fp8-head", "channel", quantize_lm_head=True)
    with pytest.raises(ValueError, match="'lm_head.weight' is stored in FP8"):
        load_model(lm_head, "auto", torch.device("cpu"))
