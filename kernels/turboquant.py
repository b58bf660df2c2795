"""Rotated low-bit vector quantization of KV rows (TurboQuant-style): the codec.

A row x [D] (one token's key or value of one KV head) is stored as its norm (fp32) and one b-bit code a
coordinate of the unit vector u = x / |x| after a seeded randomized Hadamard rotation R = H diag(s) / sqrt(D)
(s: +-1 signs per layer and KV head). After a random rotation every coordinate of a unit vector follows the
same density, f(t) ~ (1 - t^2)^((D - 3) / 2) on [-1, 1] (about N(0, 1/D)), whatever x was, so one
Lloyd-Max scalar quantizer for that density (`codebook`) serves every coordinate. The expected relative
squared error |x - x'|^2 / |x|^2 is then the quantizer's distortion for unit variance: about 0.117 at 2 bits,
0.0345 at 3 and 0.0095 at 4 (the Gaussian Lloyd-Max figures, which f approaches as D grows).

Decoding: x' = |x| R^T c[codes]. Attention can skip the inverse rotation: q . x' = |x| (R q) . c[codes], so
the query is rotated once per head and codes are read as they are.

Codes are packed little-end first: 4 bits two a byte, 2 bits four a byte, 3 bits eight in three bytes.
D must be a power of two (the Hadamard matrix's order). This file holds the torch reference (the oracle,
and the CPU path) and the Triton encode kernel.
"""

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

BITS = (2, 3, 4)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits: got {bits}, allowed {list(BITS)}")


