"""Random paged-attention problems: shuffled block tables, poisoned outputs, fresh inputs per call."""

from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    q: torch.Tensor  # [T, H, D]
    kv_cache: torch.Tensor  # [blocks, 2, bs, Hkv, D], a strided layer view of a block-major pool
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens_list: list[int]
    query_start_list: list[int]


def make_problem(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    num_layers: int = 2,
    seed: int | None = None,
) -> PagedProblem:
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randn((num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), generator=gen)
    kv_cache = pool.to(device=device, dtype=dtype)[
        :, num_layers - 1
    ]  # a strided layer view, as in the engine
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq)
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], num_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    return PagedProblem(
        q,
        kv_cache,
        tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens,
        starts,
    )


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))
