"""MoE routing, token alignment and the grouped expert matmul against the reference loop."""

import pytest
import torch

from kernels.moe import fused_moe, fused_moe_ref, moe_align, topk_softmax, topk_softmax_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("experts, top_k", [(4, 2), (8, 2), (60, 4), (64, 6)])
def test_topk_softmax(renormalize, experts, top_k):
    logits = torch.randn(13, experts, device=DEVICE)
    w, ids = topk_softmax(logits, top_k, renormalize)
    want_w, want_ids = topk_softmax_ref(logits, top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)


def test_moe_align_groups_rows_by_expert_in_padded_tiles():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)  # flat rows 0..5
    rows, tile_expert = moe_align(ids, num_experts=4, block_m=4)
    n = 6
    tiles = rows.view(-1, 4).tolist()
    experts = tile_expert.tolist()
    got = {e: sorted(r for r in tile if r < n) for tile, e in zip(tiles, experts, strict=True) if e >= 0}
    assert got == {0: [1, 4], 1: [3], 2: [0, 2, 5]}
    assert all(r == n for tile, e in zip(tiles, experts, strict=True) if e < 0 for r in tile)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens, hidden, inter, experts, top_k, renormalize",
    [
        (1, 64, 32, 4, 2, True),  # one token
        (19, 64, 48, 8, 2, True),  # Mixtral-style, odd token count
        (33, 96, 32, 16, 4, False),  # Qwen-MoE-style, no renormalisation, hidden not a power of two
    ],
)
def test_fused_moe_matches_the_reference_loop(dtype, tokens, hidden, inter, experts, top_k, renormalize):
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE) / inter**0.5).to(dtype)
    logits = torch.randn(tokens, experts, device=DEVICE).to(dtype)
    out = fused_moe(x, w13, w2, logits, top_k, renormalize)
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), logits.float(), top_k, renormalize)
    err = (out.float() - want).norm() / want.norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def test_fused_moe_rejects_mismatched_shapes():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(
            x,
            torch.randn(4, 64, 64, device=DEVICE),
            torch.randn(4, 64, 16, device=DEVICE),
            torch.randn(3, 4, device=DEVICE),
            2,
            True,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_experts_match_the_dequantizing_reference(dtype):
    from kernels.fp8 import quantize_per_channel

    tokens, hidden, inter, experts, top_k = 19, 64, 48, 8, 2
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    w13 = torch.randn(experts, 2 * inter, hidden, device=DEVICE) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device=DEVICE) / inter**0.5
    (q13, s13), (q2, s2) = (quantize_per_channel(w.reshape(-1, w.shape[-1])) for w in (w13, w2))
    q13, s13, q2, s2 = q13.view(w13.shape), s13.view(experts, -1), q2.view(w2.shape), s2.view(experts, -1)
    logits = torch.randn(tokens, experts, device=DEVICE).to(dtype)
    out = fused_moe(x, q13, q2, logits, top_k, True, s13, s2)
    want = fused_moe_ref(x.float(), q13, q2, logits.float(), top_k, True, s13, s2)
    err = (out.float() - want).norm() / want.norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    plain = fused_moe_ref(x.float(), w13, w2, logits.float(), top_k, True)  # e4m3's error, a few percent
    assert (want - plain).norm() / plain.norm() < 0.06
    with pytest.raises(ValueError, match="w13_scale, w2_scale"):
        fused_moe(x, q13, q2, logits, top_k, True, s13, None)
