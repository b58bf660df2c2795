"""The rotated low-bit KV codec: Lloyd-Max codebooks for a rotated unit vector's coordinates, round-trip error
against theory whatever the input's shape, packing, the Triton encoder against the reference, and attention's
shortcut (a rotated query against codes read as they are)."""

import pytest
import torch

from kernels.turboquant import (
    codebook,
    decode_ref,
    decode_rotated_ref,
    encode,
    encode_ref,
    expected_distortion,
    pack_codes,
    rotate_queries,
    rotation_signs,
    transcode,
    unpack_codes,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GAUSSIAN_LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497}  # MSE a unit-variance coordinate


def skewed_rows(n: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """Rows nothing like isotropic: a few coordinates 20x the rest, a bias, per-row scales over 3 decades
    (keys look like this: outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(dim)
    scale[torch.randperm(dim, generator=g)[:4]] = 20.0
    rows = torch.randn(n, heads, dim, generator=g) * scale + 0.5
    return rows * torch.logspace(-1.5, 1.5, n)[:, None, None]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_is_the_rotated_coordinate_s_lloyd_max_quantizer(bits):
    centroids, bounds = codebook(bits, 128)
    assert centroids.shape == (2**bits,) and torch.all(centroids[1:] > centroids[:-1])
    torch.testing.assert_close(centroids, -centroids.flip(0))  # symmetric
    torch.testing.assert_close(bounds, (centroids[1:] + centroids[:-1]) / 2)
    # a coordinate is about N(0, 1/D): the distortion of a unit vector is the Gaussian figure
    assert expected_distortion(bits, 128) == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=0.03)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_error_matches_theory_for_any_input(bits):
    dim = 128
    x = skewed_rows(512, 2, dim, seed=bits)
    signs = rotation_signs(7, 1, 2, dim)[0]
    packed, norms = encode_ref(x, signs, bits)
    assert packed.shape == (512, 2, dim * bits // 8) and packed.dtype == torch.uint8
    x2 = decode_ref(packed, norms, signs, bits)
    rel = ((x2 - x) ** 2).sum(-1) / (x**2).sum(-1)  # [N, H]
    theory = expected_distortion(bits, dim)
    torch.testing.assert_close(norms, x.norm(dim=-1))
    # a randomized Hadamard is not a uniform rotation: spiky rows come out a little better, never worse
    assert 0.6 * theory < rel.mean().item() < 1.05 * theory
    # without the rotation the outlier coordinates own the error: the same quantizer, unrotated, is 3x worse
    u = x / x.norm(dim=-1, keepdim=True)
    centroids, bounds = codebook(bits, dim)
    plain = centroids[torch.bucketize(u, bounds)]
    assert ((plain - u) ** 2).sum(-1).mean() > 3 * rel.mean()
    # isotropic rows: the theory's figure
    g = torch.randn(2048, 2, dim, generator=torch.Generator().manual_seed(bits))
    packed, norms = encode_ref(g, signs, bits)
    rel_g = ((decode_ref(packed, norms, signs, bits) - g) ** 2).sum(-1) / (g**2).sum(-1)
    assert rel_g.mean().item() == pytest.approx(theory, rel=0.05)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (5, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [32, 128])
def test_triton_encode_equals_the_reference(bits, dim):
    x = skewed_rows(24, 3, dim, seed=dim + bits).to(DEVICE)
    signs = rotation_signs(11, 1, 3, dim)[0].to(DEVICE)
    got, got_norms = encode(x, signs, bits)
    want, want_norms = encode_ref(x, signs, bits)
    torch.testing.assert_close(got_norms, want_norms)
    got_codes, want_codes = unpack_codes(got, bits, dim), unpack_codes(want, bits, dim)
    differ = got_codes != want_codes
    # fp32 sums in another order may put a coordinate sitting on a boundary in the next cell, no further
    assert differ.float().mean() < 1e-3
    assert ((got_codes.int() - want_codes.int()).abs() <= 1).all()


def test_attention_reads_codes_with_the_query_rotated_once():
    dim, bits, group = 64, 4, 4
    x = skewed_rows(40, 2, dim, seed=5)
    signs = rotation_signs(3, 1, 2, dim)[0]
    packed, norms = encode_ref(x, signs, bits)
    q = torch.randn(6, 2 * group, dim)
    rq = rotate_queries(q, signs, group)  # [T, Hq, D]
    rotated = decode_rotated_ref(packed, norms, bits, dim)  # [N, Hkv, D]
    full = decode_ref(packed, norms, signs, bits)
    kv_head = torch.arange(2 * group) // group
    scores_fast = torch.einsum("thd,nhd->thn", rq, rotated[:, kv_head])
    scores_slow = torch.einsum("thd,nhd->thn", q, full[:, kv_head])
    torch.testing.assert_close(scores_fast, scores_slow, rtol=1e-4, atol=1e-3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bits: got 5"):
        codebook(5, 64)
    with pytest.raises(ValueError, match="head_dim: got 96"):
        encode_ref(torch.randn(2, 1, 96), torch.ones(1, 96), 4)
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        pack_codes(torch.zeros(1, 2, dtype=torch.uint8), 3)


@pytest.mark.parametrize(("bits", "to_bits"), [(4, 2), (4, 3), (3, 2)])
def test_transcoding_codes_down_costs_about_what_encoding_at_the_lower_width_does(bits, to_bits):
    """A block aging past the horizon goes from its codes at `bits` to `to_bits` by a table on the codes:
    nearly every coordinate gets the code direct encoding would give, and the error stays within 10% of
    direct encoding's."""
    dim = 128
    x = skewed_rows(512, 2, dim, seed=bits + to_bits)
    signs = rotation_signs(3, 1, 2, dim)[0]
    packed, norms = encode_ref(x, signs, bits)
    down = transcode(packed, bits, to_bits, dim)
    direct, _ = encode_ref(x, signs, to_bits)
    same = (unpack_codes(down, to_bits, dim) == unpack_codes(direct, to_bits, dim)).float().mean().item()
    assert same > 0.9
    err = lambda p: (((decode_ref(p, norms, signs, to_bits) - x) ** 2).sum(-1) / (x**2).sum(-1)).mean()  # noqa: E731
    assert err(direct) <= err(down) < 1.1 * err(direct)
