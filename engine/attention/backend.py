"""The attention backend interface and the per-step metadata every layer reads."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.rotary import rotary_ref, rotate_qk


@dataclass(frozen=True)
class CodedLayer:
    """One layer's low-bit KV blocks (KV precision by age, engine/kv/coded_pool.py): block table entries at or
    above num_base_blocks name block (entry - num_base_blocks) here."""

    codes: torch.Tensor  # [N1, 2, block_size, kv_heads, head_dim * bits / 8] uint8
    norms: torch.Tensor  # [N1, 2, block_size, kv_heads] fp32
    signs: torch.Tensor  # [kv_heads, head_dim] fp32: this layer's rotation
    bits: int
    num_base_blocks: int
    # a second, lower-bit pool (a policy's horizon), whose entries follow the first's; low_bits 0: none
    low_codes: torch.Tensor | None = None
    low_norms: torch.Tensor | None = None
    low_bits: int = 0

    @property
    def low(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The kernels' `low` argument."""
        if self.low_codes is None or self.low_norms is None:
            return None
        return self.low_codes, self.low_norms, self.low_bits


@dataclass
class AttentionMetadata:
    """Built once per step by the ModelRunner, passed to every layer.

    The batch is flattened: sequence i owns query rows query_start_loc[i]:query_start_loc[i+1], and after
    this step its context holds seq_lens[i] tokens whose KV lives in blocks block_tables[i, :]. New K/V go
    to flat slot slot_mapping[t] = block_id * block_size + offset.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    num_kv_splits: int = 1  # set by the backend's plan() for decode-only steps
    # every sequence computes this many new tokens (1: decode, 1 + k: verifying k drafts); 0: they differ
    uniform_query_len: int = 0
    # some block table entry names a coded (low-bit) block: only with a KV age policy
    has_coded: bool = False
    # [T] int32: each query's position in its sequence, when they are not its last tokens (a document's
    # recomputed tokens, engine/document_assembly.py); ascending within a sequence
    query_positions: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Writes new K/V into the paged pool and attends over it.

    `kv_cache` is one layer's strided view of the block-major pool: [num_blocks, 2, block_size, kv_heads,
    head_dim] (index 0 = K, 1 = V). Queries attend causally to their own sequence's context, optionally
    limited to the last `sliding_window` positions.
    """

    name: str

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:  # noqa: B027 - optional hook
        """Fill backend-specific fields of this step's metadata, once per step."""

    @abstractmethod
    def write_kv(
        self,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        """k, v [T, kv_heads, head_dim] -> kv_cache at meta.slot_mapping (divided by kv_scales [2, kv_heads]
        into an FP8 cache)."""

    def rope_and_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotary on q [T, heads, D] and k, then the rotated k and v -> kv_cache; -> the rotated q.
        cos/sin [T, D] fp32. Backends may fuse the two passes."""
        q, k = rotate_qk(q, k, cos, sin) if q.is_cuda else (rotary_ref(q, cos, sin), rotary_ref(k, cos, sin))
        self.write_kv(kv_cache, k, v, meta, kv_scales)
        return q

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        kv_scales: torch.Tensor | None = None,
        coded: CodedLayer | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim] -> out [T, heads, head_dim]. An FP8 cache is read as it is, its
        kv_scales [2, kv_heads] applied in the kernel. With `coded`, block table entries at or above
        coded.num_base_blocks are read from its low-bit blocks."""


@dataclass
class ForwardContext:
    """What a forward pass needs besides activations: passed down explicitly, never global."""

    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: [num_blocks, 2, block_size, kv_heads, head_dim]
    backend: AttentionBackend
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor  # [T, head_dim]
    # engine start's calibration prefill: each layer sets its FP8 KV scales from this step's K and V
    calibrate_kv: bool = False
    coded: list[CodedLayer] | None = None  # per layer: the low-bit blocks, with a KV age policy


_BACKENDS: dict[str, str] = {
    "torch": "engine.attention.torch_backend:TorchAttentionBackend",
    "triton": "engine.attention.triton_backend:TritonAttentionBackend",
}


def default_backend(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "torch"


def get_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend: got {name!r}, allowed {sorted(_BACKENDS)}")
    import importlib

    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
