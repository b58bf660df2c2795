"""Per-block checksums, computed where the pool lives: CRC32 on host memory (zlib, hardware-assisted,
~7 GB/s here), a position-weighted word sum on the GPU (kernels/block_checksum.py, no copy to the host). The handle names the
algorithm, so both sides compute the same one."""

import zlib

import torch

from kernels.block_checksum import block_checksum, block_checksum_ref

_CHUNK = 64  # blocks per pass on the GPU: bounds the int64 scratch memory


def default_algorithm(pool: torch.Tensor) -> str:
    return "wsum64" if pool.is_cuda else "crc32"


def block_checksums(pool: torch.Tensor, block_ids: list[int], algorithm: str | None = None) -> list[int]:
    algorithm = algorithm or default_algorithm(pool)
    if algorithm == "crc32":
        return _crc32(pool, block_ids)
    if algorithm == "wsum64":
        return _wsum64(pool, block_ids)
    raise ValueError(f"checksum algorithm: got {algorithm!r}, allowed crc32, wsum64")


def _crc32(pool: torch.Tensor, block_ids: list[int]) -> list[int]:
    host = pool if pool.device.type == "cpu" else None
    out = []
    for i in block_ids:
        block = host[i] if host is not None else pool[i].cpu()
        out.append(zlib.crc32(block.contiguous().view(torch.uint8).numpy().data))  # zero-copy on the host
    return out


def _wsum64(pool: torch.Tensor, block_ids: list[int]) -> list[int]:
    """sum_i (i + 1) * word_i over each block's 32-bit words, mod 2**64: any changed word changes it."""
    words = pool.reshape(pool.shape[0], -1).view(torch.uint8)  # [num_blocks, block_bytes]
    if words.shape[1] % 4:
        raise ValueError(f"pool: block of {words.shape[1]} bytes, checksums need a multiple of 4")
    words = words.view(torch.int32)  # [num_blocks, W]
    if pool.is_cuda:  # one Triton pass over the blocks, no int64 copy of them
        return block_checksum(words, torch.tensor(block_ids, device=pool.device)).tolist()
    # a host pool checked against a GPU owner's sums: the arithmetic is ~100x faster on a GPU, if one is here
    work = torch.device("cuda") if torch.cuda.is_available() else pool.device
    out: list[int] = []
    for start in range(0, len(block_ids), _CHUNK):  # chunks bound the reference's int64 scratch memory
        rows = words.index_select(0, torch.tensor(block_ids[start : start + _CHUNK])).to(work)
        out += block_checksum_ref(rows, torch.arange(len(rows), device=work)).tolist()
    return out
