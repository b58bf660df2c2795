"""Host KV pools in shared-memory files: the KV memory service allocates its DRAM tier in one, and workers
on the same host map it and copy blocks with plain (or, with CUDA, page-locked DMA) copies instead of a
network read. The file lives under /dev/shm; `host_id` tells whether a peer shares this host's memory."""

import contextlib
import os

import torch

SHM_DIR = "/dev/shm"


def fits(num_bytes: int, directory: str = SHM_DIR) -> bool:
    """Whether the shared-memory filesystem has room for num_bytes (containers often cap it at 64 MiB)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= num_bytes


def _map(path: str, num_bytes: int, pin: bool) -> torch.Tensor:
    flat = torch.from_file(path, shared=True, size=num_bytes, dtype=torch.uint8)
    if pin and torch.cuda.is_available():  # page-lock in place: host->GPU copies become one DMA
        code = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), num_bytes, 0)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister of {path} failed with CUDA error {int(code)}")
    return flat


def create(path: str, capacity_blocks: int, block_bytes: int, pin: bool) -> torch.Tensor:
    """A zeroed [capacity, block_bytes] pool in a new file at path (an old file there is replaced)."""
    num_bytes = capacity_blocks * block_bytes
    if not fits(num_bytes, os.path.dirname(path) or "."):
        raise ValueError(
            f"shm: {num_bytes} B do not fit in {os.path.dirname(path)} "
            f"(raise the container's /dev/shm size or use a smaller kv DRAM tier)"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, num_bytes)
    finally:
        os.close(fd)
    pool = _map(path, num_bytes, pin).view(capacity_blocks, block_bytes)
    pool.fill_(0)  # fault the pages in now, not during a busy step
    return pool


def open_pool(path: str, capacity_blocks: int, block_bytes: int) -> torch.Tensor:
    """Map another process's pool (same host); page-locked when CUDA is present."""
    if os.path.getsize(path) != capacity_blocks * block_bytes:
        raise RuntimeError(
            f"shm pool {path}: size {os.path.getsize(path)} is not {capacity_blocks} x {block_bytes}"
        )
    return _map(path, capacity_blocks * block_bytes, pin=True).view(capacity_blocks, block_bytes)


def unpin(pool: torch.Tensor) -> None:
    """Undo the page-locking of a mapped pool (before dropping the mapping)."""
    if pool.is_pinned() and torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())


def remove(path: str, pool: torch.Tensor | None = None) -> None:
    """Unpin the owner's mapping and remove the file (mappings elsewhere stay valid until dropped)."""
    if pool is not None:
        unpin(pool)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep_dead_staging(directory: str = SHM_DIR) -> int:
    """Remove workers' staging files (ridgeline-stage-<pid>-*) whose process is gone (a killed worker never
    removed its own); returns how many."""
    removed = 0
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        parts = name.split("-")
        if not name.startswith("ridgeline-stage-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed += 1
        except PermissionError:  # alive, another user's
            pass
    return removed
