"""Copy token slots of a block-major KV pool to other slots, rotating the keys by a further position offset
(RoPE re-rotation): a document's KV computed at canonical positions 0.. moves to its place in a prompt.

RoPE turns each coordinate pair of a key by the angle position x inv_freq, so turning a key rotated at
position j by the angle of p gives the key rotated at j + p: R(p) R(j) = R(j + p), exact up to rounding
(default, linear and llama3 scaling all keep the angle linear in the position). Values carry no position
and are copied as they are.

`rerotate_copy` is one Triton launch (a program per token and layer: its keys read, turned and written, its
values copied), so the bytes move once; `rerotate_copy_ref` is the torch reference (a gather, the rotation
and a scatter) and the CPU path.
"""

import torch
import triton
import triton.language as tl

__all__ = ["rerotate_copy", "rerotate_copy_ref"]


@triton.jit
def _rerotate_kernel(
    pool_ptr,
    src_ptr,
    dst_ptr,
    cos_ptr,
    sin_ptr,
    scales_ptr,
    stride_b,
    stride_l,
    stride_kv,
    stride_s,
    stride_h,
    stride_c,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    SCALED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    src, dst = tl.load(src_ptr + t).to(tl.int64), tl.load(dst_ptr + t).to(tl.int64)
    h = tl.arange(0, H_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    at_src = pool_ptr + (src // BLOCK_SIZE) * stride_b + layer * stride_l + (src % BLOCK_SIZE) * stride_s
    at_dst = pool_ptr + (dst // BLOCK_SIZE) * stride_b + layer * stride_l + (dst % BLOCK_SIZE) * stride_s
    k1 = tl.load(at_src + h * stride_h + j, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(at_src + h * stride_h + HALF + j, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        scale = tl.load(scales_ptr + layer * 2 * NUM_HEADS + h, mask=h < NUM_HEADS, other=1.0)
        k1, k2 = k1 * scale, k2 * scale
    c = tl.load(cos_ptr + t * stride_c + j, mask=j < HALF, other=0.0)
    s = tl.load(sin_ptr + t * stride_c + j, mask=j < HALF, other=0.0)
    o1, o2 = k1 * c - k2 * s, k2 * c + k1 * s
    if SCALED:
        o1 = tl.clamp(o1 / scale, -448.0, 448.0)
        o2 = tl.clamp(o2 / scale, -448.0, 448.0)
    out_ty = pool_ptr.dtype.element_ty
    tl.store(at_dst + h * stride_h + j, o1.to(out_ty), mask=mask)
    tl.store(at_dst + h * stride_h + HALF + j, o2.to(out_ty), mask=mask)
    for half in tl.static_range(2):  # values as they are
        v = tl.load(at_src + stride_kv + h * stride_h + half * HALF + j, mask=mask)
        tl.store(at_dst + stride_kv + h * stride_h + half * HALF + j, v, mask=mask)


def rerotate_copy(
    pool: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """As rerotate_copy_ref, in one launch. The pool must be contiguous in its last two dimensions; cos/sin
    fp32 with the head dimension contiguous; kv_scales [L, 2, kv_heads] fp32 contiguous for an e4m3 pool."""
    n = _check(pool, src_slots, dst_slots, cos, sin)
    if pool.dtype == torch.float8_e4m3fn:
        if (
            kv_scales is None
            or kv_scales.shape != (pool.shape[1], 2, pool.shape[4])
            or not kv_scales.is_contiguous()
        ):
            raise ValueError(
                f"kv_scales: an e4m3 pool needs contiguous [L, 2, kv_heads] fp32, got {kv_scales!r:.60}"
            )
    elif kv_scales is not None:
        raise ValueError(f"kv_scales: only for an e4m3 pool, this one is {pool.dtype}")
    if (
        pool.stride(5) != 1
        or cos.dtype != torch.float32
        or cos.stride(1) != 1
        or cos.stride() != sin.stride()
    ):
        raise ValueError("pool, cos, sin: head_dim must be contiguous, cos/sin fp32 with equal strides")
    if not n:
        return
    H, D = pool.shape[4], pool.shape[5]
    _rerotate_kernel[(n, pool.shape[1])](
        pool,
        src_slots,
        dst_slots,
        cos,
        sin,
        kv_scales if kv_scales is not None else cos,
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        pool.stride(3),
        pool.stride(4),
        cos.stride(0),
        BLOCK_SIZE=pool.shape[3],
        NUM_HEADS=H,
        HALF=D // 2,
        H_PAD=triton.next_power_of_2(H),
        HALF_PAD=triton.next_power_of_2(D // 2),
        SCALED=kv_scales is not None,
    )


def _check(pool, src_slots, dst_slots, cos, sin) -> int:
    n, D = len(src_slots), pool.shape[-1]
    if dst_slots.shape != src_slots.shape or cos.shape != (n, D) or sin.shape != (n, D):
        raise ValueError(f"src_slots, dst_slots [n], cos, sin [n, {D}]: got {len(dst_slots)}, {cos.shape}")
    if pool.dim() != 6 or D % 2:
        raise ValueError(f"pool: [N, L, 2, block_size, kv_heads, D] with even D, got {tuple(pool.shape)}")
    return n


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
    n, D = _check(pool, src_slots, dst_slots, cos, sin), pool.shape[-1]
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
