"""KV precision by token age: which bits a full KV block is held at, given how far behind the newest token it
is (issue 23's policy; the codec is kernels/turboquant.py).

A sequence's first `sinks` tokens (attention sinks) and every block not wholly older than the last `window`
tokens stay in the pool's base format (16-bit or fp8). Older full blocks are coded at `bits`; blocks wholly
older than `horizon` tokens at `low_bits`. Sinks and window are whole blocks: a block is aged as one.
"""

import dataclasses
from dataclasses import dataclass

import torch

CODE_BITS = (2, 3, 4)
BASE = 0  # "not coded": the pool's base format


@dataclass(frozen=True)
class KVAgePolicy:
    bits: int = 4
    sinks: int = 16  # tokens
    window: int = 512  # tokens
    horizon: int | None = None  # tokens; None: no second step down
    low_bits: int | None = None
    seed: int = 0  # the rotations' seed (kernels/turboquant.py rotation_signs)

    def __post_init__(self) -> None:
        if self.bits not in CODE_BITS:
            raise ValueError(f"kv_age_policy.bits: got {self.bits}, allowed {list(CODE_BITS)}")
        if self.sinks < 0:
            raise ValueError(f"kv_age_policy.sinks: got {self.sinks}, allowed >= 0")
        if self.window < 1:
            raise ValueError(f"kv_age_policy.window: got {self.window}, allowed >= 1")
        if (self.horizon is None) != (self.low_bits is None):
            raise ValueError("kv_age_policy.horizon, low_bits: give both or neither")
        if self.horizon is not None and self.low_bits is not None:
            if self.horizon <= self.window:
                raise ValueError(
                    f"kv_age_policy.horizon: got {self.horizon}, allowed > window ({self.window})"
                )
            if self.low_bits not in CODE_BITS or self.low_bits >= self.bits:
                raise ValueError(
                    f"kv_age_policy.low_bits: got {self.low_bits}, allowed one of {list(CODE_BITS)} "
                    f"below bits ({self.bits})"
                )

    def check_block_size(self, block_size: int) -> None:
        """Sinks and window are whole blocks."""
        for name in ("sinks", "window"):
            if getattr(self, name) % block_size:
                raise ValueError(
                    f"kv_age_policy.{name}: got {getattr(self, name)}, allowed a multiple of the block size "
                    f"({block_size})"
                )

    def block_bits(self, num_tokens: int, block_size: int) -> list[int]:
        """The bits (BASE: not coded) of each block of a sequence holding num_tokens tokens."""
        out = []
        for b in range(-(-num_tokens // block_size)):
            end = (b + 1) * block_size  # one past the block's last position
            age = num_tokens - end  # tokens newer than the whole block
            if b * block_size < self.sinks or age < self.window:
                out.append(BASE)
            elif self.horizon is not None and self.low_bits is not None and age >= self.horizon:
                out.append(self.low_bits)
            else:
                out.append(self.bits)
        return out

    def coded_ranges(self, num_tokens: int, block_size: int, window: int | None = None) -> list[range]:
        """Per coded width, highest first (bits, then low_bits with a horizon): the blocks held at that
        width or lower, as block_bits gives them (`window` overrides the policy's: an SLO class's own)."""
        window = self.window if window is None else window
        first = -(-self.sinks // block_size)
        out = [range(first, max(num_tokens - window, 0) // block_size)]
        if self.horizon is not None:
            out.append(range(first, max(num_tokens - max(self.horizon, window), 0) // block_size))
        return out

    def widths(self) -> list[int]:
        """The coded widths, highest first: one pool each."""
        return [self.bits] if self.low_bits is None else [self.bits, self.low_bits]

    def bits_seen(self, num_tokens: int, block_size: int) -> torch.Tensor:
        """[T, T]: the bits key position j is held at when query position t is decoded (T = num_tokens)."""
        rows = []
        for t in range(num_tokens):
            per_block = self.block_bits(t + 1, block_size)
            row = torch.tensor(per_block).repeat_interleave(block_size)[: t + 1]
            rows.append(torch.cat([row, torch.zeros(num_tokens - t - 1, dtype=row.dtype)]))
        return torch.stack(rows)

    def mean_bits(self, num_tokens: int, block_size: int, head_dim: int, base_bits: int = 16) -> float:
        """Bits a stored value, over a context of num_tokens, a coded row's fp32 norm included."""
        bits = self.block_bits(num_tokens, block_size)
        per_token = [
            base_bits if b == BASE else b + 32 / head_dim
            for i, b in enumerate(bits)
            for _ in range(min(block_size, num_tokens - i * block_size))
        ]
        return sum(per_token) / num_tokens


def age_policy_from_dict(fields: dict) -> KVAgePolicy:
    """A policy from JSON (`--kv-age-policy '{"bits": 4, "window": 512}'`): unknown fields are named."""
    allowed = {f.name for f in dataclasses.fields(KVAgePolicy)}
    if unknown := sorted(set(fields) - allowed):
        raise ValueError(f"kv_age_policy: unknown field(s) {unknown}, allowed {sorted(allowed)}")
    for name, value in fields.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"kv_age_policy.{name}: got {value!r}, allowed an integer")
    return KVAgePolicy(**fields)
