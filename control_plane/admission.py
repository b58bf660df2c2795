"""Admission control: a request whose class's TTFT target cannot be met is rejected now (HTTP 429 with
Retry-After) instead of queueing without end.

The prediction is Little's law on prompt tokens: a new request waits for the prompt tokens queued ahead of
it (admitted, no first token yet) — only those of its own class or a higher one, since the engines schedule
by priority and preempt lower classes — divided by the rate the pools have been getting through prompt
tokens while work was queued. That rate is measured, not configured: it already reflects the replicas,
the hardware, prefix-cache hits and the decode work sharing the steps. With no measurement yet (a cold or
idle server) everything is admitted. No torch, no Ray.
"""

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

from control_plane.slo import SLOClass


class Overloaded(Exception):
    """The request would miss its TTFT target: come back after `retry_after_s`."""

    def __init__(self, slo: SLOClass, predicted_s: float, retry_after_s: int):
        super().__init__(f"overloaded: class {slo.name!r} would wait about {predicted_s:.1f} s for its first "
                         f"token, its target is {slo.ttft_ms / 1000:g} s; retry after {retry_after_s} s")
        self.slo, self.predicted_s, self.retry_after_s = slo, predicted_s, retry_after_s


@dataclass(eq=False)
class Ticket:
    slo: SLOClass
    prompt_tokens: int
    id: int = field(default=0)


class AdmissionController:
    def __init__(self, window_s: float = 10.0, min_busy_s: float = 1.0, clock=time.monotonic):
        """window_s: how far back the drain rate looks; min_busy_s: queued time needed before a rate counts."""
        if window_s <= 0 or min_busy_s <= 0 or min_busy_s > window_s:
            raise ValueError(f"window_s, min_busy_s: got {window_s}, {min_busy_s}; allowed 0 < min_busy_s <= window_s")
        self.window_s, self.min_busy_s, self.clock = window_s, min_busy_s, clock
        self._pending: dict[int, Ticket] = {}
        self._drained: deque[tuple[float, int]] = deque()  # (time of first token, prompt tokens)
        self._busy_since: float | None = None  # since when something has been queued without a pause
        self._last_rate: float | None = None  # prompt tokens per second, the last good measurement
        self._ids = itertools.count(1)
        self.rejected: dict[str, int] = {}

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def rate(self) -> float | None:
        """Prompt tokens per second drained while work was queued (None until measured)."""
        now = self.clock()
        while self._drained and now - self._drained[0][0] > self.window_s:
            self._drained.popleft()
        if self._busy_since is not None:
            start = max(self._busy_since, now - self.window_s)
            tokens = sum(n for t, n in self._drained if t >= start)
            if now - start >= self.min_busy_s and tokens:
                self._last_rate = tokens / (now - start)
        return self._last_rate

    def predict_ttft_s(self, slo: SLOClass, prompt_tokens: int) -> float | None:
        rate = self.rate()
        if rate is None:
            return None
        ahead = sum(t.prompt_tokens for t in self._pending.values() if t.slo.priority <= slo.priority)
        return (ahead + prompt_tokens) / rate

    def admit(self, slo: SLOClass, prompt_tokens: int) -> Ticket:
        """A ticket to hand back with `first_token` or `cancel`; raises Overloaded when the target would be missed."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: got {prompt_tokens}, allowed >= 1")
        predicted = self.predict_ttft_s(slo, prompt_tokens)
        target_s = slo.ttft_ms / 1000
        if predicted is not None and predicted > target_s:
            self.rejected[slo.name] = self.rejected.get(slo.name, 0) + 1
            raise Overloaded(slo, predicted, max(1, math.ceil(predicted - target_s)))
        ticket = Ticket(slo, prompt_tokens, next(self._ids))
        if not self._pending:
            self._busy_since = self.clock()
        self._pending[ticket.id] = ticket
        return ticket

    def first_token(self, ticket: Ticket) -> None:
        """The request got its first token: its prompt tokens drained. Idempotent."""
        if self._pending.pop(ticket.id, None) is not None:
            self._drained.append((self.clock(), ticket.prompt_tokens))
            self._settle()

    def cancel(self, ticket: Ticket) -> None:
        """The request ended before its first token (error, disconnect). Idempotent."""
        if self._pending.pop(ticket.id, None) is not None:
            self._settle()

    def _settle(self) -> None:
        if not self._pending:
            self.rate()  # keep the measurement of the busy period that just ended
            self._busy_since = None
