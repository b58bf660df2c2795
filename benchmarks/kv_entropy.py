"""Does lossless entropy coding pay on top of rotated low-bit KV codes (issue 23)? Measured on the real KV of
the trained reference target.

    python -m benchmarks.kv_entropy [--windows 40] [--out DIR]    (zstd, lz4: pip install zstandard lz4)

The engine prefills held-out windows; every layer's K and V rows are read from its pool and coded at 2, 3 and
4 bits (kernels/turboquant.py). For each block format (bf16 pages; packed codes; the codes' fp32 norms) it
reports the order-0 entropy of its symbols (16-bit words, codes, bytes of the norms: what a coder of
independent symbols could save) and
what zlib, zstd and lz4 achieve on 16-token blocks (the unit a tier or a transfer moves), with their single-
core compression and decompression rates. Writes benchmarks/results/kv_entropy.json.
"""

import argparse
import math
import time
import zlib
from pathlib import Path

import torch

from benchmarks.quant_quality import heldout_windows, window_logits
from benchmarks.results_io import write_result
from benchmarks.spec_acceptance import MODELS
from engine import LLM
from kernels.turboquant import encode_ref, rotation_signs, unpack_codes


def codecs() -> dict:
    out = {"zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress)}
    try:
        import zstandard

        c, d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        out["zstd-3"] = (c.compress, d.decompress)
    except ImportError:
        print("zstandard not installed: no zstd row")
    try:
        import lz4.frame

        out["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    except ImportError:
        print("lz4 not installed: no lz4 row")
    return out


def entropy_bits(symbols: torch.Tensor, alphabet: int) -> float:
    counts = torch.bincount(symbols.reshape(-1).long(), minlength=alphabet).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def measure(name: str, blocks: list[bytes], symbol_bits: int, entropy: float) -> list[dict]:
    raw = sum(len(b) for b in blocks)
    rows = []
    for codec, (compress, decompress) in codecs().items():
        t0 = time.perf_counter()
        packed = [compress(b) for b in blocks]
        t1 = time.perf_counter()
        assert [decompress(p) for p in packed] == blocks
        t2 = time.perf_counter()
        size = sum(len(p) for p in packed)
        rows.append(
            {
                "format": name,
                "codec": codec,
                "ratio": round(size / raw, 4),
                "saved": round(1 - size / raw, 4),
                "order0_entropy_saved": round(1 - entropy / symbol_bits, 4),
                "compress_MBps": round(raw / (t1 - t0) / 1e6, 1),
                "decompress_MBps": round(raw / (t2 - t1) / 1e6, 1),
                "block_bytes": raw // len(blocks),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = str(MODELS / "ridgeline-ref-target")
    llm = LLM(model, device="cpu", dtype="bfloat16", num_blocks=64)
    engine = llm.engine
    cfg, bs = engine.model_config, engine.config.cache.block_size
    pages = []  # [blocks, L, 2, bs, Hkv, D] bf16, the pool's full blocks after each window
    for w in heldout_windows(model, args.windows):
        window_logits(llm, w[:-1])
        pages.append(engine.kv_pool[: (len(w) - 1) // bs].clone())
    kv = torch.cat(pages)  # [n, L, 2, bs, Hkv, D]
    n, L = kv.shape[0], kv.shape[1]
    print(f"{n} blocks of {kv[0].nbytes} B", flush=True)
    rows = measure(
        "bf16", [b.contiguous().view(torch.uint8).numpy().tobytes() for b in kv], 16,
        entropy_bits(kv.contiguous().view(torch.int16).view(-1).long() + 32768, 65536),
    )  # fmt: skip
    signs = rotation_signs(1, L, cfg.num_kv_heads, cfg.head_dim)
    for bits in (4, 3, 2):
        codes, norms = [], []
        for layer in range(L):
            rows_ = kv[:, layer].reshape(-1, cfg.num_kv_heads, cfg.head_dim)  # [n * 2 * bs, Hkv, D]
            c, m = encode_ref(rows_, signs[layer], bits)
            codes.append(c.view(n, 2, bs, cfg.num_kv_heads, -1))
            norms.append(m.view(n, 2, bs, cfg.num_kv_heads))
        code_blocks = torch.stack(codes, 1)  # [n, L, 2, bs, Hkv, DB]
        symbols = unpack_codes(code_blocks, bits, cfg.head_dim)
        rows += measure(
            f"{bits}-bit codes", [b.numpy().tobytes() for b in code_blocks], bits,
            entropy_bits(symbols, 2**bits),
        )  # fmt: skip
        if bits == 4:  # the norms are the same at every bit width
            norm_blocks = torch.stack(norms, 1)  # [n, L, 2, bs, Hkv] fp32
            norm_blocks = torch.stack(norms, 1)  # [n, L, 2, bs, Hkv] fp32
            rows += measure(
                "fp32 norms", [b.numpy().tobytes() for b in norm_blocks], 8,
                entropy_bits(norm_blocks.contiguous().view(torch.uint8), 256),
            )  # fmt: skip
    path = write_result(
        "kv_entropy",
        {
            "model": "ridgeline-ref-target",
            "blocks": n,
            "unit": f"one block: {bs} tokens x {L} layers x K,V",
            "rows": rows,
        },
        Path(args.out) if args.out else None,
    )
    print(path)
    assert math.isfinite(rows[0]["ratio"])


if __name__ == "__main__":
    main()
