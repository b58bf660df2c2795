"""Decode attention over blocks of two formats (16-bit and rotated low-bit codes) in one split-KV pass,
against the oracle that decodes every coded block back and attends plainly."""

import pytest
import torch

from kernels.coded_attention import (
    coded_decode_attention,
    coded_decode_attention_ref,
    coded_prefill_attention,
    coded_prefill_attention_ref,
)
from kernels.turboquant import codebook, encode_ref, odd_polynomial, rotation_signs

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BS, HKV, D = 16, 2, 64


def _problem(bits: int, dtype: torch.dtype, heads: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(10, 2, BS, HKV, D, generator=g) * 0.7).to(dtype)
    signs = rotation_signs(seed + 1, 1, HKV, D)[0]
    rows = torch.randn(6 * 2 * BS, HKV, D, generator=g) * torch.linspace(0.3, 3, 6 * 2 * BS)[:, None, None]
    packed, norms = encode_ref(rows, signs, bits)  # [6 * 2 * bs, Hkv, ...]
    codes = packed.view(6, 2, BS, HKV, -1).contiguous()
    norms = norms.view(6, 2, BS, HKV).contiguous()
    # entries >= 10 name coded blocks: mixed orders, a partial last block, a sequence all of one kind
    tables = torch.tensor([[10, 11, 3, 7], [2, 14, 5, 0], [13, 12, 15, 0], [1, 4, 6, 8]], dtype=torch.int32)
    seq_lens = torch.tensor([57, 40, 48, 33], dtype=torch.int32)
    q = torch.randn(4, heads, D, generator=g).to(dtype)
    to = {"device": DEVICE}
    return (q.to(**to), base.to(**to), codes.to(**to), norms.to(**to), signs.to(**to), bits,
            tables.to(**to), seq_lens.to(**to))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    ("num_splits", "tile_n", "dequant", "passes"),
    [(1, 64, 0, 1), (3, 64, 1, 1), (2, 32, 0, 1), (2, 32, 1, 2)],
)
def test_mixed_format_decode_equals_the_decoding_oracle(dtype, bits, num_splits, tile_n, dequant, passes):
    args = _problem(bits, dtype, seed=bits)
    got = coded_decode_attention(
        *args, scale=D**-0.5, num_splits=num_splits, tile_n=tile_n, dequant=dequant, passes=passes
    )
    want = coded_decode_attention_ref(*args, scale=D**-0.5)
    assert not got.isnan().any()
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("bits", [3, 4])
def test_verify_rows_attend_causally_over_mixed_blocks(bits):
    """Three new tokens a sequence (verifying two drafts): each sees the context up to its own position."""
    q, base, codes, norms, signs, bits, tables, lens = _problem(bits, torch.float32, seed=bits + 10)
    q3 = torch.randn(4 * 3, q.shape[1], D, generator=torch.Generator().manual_seed(1)).to(q.device)
    got = coded_decode_attention(q3, base, codes, norms, signs, bits, tables, lens, D**-0.5, 2, query_len=3)
    want = coded_decode_attention_ref(q3, base, codes, norms, signs, bits, tables, lens, D**-0.5, query_len=3)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[torch.float32], f"relative error {err:.2e}"
    # the first new token of each sequence does not see the two after it
    first = coded_decode_attention(
        q3[::3].contiguous(), base, codes, norms, signs, bits, tables, lens - 2, D**-0.5
    )
    torch.testing.assert_close(got[::3], first, rtol=1e-4, atol=1e-5)


def test_codes_matter():
    """The coded blocks are read as codes: swapping one block's codes changes only its sequence's output."""
    args = list(_problem(4, torch.float32))
    before = coded_decode_attention(*args, scale=D**-0.5)
    args[2] = args[2].clone()
    args[2][4] = args[2][5]  # coded block 14 (sequence 1 only) now holds block 15's codes
    after = coded_decode_attention(*args, scale=D**-0.5)
    changed = (after - before).abs().amax(dim=(1, 2)) > 1e-3
    assert changed.tolist() == [False, True, False, False]


def test_bad_inputs_are_named():
    q, base, codes, norms, signs, bits, tables, lens = _problem(4, torch.float32)
    with pytest.raises(ValueError, match="codes: uint8"):
        coded_decode_attention(q, base, codes[..., :-1], norms, signs, bits, tables, lens, 1.0)
    with pytest.raises(ValueError, match="signs: fp32"):
        coded_decode_attention(q, base, codes, norms, signs[:1], bits, tables, lens, 1.0)
    with pytest.raises(ValueError, match="query_len"):
        coded_decode_attention(q, base, codes, norms, signs, bits, tables, lens, 1.0, query_len=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_varlen_prefill_over_mixed_blocks_equals_the_oracle(dtype, bits):
    """Prefill chunks and decodes packed in one step (query lengths 9, 1, 20, 1) over contexts that hold
    coded blocks: causal, each sequence its own."""
    q, base, codes, norms, signs, bits, tables, lens = _problem(bits, dtype, seed=bits + 20)
    qlens = [9, 1, 20, 1]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    qv = torch.randn(starts[-1], q.shape[1], D, generator=torch.Generator().manual_seed(3)).to(q)
    qsl = torch.tensor(starts, dtype=torch.int32, device=q.device)
    got = coded_prefill_attention(qv, base, codes, norms, signs, bits, tables, lens, qsl, max(qlens), D**-0.5)
    want = coded_prefill_attention_ref(qv, base, codes, norms, signs, bits, tables, lens, starts, D**-0.5)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    # a one-token sequence gets what the decode kernel gives it
    one = coded_decode_attention(qv[9:10], base, codes, norms, signs, bits, tables[1:2], lens[1:2], D**-0.5)
    torch.testing.assert_close(got[9:10], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "low_bits"), [(4, 2), (4, 3), (3, 2)])
