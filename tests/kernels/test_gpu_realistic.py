"""The kernels at Llama-3-8B / Mixtral sizes in bf16 on the GPU."""

import pytest
import torch
from paged_inputs import make_problem, poisoned_like

from kernels.decode_attention import decode_attention, num_kv_splits
from kernels.moe import fused_moe, fused_moe_ref
from kernels.prefill_attention import paged_attention_ref, prefill_attention
from kernels.rms_norm import rms_norm, rms_norm_ref

pytestmark = pytest.mark.gpu


def _rel(out, want):
    assert not out.isnan().any()
    return ((out.float() - want.float()).norm() / want.float().norm()).item()


def test_decode_attention_llama3_8b_heads_long_contexts():
    seq_lens = [2048, 8191, 100, 5000, 1, 32768]
    p = make_problem(seq_lens, [1] * len(seq_lens), 32, 8, 128, 16, torch.bfloat16, "cuda", num_layers=1)
    splits = num_kv_splits(
        len(seq_lens), 8, max(seq_lens), torch.cuda.get_device_properties().multi_processor_count
    )
    out = decode_attention(
        p.q, p.kv_cache, p.block_tables, p.seq_lens, 128**-0.5, splits, out=poisoned_like(p.q)
    )
    want = paged_attention_ref(
        p.q.float(), p.kv_cache.float(), p.block_tables, seq_lens, p.query_start_list, 128**-0.5
    )
    assert _rel(out, want) < 1e-2


def test_prefill_attention_llama3_8b_heads_with_prefix():
    seq_lens, query_lens = [4096, 3000, 700], [2048, 3000, 1]
    p = make_problem(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16, "cuda", num_layers=1)
    out = prefill_attention(
        p.q,
        p.kv_cache,
        p.block_tables,
        p.seq_lens,
        p.query_start_loc,
        3000,
        128**-0.5,
        out=poisoned_like(p.q),
    )
    want = paged_attention_ref(
        p.q.float(), p.kv_cache.float(), p.block_tables, seq_lens, p.query_start_list, 128**-0.5
    )
    assert _rel(out, want) < 1e-2


def test_fused_moe_mixtral_like():
    T, H, inter, E = 300, 1024, 512, 8
    x = torch.randn(T, H, device="cuda").bfloat16()
    w13 = (torch.randn(E, 2 * inter, H, device="cuda") / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda") / inter**0.5).bfloat16()
    logits = torch.randn(T, E, device="cuda").bfloat16()
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), logits.float(), 2, True)
    assert _rel(fused_moe(x, w13, w2, logits, 2, True), want) < 2e-2


def test_rms_norm_llama3_8b_hidden():
    x, r = (torch.randn(512, 4096, device="cuda").bfloat16() for _ in range(2))
    w = torch.randn(4096, device="cuda").bfloat16()
    out, res = rms_norm(x, w, 1e-5, r)
    want, want_res = rms_norm_ref(x.float(), w.float(), 1e-5, r.float())
    assert _rel(out, want) < 1e-2 and _rel(res, want_res) < 1e-2
