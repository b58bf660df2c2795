"""Both sides of a NIXL transfer, each run in its own process by the transport tests (the test process
itself never loads UCX)."""

import torch

from services.transport.nixl_backend import NixlTransport

BLOCK_SHAPE = (2, 2, 16, 2, 8)  # [layers, k/v, block_size, kv_heads, head_dim]


def owner_pool(num_blocks: int, seed: int) -> torch.Tensor:
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=torch.Generator().manual_seed(seed))


def fp8_blocks(blocks: torch.Tensor, kv_scales: torch.Tensor) -> torch.Tensor:
    """float32 blocks [n, *BLOCK_SHAPE] -> e4m3 under kv_scales [layers, 2, kv_heads]."""
    from kernels.kv_convert import convert_kv_blocks_ref

    out = torch.zeros(blocks.shape, dtype=torch.float8_e4m3fn)
    convert_kv_blocks_ref(blocks, None, out, torch.arange(len(blocks)), kv_scales)
    return out


def serve(conn, num_blocks: int, seed: int, kv_scales: torch.Tensor | None = None) -> None:
    """Answer commands over a pipe: ("handle", ids) -> KVHandle, ("corrupt", id), ("restore", id),
    ("released",) -> handle ids released so far, ("stop",). With kv_scales the pool is e4m3."""
    transport = NixlTransport()
    pool = owner_pool(num_blocks, seed)
    if kv_scales is not None:
        pool = fp8_blocks(pool, kv_scales)
    original = pool.clone()
    transport.register(pool)
    transport.set_kv_scales(kv_scales)
    released: list[str] = []
    while True:
        released += transport.take_released()
        if not conn.poll(0.01):
            continue
        command, *args = conn.recv()
        if command == "handle":
            conn.send(transport.handle(args[0], num_tokens=len(args[0]) * BLOCK_SHAPE[2]))
        elif command == "corrupt":
            word = pool[args[0]].view(-1).view(torch.uint8)
            word[7] ^= 1  # one byte of one block changes after the handle was made
            conn.send(True)
        elif command == "restore":
            pool[args[0]] = original[args[0]]
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
) -> None:
    """Answer ("pull", handle, into_ids) -> ("ok", blocks) or ("error", message); ("converted",) -> blocks
    converted so far; ("stop",). With kv_scales (or fp8) the pool is e4m3."""
    from services.transport import TransferError

    transport = NixlTransport()
    dtype = torch.float8_e4m3fn if fp8 or kv_scales is not None else torch.float32
    transport.register(torch.zeros((num_blocks, *block_shape), dtype=dtype))
    transport.set_kv_scales(kv_scales)
    while True:
        command, *args = conn.recv()
        if command == "stop":
            transport.close()
            conn.send(True)
            return
        if command == "converted":
            conn.send(transport.converted_blocks)
            continue
        handle, into = args
        try:
            transport.pull(handle, into)
        except TransferError as e:
            conn.send(("error", str(e)))
            continue
        transport.release(handle)
        conn.send(("ok", transport.pool[into].clone()))