def hadamard(dim: int, device=None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix [dim, dim] (symmetric, orthogonal); one copy a device is
    kept (so a CUDA graph can capture its users: nothing is built or copied while capturing)."""
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"head_dim: got {dim}, the rotation needs a power of two >= 2")
    return _hadamard(dim, str(torch.device(device or "cpu")))


@lru_cache(maxsize=16)
def _hadamard(dim: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).to(device)


@lru_cache(maxsize=32)
def device_codebook(
    bits: int, dim: int, device: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """codebook(bits, dim) on a device, centroids in `dtype` (the attention kernels gather them in the query's
    dtype), one copy kept."""
    centroids, bounds = codebook(bits, dim)
    return centroids.to(device=device, dtype=dtype), bounds.to(device)


@lru_cache(maxsize=32)
def odd_polynomial(bits: int, dim: int, device: str) -> torch.Tensor:
    """a [2^(bits-1)] fp32: the codebook as an odd polynomial of the code, c[code] = sum_k a_k u^(2k+1) with
    u = 2 code / (2^bits - 1) - 1 (exact at every code: the codebook is odd). The attention kernels evaluate
    it in registers (Horner in u^2) instead of gathering centroids from memory."""
    centroids, _ = codebook(bits, dim)
    levels, half = 2**bits, 2 ** (bits - 1)
    u = torch.arange(half, levels, dtype=torch.float64) * (2.0 / (levels - 1)) - 1.0
    powers = torch.stack([u ** (2 * k + 1) for k in range(half)], 1)
    return torch.linalg.solve(powers, centroids[half:].double()).float().to(device)


def rotation_signs(seed: int, num_layers: int, num_heads: int, dim: int) -> torch.Tensor:
    """+-1 [num_layers, num_heads, dim] fp32: one random diagonal a (layer, KV head), from `seed` alone."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (num_layers, num_heads, dim), generator=gen) * 2 - 1).float()


@lru_cache(maxsize=32)
def codebook(bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [2^bits], boundaries [2^bits - 1]) fp32: the Lloyd-Max quantizer of one coordinate of a
    randomly rotated unit vector in `dim` dimensions (iterated to convergence on a fine grid)."""
    check_bits(bits)
    t = torch.linspace(-1, 1, 200_001, dtype=torch.float64)[1:-1]
    logw = (dim - 3) / 2 * torch.log1p(-(t**2))
    w = torch.exp(logw - logw.max())
    sigma = 1 / math.sqrt(dim)
    levels = 2**bits
    # start from the Gaussian's quantiles, then alternate nearest-centroid cells and cell means
    probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = math.sqrt(2) * torch.erfinv(2 * probs - 1) * sigma
    for _ in range(500):
        b = (c[1:] + c[:-1]) / 2
        cell = torch.bucketize(t, b)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, w)
        moment = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, w * t)
        new = moment / mass
        new = (new - new.flip(0)) / 2  # exactly odd, as the density is even (the kernels rely on it)
        if torch.allclose(new, c, atol=1e-12, rtol=0):
            break
        c = new
    return c.float(), ((c[1:] + c[:-1]) / 2).float()


def expected_distortion(bits: int, dim: int) -> float:
    """E|u - u'|^2 for a rotated unit vector u: dim x the quantizer's mean squared error a coordinate."""
    c, b = codebook(bits, dim)
    t = torch.linspace(-1, 1, 200_001, dtype=torch.float64)[1:-1]
    logw = (dim - 3) / 2 * torch.log1p(-(t**2))
    w = torch.exp(logw - logw.max())
    err = (t - c.double()[torch.bucketize(t, b.double())]) ** 2
    return float(dim * (w * err).sum() / w.sum())


def packed_bytes(dim: int, bits: int) -> int:
    check_bits(bits)
    if dim * bits % 8:
        raise ValueError(f"head_dim: {dim} codes of {bits} bits do not fill whole bytes")
    return dim * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] uint8 < 2^bits -> [..., D * bits / 8] uint8."""
    packed_bytes(codes.shape[-1], bits)
    per = 8 if bits == 3 else 8 // bits  # codes a group
    groups = codes.reshape(*codes.shape[:-1], -1, per).to(torch.int64)
    shifts = torch.arange(per, device=codes.device) * bits
    word = (groups << shifts).sum(-1)  # [..., D / per], bits * per <= 24 bits
    nbytes = bits * per // 8
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], -1)
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack_codes: [..., D * bits / 8] uint8 -> [..., D] uint8."""
    per = 8 if bits == 3 else 8 // bits
    nbytes = bits * per // 8
    by = packed.reshape(*packed.shape[:-1], dim // per, nbytes).to(torch.int64)
    word = (by << (torch.arange(nbytes, device=packed.device) * 8)).sum(-1)
    shifts = torch.arange(per, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], dim).to(torch.uint8)


def transcode(packed: torch.Tensor, bits: int, to_bits: int, dim: int) -> torch.Tensor:
    """Codes at `bits` -> codes at `to_bits` of the same rows (norms unchanged): each coordinate's centroid
    requantized by the lower codebook, one table lookup a code (no rotation: both are in the rotated
    basis). [..., D * bits / 8] -> [..., D * to_bits / 8] uint8."""
    centroids, _ = codebook(bits, dim)
    _, bounds = codebook(to_bits, dim)
    table = torch.bucketize(centroids, bounds).to(torch.uint8).to(packed.device)
    return pack_codes(table[unpack_codes(packed, bits, dim).long()], to_bits)


def encode_ref(x: torch.Tensor, signs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H, D] (any float dtype), signs [H, D] -> (packed codes [N, H, D * bits / 8] uint8, norms [N, H]
    fp32)."""
    dim = x.shape[-1]
    _, bounds = codebook(bits, dim)
    x = x.float()
    norms = x.norm(dim=-1)
    u = x / norms.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    rotated = (u * signs.to(x.device)) @ hadamard(dim, x.device)  # H symmetric: (H diag(s) u)^T
    codes = torch.bucketize(rotated, bounds.to(x.device)).to(torch.uint8)
    return pack_codes(codes, bits), norms


