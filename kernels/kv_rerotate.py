"""Copy token slots of a block-major KV pool to other slots, rotating the keys by a further position offset
(RoPE re-rotation): a document's KV computed at canonical positions 0.. moves to its place in a prompt.

RoPE turns each coordinate pair of a key by the angle position x inv_freq, so turning a key rotated at
position j by the angle of p gives the key rotated at j + p: R(p) R(j) = R(j + p), exact up to rounding
(default, linear and llama3 scaling all keep the angle linear in the position). Values carry no position
and are copied as they are.

Torch only: a gather, one rotation of the keys and a scatter, so the bytes move about three times (a fused
kernel would move them once; the copy is a small part of an assembled prompt's time, see
benchmarks/document_kv.py).
"""

import torch

__all__ = ["rerotate_copy_ref"]


def rerotate_copy_ref(
    pool: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """pool [N, L, 2, block_size, kv_heads, D]; src_slots, dst_slots [n] int64 flat slots (block x block_size +
    offset), disjoint; cos, sin [n, D] fp32: the rotation each token's key gets (its offset's angles, two
    equal halves); kv_scales [L, 2, kv_heads] fp32 for an FP8 pool (keys dequantized, turned, quantized again
    with the same scales). Every layer's K and V at src -> dst."""
    n, D = len(src_slots), pool.shape[-1]
    if dst_slots.shape != src_slots.shape or cos.shape != (n, D) or sin.shape != (n, D):
        raise ValueError(f"src_slots, dst_slots [n], cos, sin [n, {D}]: got {len(dst_slots)}, {cos.shape}")
    if pool.dim() != 6 or D % 2:
        raise ValueError(f"pool: [N, L, 2, block_size, kv_heads, D] with even D, got {tuple(pool.shape)}")
    if not n:
        return
    bs = pool.shape[3]
    kv = pool[src_slots // bs, :, :, src_slots % bs]  # [n, L, 2, H, D] (a copy)
    k = kv[:, :, 0].float()  # [n, L, H, D]
    if kv_scales is not None:
        k = k * kv_scales[None, :, 0, :, None]
    half = D // 2
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    k = k * c + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * s
    if kv_scales is not None:  # saturating, as the writes are (kernels/attention_ref.py)
        limit = torch.finfo(pool.dtype).max
        k = (k / kv_scales[None, :, 0, :, None]).clamp(-limit, limit)
    kv[:, :, 0] = k.to(pool.dtype)
    pool[dst_slots // bs, :, :, dst_slots % bs] = kv
