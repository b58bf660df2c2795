"""Both sides of a NIXL transfer, each run in its own process by the transport tests (the test process
itself never loads UCX)."""

import torch

from services.transport.nixl_backend import NixlTransport

BLOCK_SHAPE = (2, 2, 16, 2, 8)  # [layers, k/v, block_size, kv_heads, head_dim]


def owner_pool(num_blocks: int, seed: int) -> torch.Tensor:
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=torch.Generator().manual_seed(seed))


def serve(conn, num_blocks: int, seed: int) -> None:
    """Answer commands over a pipe: ("handle", ids) -> KVHandle, ("corrupt", id), ("restore", id),
    ("released",) -> handle ids released so far, ("stop",)."""
    transport = NixlTransport()
    pool = owner_pool(num_blocks, seed)
    original = pool.clone()
    transport.register(pool)
    released: list[str] = []
    while True:
        released += transport.take_released()
        if not conn.poll(0.01):
            continue
        command, *args = conn.recv()
        if command == "handle":
            conn.send(transport.handle(args[0], num_tokens=len(args[0]) * BLOCK_SHAPE[2]))
        elif command == "corrupt":
            pool[args[0]].view(-1)[7] += 1.0  # one word of one block changes after the handle was made
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


def pull(conn, num_blocks: int, block_shape: tuple = BLOCK_SHAPE) -> None:
    """Answer ("pull", handle, into_ids) -> ("ok", blocks) or ("error", message); ("stop",)."""
    from services.transport import TransferError

    transport = NixlTransport()
    transport.register(torch.zeros((num_blocks, *block_shape)))
    while True:
        command, *args = conn.recv()
        if command == "stop":
            transport.close()
            conn.send(True)
            return
        handle, into = args
        try:
            transport.pull(handle, into)
        except TransferError as e:
            conn.send(("error", str(e)))
            continue
        transport.release(handle)
        conn.send(("ok", transport.pool[into].clone()))