def decode_rotated_ref(packed: torch.Tensor, norms: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """-> |x| c[codes] [N, H, D] fp32: the row in the rotated basis (what attention reads, with a rotated q)."""
    centroids, _ = codebook(bits, dim)
    return centroids.to(packed.device)[unpack_codes(packed, bits, dim).long()] * norms[..., None]


def decode_ref(packed: torch.Tensor, norms: torch.Tensor, signs: torch.Tensor, bits: int) -> torch.Tensor:
    """-> x' [N, H, D] fp32 in the original basis."""
    dim = signs.shape[-1]
    rotated = decode_rotated_ref(packed, norms, bits, dim)
    return (rotated @ hadamard(dim, packed.device)) * signs.to(packed.device)


def rotate_queries(q: torch.Tensor, signs: torch.Tensor, group: int) -> torch.Tensor:
    """q [T, Hq, D] -> R q per query head (its KV head's rotation; `group` query heads a KV head), fp32."""
    dim = q.shape[-1]
    per_q = signs.to(q.device).repeat_interleave(group, dim=0)  # [Hq, D]
    return (q.float() * per_q) @ hadamard(dim, q.device)


@triton.jit
def _encode_kernel(
    x_ptr,
    signs_ptr,
    h_ptr,
    bounds_ptr,
    out_ptr,
    norms_ptr,
    stride_xn,
    stride_xh,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    LEVELS: tl.constexpr,
    PER: tl.constexpr,  # codes a packed group
    NBYTES: tl.constexpr,  # bytes a packed group
):
    """One (token, head) row a program: norm, rotate (a [1, D] x [D, D] product), nearest centroid by
    counting boundaries below, pack."""
    row = tl.program_id(0).to(tl.int64)
    n, h = row // HEADS, row % HEADS
    d = tl.arange(0, D)
    x = tl.load(x_ptr + n * stride_xn + h * stride_xh + d).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    u = x / tl.maximum(norm, 1.1754943508222875e-38) * tl.load(signs_ptr + h * D + d)
    hmat = tl.load(h_ptr + d[:, None] * D + d[None, :])  # [D, D]
    rotated = tl.sum(u[:, None] * hmat, axis=0)  # [D]: u^T H, H symmetric
    codes = tl.zeros([D], dtype=tl.int32)
    for i in tl.static_range(LEVELS - 1):
        codes += (rotated > tl.load(bounds_ptr + i)).to(tl.int32)
    groups = tl.reshape(codes, [D // PER, PER])
    shifts = tl.arange(0, PER) * BITS
    word = tl.sum(groups << shifts[None, :], axis=1)  # [D / PER]
    g = tl.arange(0, D // PER)
    base = out_ptr + row * (D * BITS // 8) + g * NBYTES
    for i in tl.static_range(NBYTES):
        tl.store(base + i, ((word >> (8 * i)) & 0xFF).to(tl.uint8))
    tl.store(norms_ptr + row, norm)


def encode(x: torch.Tensor, signs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_ref in one launch: x [N, H, D] (last dim contiguous), signs [H, D] fp32 on x's device."""
    n, heads, dim = x.shape
    nbytes = packed_bytes(dim, bits)
    hadamard(dim)  # checks the order
    if x.stride(-1) != 1 or signs.shape != (heads, dim) or signs.dtype != torch.float32:
        raise ValueError("x: last dim contiguous; signs: [heads, head_dim] fp32")
    _, bounds = device_codebook(bits, dim, str(x.device))
    out = torch.empty((n, heads, nbytes), dtype=torch.uint8, device=x.device)
    norms = torch.empty((n, heads), dtype=torch.float32, device=x.device)
    if n == 0:
        return out, norms
    per = 8 if bits == 3 else 8 // bits
    _encode_kernel[(n * heads,)](
        x,
        signs.contiguous(),
        hadamard(dim, x.device).contiguous(),
        bounds,
        out,
        norms,
        x.stride(0),
        x.stride(1),
        HEADS=heads,
        D=dim,
        BITS=bits,
        LEVELS=2**bits,
        PER=per,
        NBYTES=bits * per // 8,
    )
    return out, norms
