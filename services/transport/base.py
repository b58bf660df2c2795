"""The KV transport contract: one worker registers its KV pool and hands out handles to blocks; another
pulls them into its own blocks. Every pull is verified (layout, length, per-block checksum): a torn or
mismatched block raises TransferError and is never used.

Pools of one model may keep KV in different formats (16-bit, or e4m3 with per-layer/head scales: engine/kv/
kv_format.py). A block in another format is read into a staging buffer in the sender's format, its checksum
verified on the bytes as sent, then converted into the pool in one kernel (kernels/kv_convert.py), STAGING_BLOCKS
at a time. One converted pull runs at a time per transport (the staging buffer is registered memory, allocated
once a format); a pull that cannot get it within its timeout fails as a retryable TransferError."""

import dataclasses
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from kernels.kv_convert import FP8, convert_kv_blocks, convert_kv_blocks_ref
from services.transport.checksum import block_checksums, default_algorithm

STAGING_BLOCKS = 64  # a converted pull goes through staging this many blocks at a time


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
    # an e4m3 sender's scales, [num_layers][2][kv_heads]: what its bytes mean (None: 16-bit, or the puller's)
    kv_scales: list | None = None

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
        self.kv_scales: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []  # staging a timed-out read may still write: kept, never reused
        self._staging_lock = threading.Lock()
        self.converted_blocks = 0  # blocks that arrived in another format and were converted

    def set_kv_scales(self, kv_scales: torch.Tensor | None) -> None:
        """An e4m3 pool's scales [num_layers, 2, kv_heads] (known once the engine calibrated them): its handles
        carry them, and blocks pulled from pools of other formats are converted to them. An e4m3 pool
        without them (a tier's) hands its blocks to pullers of the same format only."""
        if kv_scales is not None and self.pool.dtype != FP8:
            raise ValueError(f"kv_scales: only for an e4m3 pool, this one is {self.pool.dtype}")
        self.kv_scales = None if kv_scales is None else kv_scales.float().cpu().contiguous()

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
            kv_scales=None if self.kv_scales is None else self.kv_scales.tolist(),
        )

    def converts(self, handle: KVHandle) -> bool:
        """Whether the handle's blocks are in another format than this pool's (and so are converted)."""
        if handle.layout.dtype != self.layout.dtype:
            return True
        ours = None if self.kv_scales is None else self.kv_scales.tolist()
        return handle.kv_scales is not None and handle.kv_scales != ours

    def pull(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float = 30.0) -> None:
        """Fill into_block_ids with the handle's blocks and verify them; TransferError on any mismatch.
        Blocks in another format are converted after their checksums are verified."""
        if handle.layout.block_shape != self.layout.block_shape or (
            handle.layout.dtype != self.layout.dtype and not self._convertible(handle)
        ):
            raise TransferError(f"layout mismatch: remote {handle.layout}, local {self.layout}")
        if len(into_block_ids) != len(handle.block_ids) or len(handle.checksums) != len(handle.block_ids):
            raise TransferError(
                f"length mismatch: {len(handle.block_ids)} blocks offered, "
                f"{len(handle.checksums)} checksums, {len(into_block_ids)} to fill"
            )
        if not self.converts(handle):
            self._read(handle, self.pool, list(into_block_ids), timeout_s)
            self._verify(handle, self.pool, list(into_block_ids))
            return
        if self.pool.dtype == FP8 and self.kv_scales is None:
            raise TransferError(
                f"{handle.layout.dtype} blocks cannot be converted into this e4m3 pool: its scales are not set",
                retryable=False,
            )
        if not self._staging_lock.acquire(timeout=timeout_s):
            raise TransferError(f"staging busy for {timeout_s}s: another converted pull holds it")
        try:
            for start in range(0, len(into_block_ids), STAGING_BLOCKS):
                chunk = range(start, min(start + STAGING_BLOCKS, len(into_block_ids)))
                self._pull_converted(
                    handle.select(chunk), into_block_ids[chunk.start : chunk.stop], timeout_s
                )
        finally:
            self._staging_lock.release()

    def _pull_converted(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
        """At most STAGING_BLOCKS blocks: read as sent into staging, verified there, converted into the pool."""
        staging = self._staging_for(handle.layout)
        rows = list(range(len(into_block_ids)))
        try:
            self._read(handle, staging, rows, timeout_s)
        except TransferError as e:
            if not e.retryable:  # a read that timed out may still land: that buffer is never reused
                self._retired.append(staging)
                self._staging = None
            raise
        self._verify(handle, staging, rows)
        try:
            src_scales = None
            if handle.kv_scales is not None:
                src_scales = torch.tensor(handle.kv_scales, dtype=torch.float32, device=self.pool.device)
            pool_scales = None if self.kv_scales is None else self.kv_scales.to(self.pool.device)
            convert = convert_kv_blocks if self.pool.is_cuda else convert_kv_blocks_ref
            ids = torch.tensor(into_block_ids, device=self.pool.device)
            convert(staging[: len(rows)], src_scales, self.pool, ids, pool_scales)
            if self.pool.is_cuda:
                torch.cuda.current_stream(self.pool.device).synchronize()  # landed before the pull returns
        except (ValueError, RuntimeError) as e:  # bad scales in the handle, a device error
            raise TransferError(
                f"converting {handle.layout.dtype} blocks failed: {e}", retryable=False
            ) from e
        self.converted_blocks += len(rows)

    def _convertible(self, handle: KVHandle) -> bool:
        names = {"float32", "bfloat16", "float16", str(FP8).removeprefix("torch.")}
        if handle.layout.dtype not in names or self.layout.dtype not in names:
            return False
        return (handle.layout.dtype == str(FP8).removeprefix("torch.")) == (handle.kv_scales is not None)

    def _verify(self, handle: KVHandle, dest: torch.Tensor, rows: list[int]) -> None:
        got = block_checksums(dest, rows, handle.checksum_algorithm)
        bad = [i for i, (a, b) in enumerate(zip(got, handle.checksums, strict=True)) if a != b]
        if bad:
            raise TransferError(
                f"checksum mismatch in {len(bad)} of {len(got)} blocks (first: block "
                f"{handle.block_ids[bad[0]]} of handle {handle.handle_id})"
            )

    def _staging_for(self, layout: KVLayout) -> torch.Tensor:
        """STAGING_BLOCKS blocks in the sender's layout, on the pool's device (allocated once a format; the
        new buffer is registered before the old one is let go)."""
        dtype = getattr(torch, layout.dtype)
        staging = self._staging
        if staging is not None and staging.dtype == dtype:
            return staging
        try:
            fresh = torch.empty((STAGING_BLOCKS, *layout.block_shape), dtype=dtype, device=self.pool.device)
            self._register_staging(fresh)
        except Exception as e:  # noqa: BLE001 - out of memory, a registration refused: no KV this time
            raise TransferError(f"no staging buffer for {layout.dtype} blocks: {e}", retryable=False) from e
        self._staging = fresh
        if staging is not None:
            self._unregister_staging(staging)
        return fresh

    def _register_staging(self, staging: torch.Tensor) -> None:  # noqa: B027 - a hook for NIXL
        """Make `staging` a destination of `_read` (NIXL registers the memory)."""

    def _unregister_staging(self, staging: torch.Tensor) -> None:  # noqa: B027
        """`staging` is being replaced."""

    @abstractmethod
    def release(self, handle: KVHandle) -> None:
        """Puller side: the owner may free the blocks (after a verified pull, or when giving up)."""

    def take_released(self) -> list[str]:
        """Owner side: handle ids released by pullers since the last call."""
        return []

    @abstractmethod
    def _export(self, block_ids: list[int]) -> dict: ...

    @abstractmethod
    def _read(
        self, handle: KVHandle, dest: torch.Tensor, into_block_ids: list[int], timeout_s: float
    ) -> None:
        """The handle's blocks as they are -> dest[into_block_ids] (dest: the pool, or the staging buffer)."""

    def close(self) -> None:
        """Free backend resources (agents, registrations); the default holds none."""
        return None
