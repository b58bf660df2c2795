"""Chained block hashes: h_i = H(h_{i-1}, tokens of block i, extra), 128 bits of blake2b.

`extra` carries what makes two equal token runs produce different KV: the model fingerprint, the KV dtype
and an optional per-tenant cache salt. Only full blocks are hashed, so only full blocks are shared.
"""

import hashlib
from array import array

from engine.request import Request

_ROOT = b"ridgeline-kv-v1"


def hash_extra(model_fingerprint: str, kv_dtype: str, cache_salt: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (model_fingerprint, kv_dtype, cache_salt or ""):
        data = part.encode()
        h.update(len(data).to_bytes(4, "little") + data)  # length-prefixed: no ambiguity between fields
    return h.digest()


def hash_block(parent: bytes | None, tokens: list[int], extra: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else _ROOT)
    h.update(extra)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def update_block_hashes(request: Request, block_size: int) -> None:
    """Extend `request.block_hashes` to cover every full block of its tokens so far."""
    num_full = request.num_tokens // block_size
    for i in range(len(request.block_hashes), num_full):
        parent = request.block_hashes[i - 1] if i else None
        tokens = request.token_ids(i * block_size, (i + 1) * block_size)
        request.block_hashes.append(hash_block(parent, tokens, request.block_extra(i, block_size)))


def prompt_block_hashes(token_ids: list[int], block_size: int, extra: bytes) -> list[bytes]:
    """The chained hashes of a prompt's full blocks (what a router matches against workers' KV)."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
