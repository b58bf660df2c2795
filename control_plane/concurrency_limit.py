"""How many requests may be in flight at once: found, not configured. A fixed cap (256) is far too high for
a small machine and maybe too low for a large one; what matters is the knee where more requests in flight
only add waiting. The limit moves like TCP's congestion window (additive increase, multiplicative
decrease), with time to first token against the request's SLO target as the congestion signal — the
approach of Envoy's and Netflix's adaptive concurrency limits:

- it starts at the configured maximum (a server refuses nothing before it has seen a late first token);
- a first token later than its class's target cuts the limit by `backoff`, or by target / time taken when
  that is smaller (but at most by half), once per round: requests admitted before the last cut say nothing
  about the limit now;
- a first token within target raises it — by 1 (doubling per round) until the first cut, by 1/limit
  after — but only when the limit was what held requests back (near it when admitted), so a quiet server
  keeps the limit it learned.

It sees every bottleneck a first token waits on (prefill queue, decode competing for the same device or
CPU, a slow worker). The frontend gives each class its share of it (SLOTable.inflight_limit), so lower
classes meet the limit first. No torch, no Ray.
"""

import math
import time


class ConcurrencyLimit:
    def __init__(
        self,
        max_limit: int,
        initial: int | None = None,
        min_limit: int = 2,
        backoff: float = 0.75,
        clock=time.monotonic,
    ):
        if max_limit < 1 or not 1 <= min_limit <= max_limit:
            raise ValueError(f"max_limit, min_limit: got {max_limit}, {min_limit}; allowed 1 <= min <= max")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff: got {backoff}, allowed (0, 1)")
        self.max_limit, self.min_limit, self.backoff, self.clock = max_limit, min_limit, backoff, clock
        self._limit = float(min(max(max_limit if initial is None else initial, min_limit), max_limit))
        self._slow_start = True
        self._last_cut = -math.inf

    @property
    def value(self) -> int:
        return max(self.min_limit, min(self.max_limit, int(self._limit)))

    def observe(self, ttft_s: float, target_s: float, admitted_at: float, inflight_at_admission: int) -> None:
        """A request's first token came `ttft_s` after it was admitted at `admitted_at` (this clock) with
        `inflight_at_admission` other requests in flight."""
        if ttft_s > target_s:
            if admitted_at >= self._last_cut:
                factor = max(0.5, min(self.backoff, target_s / ttft_s))
                self._limit = max(float(self.min_limit), self._limit * factor)
                self._last_cut = self.clock()
                self._slow_start = False
            return
        if inflight_at_admission + 1 >= self.value:
            step = 1.0 if self._slow_start else 1.0 / self._limit
            self._limit = min(float(self.max_limit), self._limit + step)


class FixedLimit:
    """The in-flight cap as configured, never moved (a server without admission control)."""

    def __init__(self, max_limit: int):
        self.value = max_limit

    def observe(self, ttft_s: float, target_s: float, admitted_at: float, inflight_at_admission: int) -> None:
        """A fixed cap learns nothing."""
