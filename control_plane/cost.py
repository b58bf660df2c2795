"""Tokens-per-dollar accounting. A pool's price is dollars per hour per replica; an engine step's wall time
is split evenly over the tokens it computed (engine/outputs.py:ComputeUsage), so a request's cost on a pool
is its share of engine seconds × price / 3600, and the dollars of a run equal the pools' busy seconds × their
prices. No torch, no Ray: usage arrives as plain numbers (anything with prefill_/decode_ seconds and tokens).
"""

from dataclasses import dataclass

# Placeholder rates for a pool that names no price: on-demand cloud list prices vary by region and vendor,
# so every real deployment should set `price_per_hour` per pool.
DEFAULT_GPU_HOUR_USD = 4.0  # one data-centre GPU (H100/H200 class)
DEFAULT_CPU_HOUR_USD = 0.05  # one vCPU


def default_price_per_hour(num_gpus: float, num_cpus: float) -> float:
    return num_gpus * DEFAULT_GPU_HOUR_USD + num_cpus * DEFAULT_CPU_HOUR_USD


@dataclass(frozen=True)
class PoolCharge:
    """What one pool charged a request for some engine time."""

    pool: str
    usd: float
    seconds: float
    prefill_tokens: int
    decode_tokens: int


class PriceList:
    """Dollars per hour per replica, by pool name."""

    def __init__(self, prices: dict[str, float]):
        for pool, price in prices.items():
            if not isinstance(price, int | float) or price < 0:
                raise ValueError(f"price_per_hour: pool {pool!r} got {price!r}, allowed a number >= 0")
        self.prices = dict(prices)

    def __contains__(self, pool: str) -> bool:
        return pool in self.prices

    def charge(self, pool: str, usage) -> PoolCharge:
        """`usage`: engine seconds and tokens (prefill_seconds, decode_seconds, prefill_tokens, decode_tokens)."""
        if pool not in self.prices:
            raise ValueError(f"pool: {pool!r} has no price, known {sorted(self.prices)}")
        seconds = usage.prefill_seconds + usage.decode_seconds
        return PoolCharge(
            pool, seconds * self.prices[pool] / 3600.0, seconds, usage.prefill_tokens, usage.decode_tokens
        )
