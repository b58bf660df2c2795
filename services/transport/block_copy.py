"""Block copies between block-major pools in one process, whatever the devices: one copy per run of
consecutive ids (GPU↔GPU, pinned host↔GPU as async DMAs on a stream, host↔host as memcpy)."""

import torch


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of runs where both ids go up by one."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if out and s == out[-1][0] + out[-1][2] and d == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def copy_blocks(
    src_pool: torch.Tensor,
    src_ids: list[int],
    dst_pool: torch.Tensor,
    dst_ids: list[int],
    stream: torch.cuda.Stream | None = None,
    wait: bool = True,
) -> None:
    """dst_pool[dst_ids] = src_pool[src_ids] (both [num_blocks, ...] with equal bytes per block), and wait
    for the copies. `stream`: where GPU copies go (default: the GPU's current stream); the caller orders it
    after any GPU work the copy depends on. `wait=False` leaves GPU copies in flight on it (the caller
    records an event; host memory must be pinned)."""
    src, dst = src_pool.reshape(src_pool.shape[0], -1), dst_pool.reshape(dst_pool.shape[0], -1)
    if src.dtype != dst.dtype:
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    gpu = dst.device if dst.is_cuda else src.device if src.is_cuda else None
    if gpu is None:
        for s, d, n in runs(src_ids, dst_ids):
            dst[d : d + n].copy_(src[s : s + n])
        return
    stream = stream or torch.cuda.current_stream(gpu)
    with torch.cuda.device(gpu), torch.cuda.stream(stream):
        for s, d, n in runs(src_ids, dst_ids):
            dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
    if wait:
        stream.synchronize()
