"""The low-bit KV pool of KV precision by age (issue 23): rotated codes and row norms, block-major like the
16-bit pool, and the re-encoding of aged blocks into it.

Block ids share one space with the 16-bit pool: ids below `num_base_blocks` name 16-bit blocks, ids from
there on name coded blocks (coded id - num_base_blocks in this pool). So a request's block table lists
(format, block id) as one int32, and the attention kernels tell the formats apart by range
(kernels/coded_attention.py).

Layout: one uint8 tensor [num_blocks, block_bytes], block-major like the 16-bit pool, so that one block across
all layers is one contiguous region (one descriptor for a transport or a tier). A block is its codes
[num_layers, 2, block_size, kv_heads, head_dim * bits / 8] uint8 followed by its norms [num_layers, 2,
block_size, kv_heads] fp32 (`CodedFormat.views`); a layer reads strided views, as it does the 16-bit pool.
Each (layer, KV head) has its own rotation signs, drawn from `seed` (kernels/turboquant.py).
"""

from dataclasses import dataclass

import torch

from engine.attention.backend import CodedLayer
from engine.config import CacheConfig
from engine.kv.age_policy import KVAgePolicy
from engine.kv.pool import bytes_per_block, kv_budget_bytes
from engine.models import ModelConfig
from kernels.turboquant import decode_ref, encode, encode_ref, packed_bytes, rotation_signs, transcode

ENCODE_CHUNK = 64  # blocks gathered at once to re-encode (64 Llama-3-8B bf16 blocks: 128 MiB)


def bytes_per_coded_block(cfg: ModelConfig, block_size: int, bits: int) -> int:
    """Codes and fp32 norms of one block across all layers."""
    return CodedFormat(bits, 0, cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim).block_bytes


def coded_fraction(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, policy: KVAgePolicy, length: int
) -> float:
    """The share of the KV budget the coded pools get when kv_coded_fraction is not given: what a request of
    `length` tokens (the longest) holds coded, at the policy's bits, against what it keeps 16-bit (sinks,
    window and two open blocks), by bytes."""
    kept = min(policy.sinks + policy.window + 2 * block_size, length)
    coded = (length - kept) * bytes_per_coded_block(cfg, block_size, policy.bits)
    base = kept * bytes_per_block(cfg, block_size, dtype)
    return coded / (coded + base) if coded else 0.5