def test_three_formats_in_one_table(dtype, bits, low_bits):
    """16-bit, `bits` and `low_bits` blocks in one block table (a policy with a horizon): decode and varlen
    against the oracle."""
    q, base, codes, norms, signs, bits, tables, lens = _problem(bits, dtype, seed=bits * 7 + low_bits)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3 * 2 * BS, HKV, D, generator=g) * 1.5
    packed, low_norms = encode_ref(rows, signs.cpu(), low_bits)
    low = (
        packed.view(3, 2, BS, HKV, -1).contiguous().to(q.device),
        low_norms.view(3, 2, BS, HKV).to(q.device),
        low_bits,
    )
    tables = tables.clone()
    tables[0, 2], tables[1, 0], tables[3, 3] = 16, 17, 18  # entries 16..18: the low pool (10 + 6 onwards)
    want = coded_decode_attention_ref(q, base, codes, norms, signs, bits, tables, lens, D**-0.5, low=low)
    for dequant, passes in ((0, 1), (1, 1), (1, 2)):
        got = coded_decode_attention(
            q,
            base,
            codes,
            norms,
            signs,
            bits,
            tables,
            lens,
            D**-0.5,
            2,
            low=low,
            dequant=dequant,
            passes=passes,
        )
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < TOL[dtype], f"dequant {dequant}, passes {passes}: relative error {err:.2e}"
    starts = [0, 3, 4, 9, 10]
    qv = torch.randn(10, q.shape[1], D, generator=g).to(q)
    qsl = torch.tensor(starts, dtype=torch.int32, device=q.device)
    got = coded_prefill_attention(qv, base, codes, norms, signs, bits, tables, lens, qsl, 5, D**-0.5, low=low)
    want = coded_prefill_attention_ref(
        qv, base, codes, norms, signs, bits, tables, lens, starts, D**-0.5, low=low
    )
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    # the low blocks are read: another low block's codes in entry 16 change sequence 0 only
    other = (low[0][[1, 1, 2]].contiguous(), low[1][[1, 1, 2]].contiguous(), low_bits)
    moved = coded_decode_attention(q, base, codes, norms, signs, bits, tables, lens, D**-0.5, 2, low=other)
    plain = coded_decode_attention(q, base, codes, norms, signs, bits, tables, lens, D**-0.5, 2, low=low)
    changed = (moved.float() - plain.float()).abs().amax(dim=(1, 2)) > 1e-4
    assert changed.tolist() == [True, False, False, False]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_odd_polynomial_is_the_codebook(bits):
    """The kernels' register dequantization (Horner in u^2, as they evaluate it) gives each centroid."""
    centroids, _ = codebook(bits, 128)
    assert torch.equal(centroids, -centroids.flip(0))  # odd: the polynomial holds on both halves
    a = odd_polynomial(bits, 128, "cpu")
    u = torch.arange(2**bits, dtype=torch.float32) * (2.0 / (2**bits - 1)) - 1.0
    c = torch.full_like(u, float(a[-1]))
    for k in range(len(a) - 2, -1, -1):
        c = c * u * u + a[k]
    torch.testing.assert_close(c * u, centroids, rtol=2e-5, atol=1e-7)


def test_an_fp8_recent_side_is_read_with_its_scales():
    """A pool whose recent blocks are e4m3 (per-(K/V, KV head) scales) beside the codes: decode and varlen
    read the e4m3 blocks as they are, against the oracle that scales them up; wrong scales are seen."""
    q, base, codes, norms, signs, bits, tables, lens = _problem(4, torch.float32, seed=21)
    scales = torch.tensor([[0.004, 0.01], [0.02, 0.003]], device=q.device)
    base8 = (base / scales[None, :, None, :, None]).to(torch.float8_e4m3fn)
    args = (q, base8, codes, norms, signs, bits, tables, lens)
    want = coded_decode_attention_ref(*args, D**-0.5, kv_scales=scales)
    got = coded_decode_attention(*args, D**-0.5, 2, kv_scales=scales)
    assert (got - want).norm() / want.norm() < TOL[torch.float32]
    # the fp8 side is read, not ignored: near the 16-bit answer, and the scales matter
    plain = coded_decode_attention_ref(q, base, codes, norms, signs, bits, tables, lens, D**-0.5)
    assert (got - plain).norm() / plain.norm() < 0.1
    other = coded_decode_attention(*args, D**-0.5, 2, kv_scales=scales * torch.tensor([[1.0], [2.0]]).to(q))
    assert (other - got).norm() / got.norm() > 0.05
    starts = [0, 3, 4, 9, 10]
    qv = torch.randn(10, q.shape[1], D, generator=torch.Generator().manual_seed(3)).to(q)
    qsl = torch.tensor(starts, dtype=torch.int32, device=q.device)
    got = coded_prefill_attention(qv, *args[1:], qsl, 5, D**-0.5, kv_scales=scales)
    want = coded_prefill_attention_ref(qv, *args[1:], starts, D**-0.5, kv_scales=scales)
    assert (got - want).norm() / want.norm() < TOL[torch.float32]
    with pytest.raises(ValueError, match="kv_scales"):
        coded_decode_attention(*args, D**-0.5, kv_scales=scales[:, :1])
