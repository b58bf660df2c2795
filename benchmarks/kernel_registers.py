"""Registers and stack of the coded decode kernel's variants, compiled for an H100 (sm_90) on this CPU with
Triton's bundled ptxas: a proxy to iterate on between GPU runs (the H100 run of 7cfebae reported the same
255 registers for the 32-token polynomial variant). No GPU needed.

    python -m benchmarks.kernel_registers [--tiles 32 64] [--dequants 0 1] [--warps 4 8] [--passes 0 1 2]

Llama-3-8B heads (32 q / 8 kv, d=128), block 16, 4-bit codes, decode (one query a sequence).
"""

import argparse
import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.coded_attention import _coded_decode_kernel

POINTERS = {
    "q_ptr": "*bf16",
    "q_rot_ptr": "*fp32",
    "base_ptr": "*bf16",
    "codes_ptr": "*u8",
    "norms_ptr": "*fp32",
    "centroids_ptr": "*fp32",
    "low_codes_ptr": "*u8",
    "low_norms_ptr": "*fp32",
    "low_centroids_ptr": "*fp32",
    "scales_ptr": "*fp32",
    "part_ptr": "*fp32",
    "lse_ptr": "*fp32",
    "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
}
UNALIGNED = {
    "num_base_blocks",
    "first_low",
    "num_splits",
    "split_offset",
    "total_splits",
    "scale_log2",
}  # strides are multiples of 16
SHAPE = dict(BLOCK_SIZE=16, HEAD_DIM=128, NUM_HEADS=32, GROUP=4, QLEN=1, ROWS_PAD=16, BITS=4, LOW_BITS=0)


def resources(constexprs: dict, num_warps: int) -> dict:
    """{registers, stack_bytes, shared_bytes} of one variant's sm_90 binary."""
    signature, attrs = {}, {}
    for i, name in enumerate(_coded_decode_kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = POINTERS.get(name, "fp32" if name == "scale_log2" else "i32")
        if name not in UNALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=_coded_decode_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage!r}")
    registers, stack, shared = map(int, found.groups())
    return {"registers": registers, "stack_bytes": stack, "shared_bytes": shared}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--dequants", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--warps", nargs="+", type=int, default=[4])
    parser.add_argument(
        "--passes", nargs="+", type=int, default=[0, 1, 2], help="0: both formats, 1: 16-bit, 2: coded"
    )
    args = parser.parse_args()
    for tile, dequant, warps, kind in itertools.product(args.tiles, args.dequants, args.warps, args.passes):
        constexprs = dict(SHAPE, TILE_N=tile, DEQUANT=dequant, PRECISION="ieee", SCALED=False, PASS=kind)
        row = {"tile_n": tile, "dequant": dequant, "num_warps": warps, "pass": kind}
        print({**row, **resources(constexprs, warps)}, flush=True)


if __name__ == "__main__":
    main()
