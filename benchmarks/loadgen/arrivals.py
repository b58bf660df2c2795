"""When requests are sent. Open loop: arrival times from a process at a mean rate — Poisson (exponential
gaps), gamma, or constant. For gamma, `burstiness` is the coefficient of variation of the gaps: 1 is Poisson,
2 twice as bursty, 0.5 smoother (vLLM's `--burstiness b` is ours 1/sqrt(b)). Closed loop has no schedule:
a fixed number of users each send their next request when the last one ends (runner.py)."""

import itertools
import random
from collections.abc import Iterator

PROCESSES = ("poisson", "gamma", "constant")


def gaps(process: str, rate: float, seed: int = 0, burstiness: float = 1.0) -> Iterator[float]:
    """Endless gaps between arrivals, in seconds, at mean `rate` per second."""
    if process not in PROCESSES:
        raise ValueError(f"arrivals: got {process!r}, allowed {', '.join(PROCESSES)}")
    if rate <= 0:
        raise ValueError(f"rate: got {rate}, allowed > 0 requests per second")
    if burstiness <= 0:
        raise ValueError(f"burstiness: got {burstiness}, allowed > 0")
    rng = random.Random(seed)
    shape = 1.0 / burstiness**2
    while True:
        if process == "constant":
            yield 1.0 / rate
        elif process == "poisson":
            yield rng.expovariate(rate)
        else:
            yield rng.gammavariate(shape, 1.0 / (rate * shape))


def arrival_times(
    process: str, rate: float, count: int, seed: int = 0, burstiness: float = 1.0
) -> list[float]:
    """`count` arrival offsets in seconds from the start."""
    return list(itertools.accumulate(itertools.islice(gaps(process, rate, seed, burstiness), count)))
