"""Both sides of a NIXL transfer, each run in its own process by the transport tests (the test process
itself never loads UCX)."""

import torch

from engine.kv.coded_pool import CodedFormat
from services.transport.nixl_backend import NixlTransport

BLOCK_SHAPE = (2, 2, 16, 2, 8)  # [layers, k/v, block_size, kv_heads, head_dim]
CODED = CodedFormat(
    bits=4, seed=5, num_layers=2, block_size=16, kv_heads=2, head_dim=8
)  # BLOCK_SHAPE's geometry


def owner_pool(num_blocks: int, seed: int) -> torch.Tensor:
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=torch.Generator().manual_seed(seed))


def coded_blocks(num_blocks: int, seed: int, fmt: CodedFormat = CODED) -> torch.Tensor:
    """[num_blocks, block_bytes] uint8: random KV blocks encoded in fmt."""
    return fmt.encode(owner_pool(num_blocks, seed + 1))


def fp8_blocks(blocks: torch.Tensor, kv_scales: torch.Tensor) -> torch.Tensor:
    """float32 blocks [n, *BLOCK_SHAPE] -> e4m3 under kv_scales [layers, 2, kv_heads]."""
    from kernels.kv_convert import convert_kv_blocks_ref

    out = torch.zeros(blocks.shape, dtype=torch.float8_e4m3fn)
    convert_kv_blocks_ref(blocks, None, out, torch.arange(len(blocks)), kv_scales)
    return out


def serve(
    conn, num_blocks: int, seed: int, kv_scales: torch.Tensor | None = None, num_coded: int = 0
) -> None:
    """Answer commands over a pipe: ("handle", ids) -> KVHandle, ("corrupt", id), ("restore", id),
    ("released",) -> handle ids released so far, ("stop",). With kv_scales the pool is e4m3; with num_coded
    a CODED pool (coded_blocks(num_coded, seed)) follows it, ids num_blocks on."""
    transport = NixlTransport()
    pool = owner_pool(num_blocks, seed)
    if kv_scales is not None:
        pool = fp8_blocks(pool, kv_scales)
    transport.register(pool)
    transport.set_kv_scales(kv_scales)
    if num_coded:
        transport.register_coded(coded_blocks(num_coded, seed), CODED, num_blocks)
    original = [r.tensor.clone() for r in transport.regions]
    released: list[str] = []
    while True:
        released += transport.take_released()
        if not conn.poll(0.01):
            continue
        command, *args = conn.recv()
        if command == "handle":
            conn.send(transport.handle(args[0], num_tokens=len(args[0]) * BLOCK_SHAPE[2]))
        elif command == "corrupt":
            r = transport.region_of(args[0])
            block = transport.regions[r].tensor[args[0] - transport.regions[r].first_id]
            block.view(-1).view(torch.uint8)[7] ^= (
                1  # one byte of one block changes after the handle was made
            )
            conn.send(True)
        elif command == "restore":
            r = transport.region_of(args[0])
            first = transport.regions[r].first_id
            transport.regions[r].tensor[args[0] - first] = original[r][args[0] - first]
            conn.send(True)
        elif command == "released":
            conn.send(list(released))
        elif command == "stop":
            transport.close()
            conn.send(True)
            return


def pull(
    conn,
    num_blocks: int,
    block_shape: tuple = BLOCK_SHAPE,
    kv_scales: torch.Tensor | None = None,
    fp8: bool = False,
    coded: tuple[CodedFormat, int] | None = None,
) -> None:
    """Answer ("pull", handle, into_ids) -> ("ok", blocks) or ("error", message); ("converted",) -> blocks
    converted so far; ("coded", handle) -> the coded pool each block would go to; ("stop",). With kv_scales (or
    fp8) the pool is e4m3; with coded (format, blocks) a coded pool follows it. With one, ok's blocks are a
    list, each block as its region holds it."""
    from services.transport import TransferError

    transport = NixlTransport()
    dtype = torch.float8_e4m3fn if fp8 or kv_scales is not None else torch.float32
    transport.register(torch.zeros((num_blocks, *block_shape), dtype=dtype))
    transport.set_kv_scales(kv_scales)
    if coded is not None:
        fmt, n = coded
        transport.register_coded(torch.zeros((n, fmt.block_bytes), dtype=torch.uint8), fmt, num_blocks)
    while True:
        command, *args = conn.recv()
        if command == "stop":
            transport.close()
            conn.send(True)
            return
        if command == "converted":
            conn.send(transport.converted_blocks)
            continue
        if command == "coded":
            conn.send(transport.local_coded_pools(args[0]))
            continue
        handle, into = args
        try:
            transport.pull(handle, into)
        except TransferError as e:
            conn.send(("error", str(e)))
            continue
        transport.release(handle)
        if coded is None:
            conn.send(("ok", transport.pool[into].clone()))
            continue
        regions = [transport.regions[transport.region_of(b)] for b in into]
        conn.send(("ok", [r.tensor[b - r.first_id].clone() for r, b in zip(regions, into, strict=True)]))
