"""The low-bit KV pool of KV precision by age (issue 23): rotated codes and row norms, block-major like the
16-bit pool, and the re-encoding of aged blocks into it.

Block ids share one space with the 16-bit pool: ids below `num_base_blocks` name 16-bit blocks, ids from
there on name coded blocks (coded id - num_base_blocks in this pool). So a request's block table lists
(format, block id) as one int32, and the attention kernels tell the formats apart by range
(kernels/coded_attention.py).

Layout: codes [num_blocks, num_layers, 2, block_size, kv_heads, head_dim * bits / 8] uint8 and norms
[num_blocks, num_layers, 2, block_size, kv_heads] fp32; a layer reads strided views, as it does the 16-bit
pool. Each (layer, KV head) has its own rotation signs, drawn from `seed` (kernels/turboquant.py).
"""

from dataclasses import dataclass

import torch

from engine.attention.backend import CodedLayer
from engine.config import CacheConfig
from engine.kv.age_policy import KVAgePolicy
from engine.kv.pool import bytes_per_block, kv_budget_bytes
from engine.models import ModelConfig
from kernels.turboquant import encode, encode_ref, packed_bytes, rotation_signs

ENCODE_CHUNK = 64  # blocks gathered at once to re-encode (64 Llama-3-8B bf16 blocks: 128 MiB)


def bytes_per_coded_block(cfg: ModelConfig, block_size: int, bits: int) -> int:
    """Codes and fp32 norms of one block across all layers."""
    rows = cfg.num_layers * 2 * block_size * cfg.num_kv_heads
    return rows * (packed_bytes(cfg.head_dim, bits) + 4)


def split_kv_budget(
    cache: CacheConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, policy: KVAgePolicy
) -> tuple[int, int]:
    """(16-bit blocks, coded blocks): kv_coded_fraction of the KV budget goes to the coded pool. With
    num_blocks given: those 16-bit blocks, and num_coded_blocks (else as many as the fraction's share of
    their bytes buys)."""
    base = bytes_per_block(cfg, cache.block_size, dtype)
    coded = bytes_per_coded_block(cfg, cache.block_size, policy.bits)
    f = cache.kv_coded_fraction
    if cache.num_blocks is not None:
        n1 = cache.num_coded_blocks or max(1, int(cache.num_blocks * base * f / (1 - f)) // coded)
        return cache.num_blocks, n1
    budget = kv_budget_bytes(cache, device)
    n0, n1 = int(budget * (1 - f)) // base, int(budget * f) // coded
    if n0 < 1 or n1 < 1:
        raise ValueError(
            f"kv_cache_memory_bytes: budget {budget} B split {1 - f:.2f}/{f:.2f} holds no 16-bit block of "
            f"{base} B or no coded block of {coded} B"
        )
    return n0, n1


def check_model_for_age_policy(cfg: ModelConfig) -> None:
    """What the codec and the mixed-format kernel need of the model."""
    if any(cfg.sliding_windows):
        raise ValueError("kv_age_policy: models with sliding-window attention layers are not supported")
    hd = cfg.head_dim
    if hd < 16 or hd & (hd - 1):
        raise ValueError(
            f"kv_age_policy: the rotation needs a head_dim that is a power of two >= 16, got {hd}"
        )


@dataclass
class CodedKVPool:
    codes: torch.Tensor  # [N1, layers, 2, bs, kv_heads, D * bits / 8] uint8
    norms: torch.Tensor  # [N1, layers, 2, bs, kv_heads] fp32
    signs: torch.Tensor  # [layers, kv_heads, D] fp32, on the pool's device
    bits: int
    num_base_blocks: int

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        num_base_blocks: int,
        cfg: ModelConfig,
        block_size: int,
        policy: KVAgePolicy,
        device: torch.device,
    ) -> "CodedKVPool":
        nbytes = packed_bytes(cfg.head_dim, policy.bits)
        shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads)
        return cls(
            codes=torch.zeros((*shape, nbytes), dtype=torch.uint8, device=device),
            norms=torch.zeros(shape, dtype=torch.float32, device=device),
            signs=rotation_signs(policy.seed, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim).to(device),
            bits=policy.bits,
            num_base_blocks=num_base_blocks,
        )

    @property
    def num_blocks(self) -> int:
        return self.codes.shape[0]

    def layers(self) -> list[CodedLayer]:
        """Per layer, what its attention reads: strided views of codes and norms, and its rotation."""
        return [
            CodedLayer(self.codes[:, i], self.norms[:, i], self.signs[i], self.bits, self.num_base_blocks)
            for i in range(self.codes.shape[1])
        ]

    @torch.inference_mode()
    def encode_blocks(self, kv_pool: torch.Tensor, moves: list[tuple[int, int]]) -> None:
        """Re-encode 16-bit blocks into coded ones: moves = [(16-bit block id, coded block id in the shared
        id space)], queued on the current stream (after the steps that wrote the blocks, before any step that
        reuses the 16-bit ones). One launch for all blocks and layers on a GPU."""
        for i in range(0, len(moves), ENCODE_CHUNK):
            self._encode(kv_pool, moves[i : i + ENCODE_CHUNK])

    def _encode(self, kv_pool: torch.Tensor, moves: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in moves], device=kv_pool.device)
        dst = torch.tensor([d - self.num_base_blocks for _, d in moves], device=kv_pool.device)
        n, layers, _, bs, heads, dim = len(moves), *kv_pool.shape[1:]
        x = kv_pool[src]  # [n, layers, 2, bs, heads, D]
        # rows as [n * 2 * bs, layers * heads, D], so each (layer, head) pair meets its own signs
        rows = x.permute(0, 2, 3, 1, 4, 5).reshape(n * 2 * bs, layers * heads, dim)
        signs = self.signs.reshape(layers * heads, dim)
        codes, norms = (encode if rows.is_cuda else encode_ref)(rows, signs, self.bits)
        self.codes[dst] = codes.reshape(n, 2, bs, layers, heads, -1).permute(0, 3, 1, 2, 4, 5)
        self.norms[dst] = norms.reshape(n, 2, bs, layers, heads).permute(0, 3, 1, 2, 4)
