"""Per-block checksums computed where the pool lives (GPU or CPU), cheap next to the transfer itself."""

import torch

_CHUNK = 64  # blocks per pass: bounds the int64 scratch memory


def block_checksums(pool: torch.Tensor, block_ids: list[int]) -> list[int]:
    """A position-weighted sum of each block's 32-bit words, mod 2**64: any changed word changes it."""
    if not block_ids:
        return []
    out: list[int] = []
    for start in range(0, len(block_ids), _CHUNK):
        ids = torch.tensor(block_ids[start:start + _CHUNK], device=pool.device)
        raw = pool.index_select(0, ids).reshape(len(ids), -1).view(torch.uint8)  # [n, block_bytes]
        if raw.shape[1] % 4:
            raise ValueError(f"pool: block of {raw.shape[1]} bytes, checksums need a multiple of 4")
        words = raw.view(torch.int32).to(torch.int64)  # [n, block_bytes / 4]
        weights = torch.arange(1, words.shape[1] + 1, device=pool.device, dtype=torch.int64)
        out += (words * weights).sum(dim=1).tolist()  # int64 wraps: arithmetic mod 2**64
    return out
