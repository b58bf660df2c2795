"""The KV transport contract: one worker registers its KV pool and hands out handles to blocks; another
pulls them into its own blocks. Every pull is verified (layout, length, per-block checksum): a torn or
mismatched block raises TransferError and is never used."""

import dataclasses
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from services.transport.checksum import block_checksums, default_algorithm


class TransferError(RuntimeError):
    """A pull failed or delivered bytes that do not match the handle; the target blocks hold garbage.
    `retryable`: the bytes arrived wrong (another read may succeed); False when the owner is unreachable."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class KVLayout:
    """What one block is: [num_layers, 2, block_size, kv_heads, head_dim] of dtype."""

    block_shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, pool: torch.Tensor) -> "KVLayout":
        return cls(tuple(pool.shape[1:]), str(pool.dtype).removeprefix("torch."))

    @property
    def block_bytes(self) -> int:
        numel = 1
        for d in self.block_shape:
            numel *= d
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class KVHandle:
    """A claim on blocks held by another worker: enough to pull and verify them."""

    handle_id: str
    backend: str
    block_ids: list[int]
    num_tokens: int  # tokens whose KV the blocks hold
    layout: KVLayout
    checksums: list[int]
    checksum_algorithm: str
    source: dict = field(default_factory=dict)  # backend-specific: NIXL agent + addresses, or a Ray ref
    offset: int = 0  # index of block_ids[0] among the blocks the owner exported
    positions: list[int] | None = (
        None  # index of each block among those exported (None: offset, offset+1, ..)
    )

    @property
    def num_bytes(self) -> int:
        return len(self.block_ids) * self.layout.block_bytes

    def exported_positions(self) -> list[int]:
        return (
            self.positions
            if self.positions is not None
            else list(range(self.offset, self.offset + len(self.block_ids)))
        )

    def tail(self, skip: int) -> "KVHandle":
        """The same claim without its first `skip` blocks (the puller already holds them)."""
        return self.select(range(skip, len(self.block_ids)))

    def select(self, indices) -> "KVHandle":
        """The same claim on some of its blocks, in the given order."""
        indices = list(indices)
        positions = self.exported_positions()
        return dataclasses.replace(
            self,
            block_ids=[self.block_ids[i] for i in indices],
            checksums=[self.checksums[i] for i in indices],
            offset=positions[indices[0]] if indices else self.offset,
            positions=[positions[i] for i in indices],
        )


class KVTransport(ABC):
    """register(pool) once; the owner calls handle(); the puller calls pull() then release().

    `holds_source_blocks`: True when the owner must keep the blocks until released (a remote read),
    False when handle() already copied them out (the owner may free them at once).
    """

    name: str
    holds_source_blocks: bool

    def register(self, pool: torch.Tensor) -> None:
        """pool [num_blocks, *block_shape], contiguous, block-major (engine/kv/pool.py)."""
        if not pool.is_contiguous():
            raise ValueError("pool: must be contiguous (block-major)")
        self.pool = pool
        self.layout = KVLayout.of(pool)

    def describe(self) -> dict:
        """What the registry publishes about this endpoint (NIXL adds its agent name and metadata)."""
        return {
            "name": self.name,
            "block_bytes": self.layout.block_bytes if hasattr(self, "layout") else None,
        }

    def handle(self, block_ids: list[int], num_tokens: int, checksums: list[int] | None = None) -> KVHandle:
        """Thread-safe while the blocks are held (nobody writes them): may run off the engine thread.
        `checksums`: the blocks' CRC32s when the owner already knows them (a host pool's stored blocks)."""
        algorithm = default_algorithm(self.pool)
        if checksums is None:
            checksums = block_checksums(self.pool, block_ids, algorithm)
        elif algorithm != "crc32" or len(checksums) != len(block_ids):
            raise ValueError("checksums: known checksums must be one CRC32 per block of a host pool")
        return KVHandle(
            uuid.uuid4().hex,
            self.name,
            list(block_ids),
            num_tokens,
            self.layout,
            checksums,
            algorithm,
            self._export(block_ids),
        )

    def pull(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float = 30.0) -> None:
        """Fill into_block_ids with the handle's blocks and verify them; TransferError on any mismatch."""
        if handle.layout != self.layout:
            raise TransferError(f"layout mismatch: remote {handle.layout}, local {self.layout}")
        if len(into_block_ids) != len(handle.block_ids) or len(handle.checksums) != len(handle.block_ids):
            raise TransferError(
                f"length mismatch: {len(handle.block_ids)} blocks offered, "
                f"{len(handle.checksums)} checksums, {len(into_block_ids)} to fill"
            )
        self._read(handle, list(into_block_ids), timeout_s)
        got = block_checksums(self.pool, into_block_ids, handle.checksum_algorithm)
        bad = [i for i, (a, b) in enumerate(zip(got, handle.checksums, strict=True)) if a != b]
        if bad:
            raise TransferError(
                f"checksum mismatch in {len(bad)} of {len(got)} blocks (first: block "
                f"{handle.block_ids[bad[0]]} of handle {handle.handle_id})"
            )

    @abstractmethod
    def release(self, handle: KVHandle) -> None:
        """Puller side: the owner may free the blocks (after a verified pull, or when giving up)."""

    def take_released(self) -> list[str]:
        """Owner side: handle ids released by pullers since the last call."""
        return []

    @abstractmethod
    def _export(self, block_ids: list[int]) -> dict: ...

    @abstractmethod
    def _read(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None: ...

    def close(self) -> None:
        """Free backend resources (agents, registrations); the default holds none."""
        return None
