"""kv_cache_dtype="fp8": the pool is e4m3 with per-(layer, KV head) scales, calibrated at engine start or given
by the checkpoint; it holds twice the blocks of a 16-bit pool, its format is part of every block hash, and
the engine serves from it (the torch backend dequantizes pages as it reads them on the CPU)."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.config import CacheConfig
from engine.kv.kv_format import FP8_KV, FP8_MAX, KVFormat, calibrated_scales
from engine.kv.kv_scales import attention_layers, stacked_scales
from engine.models.weights import iter_weights
from kernels.attention_ref import dequantize_kv

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(40, 40 + 37))  # 2 full blocks and a partial one


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="kv_cache_dtype: got 'int8'"):
        CacheConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="e5m2 is not implemented"):
        CacheConfig(kv_cache_dtype="fp8_e5m2")
    assert CacheConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"


def test_fp8_pool_holds_twice_the_blocks_of_a_bf16_pool(llama):
    budget = 4 * 2**20
    bf16 = LLM(llama, dtype="bfloat16", kv_cache_memory_bytes=budget).engine
    fp8 = LLM(llama, dtype="bfloat16", kv_cache_memory_bytes=budget, kv_cache_dtype="fp8").engine
    assert bf16.kv_pool.dtype == torch.bfloat16 and fp8.kv_pool.dtype == FP8_KV
    assert fp8.block_manager.num_blocks == 2 * bf16.block_manager.num_blocks
    assert fp8.kv_pool.nbytes == bf16.kv_pool.nbytes


def test_calibration_sets_every_layer_s_scales_the_same_way_on_every_start(llama):
    a = LLM(llama, num_blocks=32, kv_cache_dtype="fp8").engine
    b = LLM(llama, num_blocks=32, kv_cache_dtype="fp8").engine
    scales = stacked_scales(a.model)
    assert scales is not None and scales.shape == (
        a.model_config.num_layers,
        2,
        a.model_config.num_kv_heads,
    )
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(scales, stacked_scales(b.model))  # replicas share blocks: same scales, same tag
    assert a.kv_format.tag == b.kv_format.tag and a.kv_format.tag.startswith("fp8:")
    assert a.block_manager.num_free_blocks == 32  # the calibration prefill gave its blocks back
    plain = LLM(llama, num_blocks=32).engine
    assert plain.kv_format.tag == "float32" and plain._hash_extra(None) != a._hash_extra(None)


def test_calibrated_scales_bound_every_rotation_of_the_keys():
    k = torch.tensor([[[3.0, 0.0, 4.0, 1.0]]])  # one token, one head: pairs (3, 4) and (0, 1)
    v = torch.tensor([[[-2.0, 0.5, 0.0, 1.0]]])
    scales = calibrated_scales(k, v, headroom=1.0)
    # 5 / 448 and 2 / 448, each rounded up to a power of two
    torch.testing.assert_close(scales, torch.tensor([[2.0**-6], [2.0**-7]]))
    assert (scales >= torch.tensor([[5.0], [2.0]]) / FP8_MAX).all()


def test_fp8_pool_holds_the_16_bit_kv_to_e4m3_precision(llama):
    """The same prompt written by a float32 engine and an fp8 one: the fp8 pool, read back with its scales,
    is the float32 pool to within e4m3's relative step (2^-3 with rounding), and nothing saturates."""
    ref = LLM(llama, num_blocks=16)
    fp8 = LLM(llama, num_blocks=16, kv_cache_dtype="fp8")
    outs = [llm.generate([PROMPT], GREEDY)[0] for llm in (ref, fp8)]
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    ids = [llm.engine.block_manager.cached_block_id(h) for llm in (ref, fp8) for h in _hashes(llm)]
    n = len(ids) // 2
    assert n == 2  # the two full blocks are in each prefix cache
    scales = stacked_scales(fp8.engine.model)
    assert scales is not None
    for layer in range(ref.engine.model_config.num_layers):
        want = ref.engine.kv_pool[ids[:n], layer]  # [n, 2, bs, Hkv, D]
        got = dequantize_kv(fp8.engine.kv_pool[ids[n:], layer], scales[layer], torch.float32)
        assert (got - want).abs().max() <= want.abs().max() * 2**-3
        assert fp8.engine.kv_pool[ids[n:], layer].float().abs().max() < FP8_MAX  # the headroom held


def _hashes(llm: LLM) -> list[bytes]:
    from engine.kv.block_hash import update_block_hashes
    from engine.request import Request

    probe = Request("probe", PROMPT, GREEDY, hash_extra=llm.engine._hash_extra(None))
    update_block_hashes(probe, llm.engine.block_manager.block_size)
    return probe.block_hashes


def test_fp8_engine_serves_batches_and_prefix_hits_alike(llama):
    """Batched decode (gathered pages), single-sequence steps and a prefix-cache hit read the same e4m3
    pages: a prompt's greedy tokens do not depend on which path or batch served them."""
    llm = LLM(llama, num_blocks=64, kv_cache_dtype="fp8")
    prompts = [PROMPT, [5, 9, 13, 200, 41], list(range(100, 140))]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    before = llm.engine.stats.prompt_tokens_computed
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == alone
    assert llm.engine.stats.prompt_tokens_computed - before < sum(len(p) for p in prompts)  # hits


def _with_kv_scales(src: str, out, layers: int, value: float):
    shutil.copytree(src, out)
    tensors = dict(iter_weights(out))
    for path in out.glob("*.safetensors*"):
        path.unlink()
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(value)
        tensors[f"model.layers.{i}.self_attn.v_proj.output_scale"] = torch.tensor([2 * value])
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def test_checkpoint_kv_scales_are_used_as_given(llama, tmp_path):
    num_layers = LLM(llama, num_blocks=4).engine.model_config.num_layers
    path = _with_kv_scales(llama, tmp_path / "scaled", num_layers, 0.01)
    engine = LLM(path, num_blocks=16, kv_cache_dtype="fp8").engine
    scales = stacked_scales(engine.model)
    assert scales is not None
    assert (scales[:, 0] == 0.01).all() and (scales[:, 1] == 0.02).all()  # per tensor -> every head
    assert engine.kv_format.tag == KVFormat(FP8_KV, scales).tag
    # a 16-bit cache has no use for them: loaded and dropped
    assert all(a.kv_scales is None for a in attention_layers(LLM(path, num_blocks=4).engine.model))


def test_checkpoint_kv_scales_for_some_layers_only_are_refused(llama, tmp_path):
    path = _with_kv_scales(llama, tmp_path / "partial", 1, 0.01)
    with pytest.raises(ValueError, match=r"KV scales \(k_scale, v_scale\) missing for layers \[1"):
        LLM(path, num_blocks=16, kv_cache_dtype="fp8")