def split_kv_budget(
    cache: CacheConfig,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    policy: KVAgePolicy,
    max_model_len: int,
    chunk: int,
) -> tuple[int, list[int]]:
    """(16-bit blocks, blocks of each coded pool): kv_coded_fraction of the KV budget goes to the coded pools,
    as many blocks in each; by default the share a max_model_len request holds coded, leaving the 16-bit
    pool at least a prefill chunk (`chunk` tokens) with its sinks and window. With num_blocks given: those
    16-bit blocks, and num_coded_blocks a coded pool (else as many as kv_coded_fraction's share, 0.5 by
    default, of their bytes buys)."""
    base = bytes_per_block(cfg, cache.block_size, dtype)
    coded = sum(bytes_per_coded_block(cfg, cache.block_size, bits) for bits in policy.widths())
    widths = len(policy.widths())
    f = cache.kv_coded_fraction
    if cache.num_blocks is not None:
        f = 0.5 if f is None else f
        n1 = cache.num_coded_blocks or max(1, int(cache.num_blocks * base * f / (1 - f)) // coded)
        return cache.num_blocks, [n1] * widths
    budget = kv_budget_bytes(cache, device)
    if f is None:  # sized for the longest request, keeping a prefill chunk's worth of 16-bit blocks
        f = coded_fraction(cfg, cache.block_size, dtype, policy, max_model_len)
        least = -(-(chunk + policy.sinks + policy.window) // cache.block_size) * base
        f = min(f, max(1 - least / budget, 0.5))  # a small budget: half, and prefill chunks shrink to fit
    n0, n1 = int(budget * (1 - f)) // base, int(budget * f) // coded
    if n0 < 1 or n1 < 1:
        raise ValueError(
            f"kv_cache_memory_bytes: budget {budget} B split {1 - f:.2f}/{f:.2f} holds no 16-bit block of "
            f"{base} B or no coded blocks ({coded} B, one a width)"
        )
    return n0, [n1] * widths


def check_model_for_age_policy(cfg: ModelConfig) -> None:
    """What the codec and the mixed-format kernel need of the model."""
    if any(cfg.sliding_windows):
        raise ValueError("kv_age_policy: models with sliding-window attention layers are not supported")
    hd = cfg.head_dim
    if hd < 16 or hd & (hd - 1):
        raise ValueError(
            f"kv_age_policy: the rotation needs a head_dim that is a power of two >= 16, got {hd}"
        )


@dataclass(frozen=True)
class CodedFormat:
    """What a coded block's bytes mean: the codec, its width and rotation seed, and the geometry. Two pools
    whose formats are equal can copy blocks between them as bytes; any other puller decodes them."""

    bits: int
    seed: int
    num_layers: int
    block_size: int
    kv_heads: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"turboquant{self.bits}"

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """A decoded block: [num_layers, 2, block_size, kv_heads, head_dim]."""
        return (self.num_layers, 2, self.block_size, self.kv_heads, self.head_dim)

    @property
    def codes_bytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.kv_heads * packed_bytes(self.head_dim, self.bits)

    @property
    def block_bytes(self) -> int:
        return self.codes_bytes + self.num_layers * 2 * self.block_size * self.kv_heads * 4

    def views(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw [N, block_bytes] uint8 -> (codes [N, layers, 2, bs, kv_heads, D * bits / 8] uint8, norms [N, layers,
        2, bs, kv_heads] fp32), views of raw."""
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != self.block_bytes:
            raise ValueError(f"raw: want [N, {self.block_bytes}] uint8, got {list(raw.shape)} {raw.dtype}")
        n, c = raw.shape[0], self.codes_bytes
        shape = (n, self.num_layers, 2, self.block_size, self.kv_heads)
        codes = raw[:, :c].view(*shape, packed_bytes(self.head_dim, self.bits))
        norms = raw[:, c:].view(torch.float32).view(shape)
        return codes, norms

    def encode(self, blocks: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
        """blocks [N, layers, 2, bs, kv_heads, D] (any float dtype) -> raw [N, block_bytes] uint8 in this format
        (the Triton encoder on a GPU). signs: this format's rotations [layers, kv_heads, D], where at hand."""
        n, layers, _, bs, heads, dim = blocks.shape
        if signs is None:
            signs = rotation_signs(self.seed, layers, heads, dim).to(blocks.device)
        signs = signs.reshape(layers * heads, dim)
        # rows as [n * 2 * bs, layers * heads, D], so each (layer, head) pair meets its own signs
        rows = blocks.permute(0, 2, 3, 1, 4, 5).reshape(n * 2 * bs, layers * heads, dim)
        codes, norms = (encode if rows.is_cuda else encode_ref)(rows, signs, self.bits)
        raw = torch.empty((n, self.block_bytes), dtype=torch.uint8, device=blocks.device)
        raw_codes, raw_norms = self.views(raw)
        raw_codes.copy_(codes.reshape(n, 2, bs, layers, heads, -1).permute(0, 3, 1, 2, 4, 5))
        raw_norms.copy_(norms.reshape(n, 2, bs, layers, heads).permute(0, 3, 1, 2, 4))
        return raw

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """raw [N, block_bytes] -> the blocks' KV in the original basis, [N, layers, 2, bs, kv_heads, D] fp32 (what a
        puller without this format's pool stores)."""
        codes, norms = self.views(raw)
        signs = rotation_signs(self.seed, self.num_layers, self.kv_heads, self.head_dim).to(raw.device)
        n, layers, _, bs, heads, packed = codes.shape
        rows = codes.permute(0, 2, 3, 1, 4, 5).reshape(n * 2 * bs, layers * heads, packed)
        row_norms = norms.permute(0, 2, 3, 1, 4).reshape(n * 2 * bs, layers * heads)
        x = decode_ref(rows, row_norms, signs.reshape(layers * heads, -1), self.bits)
        return x.reshape(n, 2, bs, layers, heads, -1).permute(0, 3, 1, 2, 4, 5).contiguous()


@dataclass
class CodedKVPool:
    """One coded width's blocks: ids first_id .. first_id + num_blocks - 1 of the shared id space."""

    raw: torch.Tensor  # [N, block_bytes] uint8: each block's codes, then its norms
    codes: torch.Tensor  # [N, layers, 2, bs, kv_heads, D * bits / 8] uint8, a view of raw
    norms: torch.Tensor  # [N, layers, 2, bs, kv_heads] fp32, a view of raw
    format: CodedFormat
    first_id: int

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        first_id: int,
        cfg: ModelConfig,
        block_size: int,
        bits: int,
        device: torch.device,
        seed: int = 0,
    ) -> "CodedKVPool":
        fmt = CodedFormat(bits, seed, cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim)
        raw = torch.zeros((num_blocks, fmt.block_bytes), dtype=torch.uint8, device=device)
        return cls(raw, *fmt.views(raw), fmt, first_id)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def num_blocks(self) -> int:
        return self.raw.shape[0]

    def block_bytes(self) -> int:
        return self.format.block_bytes


@dataclass
class CodedKV:
    """The coded pools of a KV age policy, highest precision first, and the rotations they share (one a
    layer and KV head, from the policy's seed)."""

    pools: list[CodedKVPool]
    signs: torch.Tensor  # [layers, kv_heads, D] fp32, on the pools' device
    base_scales: torch.Tensor | None = None  # [layers, 2, kv_heads] fp32: an FP8 base pool's, read to encode

    @classmethod
    def allocate(
        cls,
        sizes: list[int],
        num_base_blocks: int,
        cfg: ModelConfig,
        block_size: int,
        policy: KVAgePolicy,
        device: torch.device,
    ) -> "CodedKV":
        pools, first = [], num_base_blocks
        for n, bits in zip(sizes, policy.widths(), strict=True):
            pools.append(CodedKVPool.allocate(n, first, cfg, block_size, bits, device, policy.seed))
            first += n
        signs = rotation_signs(policy.seed, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim).to(device)
        return cls(pools, signs)

    def layers(self) -> list[CodedLayer]:
        """Per layer, what its attention reads: strided views of each pool's codes and norms, its rotation."""
        top, low = self.pools[0], self.pools[1] if len(self.pools) > 1 else None
        return [
            CodedLayer(
                top.codes[:, i],
                top.norms[:, i],
                self.signs[i],
                top.bits,
                top.first_id,
                low_codes=None if low is None else low.codes[:, i],
                low_norms=None if low is None else low.norms[:, i],
                low_bits=0 if low is None else low.bits,
            )
            for i in range(top.codes.shape[1])
        ]

    def pool_of(self, block_id: int) -> int:
        """-1: a 16-bit block; k: coded pool k."""
        return max((k for k, p in enumerate(self.pools) if block_id >= p.first_id), default=-1)

    @torch.inference_mode()
    def apply(self, kv_pool: torch.Tensor, moves: list[tuple[int, int]]) -> None:
        """Blocks the block manager aged: moves = [(old id, new id)], queued on the current stream (after the
        steps that wrote the old blocks, before any step that reuses them). From the 16-bit pool: encoded
        (one launch for up to ENCODE_CHUNK blocks and all layers on a GPU); from a higher coded pool:
        transcoded code by code. A block freed and taken again within the step may be a destination twice:
        the last move is the live one. Transcodes run first: they read coded blocks an encode may reuse."""
        last = {new: old for old, new in moves}  # destination -> its last source
        by_kind: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for new, old in last.items():
            by_kind.setdefault((self.pool_of(old), self.pool_of(new)), []).append((old, new))
        for (src, dst), group in sorted(by_kind.items(), key=lambda kind: kind[0][0] < 0):
            for i in range(0, len(group), ENCODE_CHUNK):
                chunk = group[i : i + ENCODE_CHUNK]
                if src < 0:
                    self._encode(kv_pool, self.pools[dst], chunk)
                else:
                    self._transcode(self.pools[src], self.pools[dst], chunk)

    def _encode(self, kv_pool: torch.Tensor, pool: CodedKVPool, moves: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in moves], device=kv_pool.device)
        dst = torch.tensor([d - pool.first_id for _, d in moves], device=kv_pool.device)
        x = kv_pool[src]  # [n, layers, 2, bs, heads, D]
        if self.base_scales is not None:  # e4m3 recent blocks: their values, then codes
            x = x.float() * self.base_scales[None, :, :, None, :, None]
        pool.raw[dst] = pool.format.encode(x, self.signs)

    def _transcode(self, src: CodedKVPool, dst: CodedKVPool, moves: list[tuple[int, int]]) -> None:
        dev = src.codes.device
        a = torch.tensor([s - src.first_id for s, _ in moves], device=dev)
        b = torch.tensor([d - dst.first_id for _, d in moves], device=dev)
        dim = self.signs.shape[-1]
        dst.codes[b] = transcode(src.codes[a], src.bits, dst.bits, dim)
        dst.norms[b] = src.norms[a]
