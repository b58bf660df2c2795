"""The KV transport contract: one worker registers its KV pool and hands out handles to blocks; another
pulls them into its own blocks. Every pull is verified (layout, length, per-block checksum): a torn or
mismatched block raises TransferError and is never used.

Pools of one model may keep KV in different formats (16-bit, or e4m3 with per-layer/head scales: engine/kv/
kv_format.py). A block in another format is read into a staging buffer in the sender's format, its checksum
verified on the bytes as sent, then converted into the pool in one kernel (kernels/kv_convert.py), STAGING_BLOCKS
at a time. One converted pull runs at a time per transport (the staging buffer is registered memory, allocated
once a format); a pull that cannot get it within its timeout fails as a retryable TransferError.

A pool with a KV age policy also holds coded blocks (engine/kv/coded_pool.py): each coded pool is one more
registered region, its ids following the 16-bit pool's (the engine's shared id space). A handle lists each
block's format; coded blocks travel as they are (codes and norms, verified as bytes). The puller stores them
in its own pool of the same format, or, having none, decodes them into its base pool (then, for an e4m3
pool, quantizes them to its scales)."""

import dataclasses
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from engine.kv.coded_pool import CodedFormat
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
    """What one block is: [num_layers, 2, block_size, kv_heads, head_dim] of dtype; or, for a coded pool,
    [block_bytes] uint8 of the `coded` format."""

    block_shape: tuple[int, ...]
    dtype: str
    coded: CodedFormat | None = None

    @classmethod
    def of(cls, pool: torch.Tensor) -> "KVLayout":
        return cls(tuple(pool.shape[1:]), str(pool.dtype).removeprefix("torch."))

    @classmethod
    def of_coded(cls, fmt: CodedFormat) -> "KVLayout":
        return cls((fmt.block_bytes,), "uint8", fmt)

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
    # coded blocks: each block's format, 0 for `layout`, k for coded_layouts[k - 1] (None: all `layout`)
    block_formats: list[int] | None = None
    coded_layouts: list[KVLayout] = field(default_factory=list)

    def layout_of(self, i: int) -> KVLayout:
        """The layout of the handle's i-th block."""
        k = 0 if self.block_formats is None else self.block_formats[i]
        return self.layout if k == 0 else self.coded_layouts[k - 1]

    @property
    def num_bytes(self) -> int:
        return sum(self.layout_of(i).block_bytes for i in range(len(self.block_ids)))

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
            block_formats=None if self.block_formats is None else [self.block_formats[i] for i in indices],
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
        self.regions: list[Region] = [Region(pool, self.layout, 0)]
        self.kv_scales: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []  # staging a timed-out read may still write: kept, never reused
        self._staging_lock = threading.Lock()
        self.converted_blocks = 0  # blocks that arrived in another format and were converted

    def register_coded(self, raw: torch.Tensor, fmt: CodedFormat, first_id: int) -> None:
        """A coded pool of the same engine: raw [num_blocks, block_bytes] uint8, block ids from first_id on (right
        after the last region registered)."""
        last = self.regions[-1]
        if first_id != last.first_id + last.tensor.shape[0]:
            raise ValueError(f"first_id: got {first_id}, allowed {last.first_id + last.tensor.shape[0]}")
        if not raw.is_contiguous() or raw.dtype != torch.uint8 or tuple(raw.shape[1:]) != (fmt.block_bytes,):
            raise ValueError(
                f"raw: want contiguous [N, {fmt.block_bytes}] uint8, got {list(raw.shape)} {raw.dtype}"
            )
        self.regions.append(Region(raw, KVLayout.of_coded(fmt), first_id))
        self._region_added(self.regions[-1])

    def _region_added(self, region: "Region") -> None:  # noqa: B027 - a hook for NIXL
        """A coded region was registered after the pool."""

    def region_of(self, block_id: int) -> int:
        for r in reversed(range(len(self.regions))):
            if block_id >= self.regions[r].first_id:
                if block_id - self.regions[r].first_id >= self.regions[r].tensor.shape[0]:
                    break
                return r
        raise ValueError(f"block id {block_id}: not in this transport's pools")

    def local_coded_pools(self, handle: KVHandle) -> list[int]:
        """Per block of the handle: the coded pool (0, 1, .. as the engine numbers them) of this side that
        takes it as it is, or -1 (a 16-bit block, or a coded one this side has no pool for: decoded into the
        base pool on arrival)."""
        same = {r.layout: k for k, r in enumerate(self.regions[1:])}
        return [
            -1 if k == 0 else same.get(handle.coded_layouts[k - 1], -1)
            for k in handle.block_formats or [0] * len(handle.block_ids)
        ]

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
        formats = [self.region_of(b) for b in block_ids]
        if checksums is None:
            checksums = [0] * len(block_ids)
            for r, region in enumerate(self.regions):
                rows = [i for i, k in enumerate(formats) if k == r]
                local = [block_ids[i] - region.first_id for i in rows]
                for i, c in zip(
                    rows, block_checksums(region.tensor, local, algorithm) if rows else [], strict=True
                ):
                    checksums[i] = c
        elif algorithm != "crc32" or len(checksums) != len(block_ids) or any(formats):
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
            block_formats=formats if any(formats) else None,
            coded_layouts=[r.layout for r in self.regions[1:]] if any(formats) else [],
        )

    def converted_blocks_of(self, handle: KVHandle, into_block_ids: list[int]) -> int:
        """How many of the handle's blocks a pull into into_block_ids converts: base blocks of another format,
        and coded blocks that go into the base pool (decoded)."""
        base = self.converts(handle)
        formats = handle.block_formats or [0] * len(handle.block_ids)
        return sum(
            1
            for k, into in zip(formats, into_block_ids, strict=True)
            if (k == 0 and base) or (k > 0 and self.region_of(into) == 0)
        )

    def converts(self, handle: KVHandle) -> bool:
        """Whether the handle's blocks are in another format than this pool's (and so are converted)."""
        if handle.layout.dtype != self.layout.dtype:
            return True
        ours = None if self.kv_scales is None else self.kv_scales.tolist()
        return handle.kv_scales is not None and handle.kv_scales != ours

    def pull(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float = 30.0) -> None:
        """Fill into_block_ids with the handle's blocks and verify them; TransferError on any mismatch.
        Blocks in another format are converted after their checksums are verified. Coded blocks go into
        this side's pool of their format where into_block_ids name one, else are decoded into the base pool."""
        if len(into_block_ids) != len(handle.block_ids):
            raise TransferError(
                f"length mismatch: {len(handle.block_ids)} blocks offered, {len(into_block_ids)} to fill"
            )
        if handle.block_formats is None or not any(handle.block_formats):
            self._pull_base(handle, into_block_ids, timeout_s)
            return
        groups: dict[tuple[int, int], list[int]] = {}  # (handle format, local region) -> block indices
        for i, (k, dest) in enumerate(zip(handle.block_formats, into_block_ids, strict=True)):
            try:
                groups.setdefault((k, self.region_of(dest)), []).append(i)
            except ValueError as e:
                raise TransferError(str(e), retryable=False) from e
        for (k, r), indices in groups.items():
            part, into = handle.select(indices), [into_block_ids[i] for i in indices]
            if k == 0 and r == 0:
                self._pull_base(part, into, timeout_s)
            elif k > 0 and r > 0 and handle.coded_layouts[k - 1] == self.regions[r].layout:
                region = self.regions[r]
                rows = [b - region.first_id for b in into]
                self._read(part, region.tensor, rows, timeout_s)
                self._verify(part, region.tensor, rows)
            elif k > 0 and r == 0:
                self._pull_decoded(part, into, timeout_s)
            else:
                raise TransferError(
                    f"layout mismatch: remote {handle.layout_of(indices[0])}, local {self.regions[r].layout}"
                )

    def _pull_base(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
        """Blocks of the sender's base pool into ours (16-bit or e4m3, converted where they differ)."""
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
        self._staged(handle, into_block_ids, timeout_s)

    def _pull_decoded(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
        """Coded blocks this side has no pool for: verified as sent, decoded, stored in the base pool."""
        fmt = handle.layout_of(0).coded
        assert fmt is not None  # called for coded blocks
        if self.layout.block_shape != fmt.kv_shape:
            raise TransferError(f"layout mismatch: remote {handle.layout_of(0)}, local {self.layout}")
        if self.pool.dtype == FP8 and self.kv_scales is None:
            raise TransferError(
                "coded blocks cannot be decoded into this e4m3 pool: its scales are not set", retryable=False
            )
        self._staged(handle, into_block_ids, timeout_s)

    def _staged(self, handle: KVHandle, into_block_ids: list[int], timeout_s: float) -> None:
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
        """At most STAGING_BLOCKS blocks of one format: read as sent into staging, verified there, converted
        (or decoded) into the pool."""
        layout = handle.layout_of(0)
        staging = self._staging_for(layout)
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
            src, src_scales = staging[: len(rows)], None
            if layout.coded is not None:
                src = layout.coded.decode(src)
            elif handle.kv_scales is not None:
                src_scales = torch.tensor(handle.kv_scales, dtype=torch.float32, device=self.pool.device)
            pool_scales = None if self.kv_scales is None else self.kv_scales.to(self.pool.device)
            convert = convert_kv_blocks if self.pool.is_cuda else convert_kv_blocks_ref
            ids = torch.tensor(into_block_ids, device=self.pool.device)
            convert(src, src_scales, self.pool, ids, pool_scales)
            if self.pool.is_cuda:
                torch.cuda.current_stream(self.pool.device).synchronize()  # landed before the pull returns
        except (ValueError, RuntimeError) as e:  # bad scales in the handle, a device error
            raise TransferError(f"converting {layout.dtype} blocks failed: {e}", retryable=False) from e
        self.converted_blocks += len(rows)

    def _convertible(self, handle: KVHandle) -> bool:
        names = {"float32", "bfloat16", "float16", str(FP8).removeprefix("torch.")}
        if handle.layout.dtype not in names or self.layout.dtype not in names:
            return False
        return (handle.layout.dtype == str(FP8).removeprefix("torch.")) == (handle.kv_scales is not None)

    def _verify(self, handle: KVHandle, dest: torch.Tensor, rows: list[int]) -> None:
        got = block_checksums(dest, rows, handle.checksum_algorithm) if rows else []
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
        if staging is not None and staging.dtype == dtype and tuple(staging.shape[1:]) == layout.block_shape:
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
        """The handle's blocks (all of one layout) as they are -> dest[into_block_ids] (dest: a registered
        region's tensor, or the staging buffer)."""

    def close(self) -> None:
        """Free backend resources (agents, registrations); the default holds none."""
        return None


@dataclass
class Region:
    """One registered pool: its tensor [num_blocks, *block], what a block is, and its first id in the
    engine's id space."""

    tensor: torch.Tensor
    layout: KVLayout
    first_id: int
