"""KV blocks converted between formats in one launch: 16-bit <-> e4m3 (per layer, K/V and head scales) and
e4m3 -> e4m3 under other scales, into shuffled destination blocks, against the torch reference; a 16-bit
block converted to e4m3 equals what the destination's own KV write stores.

On the CPU the Triton interpreter's fp32 -> e4m3 rounding is wrong off exactly representable values (ties
away from zero, no subnormals), so e4m3 destinations are checked there with values that land exactly on
e4m3 numbers; the GPU run checks arbitrary values."""

import pytest
import torch

from kernels.attention_ref import kv_write_ref
from kernels.kv_convert import FP8, convert_kv_blocks, convert_kv_blocks_ref

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SHAPE = (2, 2, 8, 3, 16)  # layers, K/V, block_size, kv heads, head_dim
DST_IDS = [5, 0, 3]


def _scales(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 ** torch.randint(-6, 2, (SHAPE[0], 2, SHAPE[3]), generator=g)).float().to(DEVICE)


def _e4m3_exact(n: int, scales: torch.Tensor, seed: int) -> torch.Tensor:
    """Blocks [n, *SHAPE] of e4m3 codes; times scales (powers of two) they are exact in any wider type."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    return codes.view(FP8).to(DEVICE)


def _pool(dtype: torch.dtype) -> torch.Tensor:
    return torch.full((6, *SHAPE), 7.0, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_e4m3_blocks_read_back_into_a_16_bit_pool(dst_dtype):
    src_scales = _scales(1)
    src = _e4m3_exact(3, src_scales, 2)
    ids = torch.tensor(DST_IDS, device=DEVICE)
    got, want = _pool(dst_dtype), _pool(dst_dtype)
    convert_kv_blocks(src, src_scales, got, ids, None)
    convert_kv_blocks_ref(src, src_scales, want, ids, None)
    assert torch.equal(got.float(), want.float())
    untouched = [i for i in range(6) if i not in DST_IDS]
    assert (got[untouched].float() == 7.0).all()


def test_16_bit_blocks_into_an_e4m3_pool_match_its_own_kv_write():
    pool_scales = _scales(3)
    codes = _e4m3_exact(3, pool_scales, 4)
    # 16-bit values that are e4m3 codes times the pool's scales (exact on the interpreter too)
    src = (codes.float() * pool_scales[:, :, None, :, None]).to(torch.bfloat16 if ON_GPU else torch.float32)
    ids = torch.tensor(DST_IDS, device=DEVICE)
    got = _pool(FP8)
    convert_kv_blocks(src.contiguous(), None, got, ids, pool_scales)
    assert torch.equal(got[ids].view(torch.uint8), codes.view(torch.uint8))
    # the destination's own write of the same K/V, layer by layer, stores the same bytes
    written = _pool(FP8)
    bs = SHAPE[2]
    for layer in range(SHAPE[0]):
        k, v = src[:, layer, 0].reshape(-1, *SHAPE[3:]), src[:, layer, 1].reshape(-1, *SHAPE[3:])
        slots = (ids[:, None] * bs + torch.arange(bs, device=DEVICE)).reshape(-1)
        kv_write_ref(k, v, written[:, layer], slots, pool_scales[layer].contiguous())
    assert torch.equal(written[ids].view(torch.uint8), got[ids].view(torch.uint8))


def test_e4m3_blocks_rescaled_into_a_pool_with_other_scales():
    src_scales, pool_scales = _scales(5), _scales(6)
    src = _e4m3_exact(3, src_scales, 7)
    ids = torch.tensor(DST_IDS, device=DEVICE)
    got, want = _pool(FP8), _pool(FP8)
    convert_kv_blocks(src, src_scales, got, ids, pool_scales)
    convert_kv_blocks_ref(src, src_scales, want, ids, pool_scales)
    if ON_GPU:  # arbitrary ratios: the hardware's round-to-nearest-even equals torch's
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    else:  # powers of two: exact unless a value leaves e4m3's normal range
        close = (got.float() - want.float()).abs() <= want.float().abs() * 2**-3 + 2**-9
        assert close.all()


@pytest.mark.skipif(not ON_GPU, reason="gpu: arbitrary values round as the hardware does")
@pytest.mark.gpu
def test_random_bf16_blocks_into_e4m3_equal_the_reference():
    pool_scales = torch.rand(SHAPE[0], 2, SHAPE[3], device=DEVICE) * 0.05 + 0.001
    src = torch.randn(4, *SHAPE, device=DEVICE, dtype=torch.bfloat16) * 3
    ids = torch.tensor([1, 4, 2, 0], device=DEVICE)
    got, want = _pool(FP8), _pool(FP8)
    convert_kv_blocks(src, None, got, ids, pool_scales)
    convert_kv_blocks_ref(src, None, want, ids, pool_scales)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_bad_scales_are_named():
    src = torch.zeros(1, *SHAPE, device=DEVICE)
    pool = _pool(FP8)
    with pytest.raises(ValueError, match="pool_scales: an e4m3 block needs scales"):
        convert_kv_blocks(src, None, pool, torch.tensor([0]), None)
    with pytest.raises(ValueError, match=r"pool_scales: need contiguous fp32 \[2, 2, 3\]"):
        convert_kv_blocks(src, None, pool, torch.tensor([0]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="blocks:"):
        convert_kv_blocks(src, None, _pool(torch.float32)[:, :1], torch.tensor([0]), None)
