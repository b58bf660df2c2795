"""Admission control: a request whose class's TTFT target cannot be met is rejected now (HTTP 429 with
Retry-After) instead of queueing without end, and under pressure the lower classes are shed first.

The prediction is Little's law on prompt tokens: a new request waits for the prompt tokens queued ahead of
it (admitted, no first token yet) — only those of its own class or a higher one, since the engines schedule
by priority and preempt lower classes — divided by the rate the pools get through prompt tokens while work
is queued. That rate is measured, not configured: prompt tokens drained over the busy time of the last
`window_s` (busy: at least one admitted request waiting). It recovers by itself:
- the window forgets: one request that waited through a worker restart weighs on the estimate for
  `window_s` at most, and with no drain in the window the estimate is stale and everything is admitted
  until a new one is measured;
- a floor: the estimate never falls below `capacity_floor` of the best rate measured over at least
  `capacity_busy_s` of busy time (that best decays with `capacity_half_life_s`);
- a probe: a request with nothing of its class or a higher one ahead of it is always admitted (refusing it
  would not make anyone's first token come sooner), and its first token is a fresh measurement.

Shedding keeps class order: a class is refused when its own prediction misses its target, and also while
any higher class is under pressure — its queue would take, or its requests of the last `observe_s` took
(median time to first token), more than `shed_at` of its target — so batch goes before standard, and
standard before interactive. The observed times catch what the prompt queue cannot show: a machine whose
prefill competes with decode (one host, CPUs) gets slower for every class at once. A class's own observed
median past its target refuses it too while anything of it waits. No torch, no Ray.
"""

import itertools
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from control_plane.slo import SLOClass


class Overloaded(Exception):
    """The request would miss its TTFT target, or is shed for a higher class: come back after
    `retry_after_s`."""

    def __init__(self, message: str, slo: SLOClass, predicted_s: float, retry_after_s: int):
        super().__init__(message)
        self.slo, self.predicted_s, self.retry_after_s = slo, predicted_s, retry_after_s


@dataclass(eq=False)
class Ticket:
    slo: SLOClass
    prompt_tokens: int
    id: int = field(default=0)
    admitted_at: float = 0.0


class AdmissionController:
    def __init__(
        self,
        window_s: float = 10.0,
        min_busy_s: float = 0.2,
        capacity_floor: float = 0.25,
        capacity_busy_s: float = 2.0,
        capacity_half_life_s: float = 300.0,
        shed_at: float = 0.5,
        observe_s: float = 5.0,
        clock=time.monotonic,
    ):
        """window_s: how far back the drain rate looks; min_busy_s: busy time needed before a rate counts;
        capacity_*: the floor (see the module doc); shed_at: the share of a higher class's target its queue
        or its observed first-token times may take before lower classes are refused; observe_s: how far
        back those observations count."""
        if not 0 < min_busy_s <= window_s:
            raise ValueError(
                f"window_s, min_busy_s: got {window_s}, {min_busy_s}; allowed 0 < min_busy_s <= window_s"
            )
        if not 0 <= capacity_floor <= 1 or not 0 < shed_at <= 1:
            raise ValueError(
                f"capacity_floor, shed_at: got {capacity_floor}, {shed_at}; allowed [0, 1] and (0, 1]"
            )
        if capacity_busy_s <= 0 or capacity_half_life_s <= 0:
            raise ValueError("capacity_busy_s, capacity_half_life_s: must be > 0")
        self.window_s, self.min_busy_s, self.clock = window_s, min_busy_s, clock
        self.capacity_floor, self.capacity_busy_s = capacity_floor, capacity_busy_s
        self.capacity_half_life_s, self.shed_at = capacity_half_life_s, shed_at
        if observe_s <= 0:
            raise ValueError(f"observe_s: got {observe_s}, allowed > 0")
        self.observe_s = observe_s
        self._observed: dict[str, deque[tuple[float, float]]] = {}  # class -> (when, time to first token)
        self._classes: dict[str, SLOClass] = {}  # every class seen
        self._pending: dict[int, Ticket] = {}
        self._samples: deque[tuple[float, float, int]] = deque()  # (when, busy seconds before it, tokens)
        self._mark: float | None = None  # busy since then and not yet in a sample; None while idle
        self._capacity: tuple[float, float] | None = None  # (best rate, when measured)
        self._ids = itertools.count(1)
        self.rejected: dict[str, int] = {}

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def rate(self) -> float | None:
        """Prompt tokens per second while work was queued, floored by the decayed capacity; None while stale."""
        now = self.clock()
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        sampled_busy = sum(b for _, b, _ in self._samples)
        busy = sampled_busy + (now - self._mark if self._mark is not None else 0.0)
        if busy < self.min_busy_s:
            return None  # stale or too little evidence: admit, and measure
        measured = sum(n for _, _, n in self._samples) / busy
        if sampled_busy >= self.capacity_busy_s and measured > self._decayed_capacity(now):
            self._capacity = (measured, now)
        return max(measured, self.capacity_floor * self._decayed_capacity(now))

    def _decayed_capacity(self, now: float) -> float:
        if self._capacity is None:
            return 0.0
        best, at = self._capacity
        return best * 0.5 ** ((now - at) / self.capacity_half_life_s)

    def predict_ttft_s(self, slo: SLOClass, prompt_tokens: int) -> float | None:
        rate = self.rate()
        return None if rate is None else self._wait_s(self._ahead(slo) + prompt_tokens, rate)

    def _ahead(self, slo: SLOClass) -> int:
        return sum(t.prompt_tokens for t in self._pending.values() if t.slo.priority <= slo.priority)

    @staticmethod
    def _wait_s(tokens: int, rate: float) -> float:
        return tokens / rate if rate > 0 else math.inf

    def admit(self, slo: SLOClass, prompt_tokens: int) -> Ticket:
        """A ticket to hand back with `first_token` or `cancel`; raises Overloaded when the request would
        miss its target or is shed for a higher class."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: got {prompt_tokens}, allowed >= 1")
        self._classes.setdefault(slo.name, slo)
        self._check(slo, prompt_tokens, self.rate())
        now = self.clock()
        ticket = Ticket(slo, prompt_tokens, next(self._ids), admitted_at=now)
        if not self._pending:
            self._mark = now
        self._pending[ticket.id] = ticket
        return ticket

    def _check(self, slo: SLOClass, prompt_tokens: int, rate: float | None) -> None:
        for cls in sorted(self._classes.values(), key=lambda c: c.priority):
            if cls.priority >= slo.priority:
                break
            queued_s = self._wait_s(self._ahead(cls), rate) if rate is not None else 0.0
            pressure_s = max(queued_s, self.observed_ttft_s(cls) or 0.0)
            if pressure_s > self.shed_at * cls.ttft_ms / 1000:
                self._reject(
                    f"overloaded: class {slo.name!r} is shed while {cls.name!r} requests wait about "
                    f"{pressure_s:.1f} s for a first token against a {cls.ttft_ms / 1000:g} s target",
                    slo,
                    pressure_s,
                    pressure_s,
                )
        ahead = self._ahead(slo)
        if ahead == 0:
            return  # the probe: nothing of its class or above waits, so refusing it helps nobody
        predicted = max(
            self._wait_s(ahead + prompt_tokens, rate) if rate is not None else 0.0,
            self.observed_ttft_s(slo) or 0.0,
        )
        target_s = slo.ttft_ms / 1000
        if predicted > target_s:
            self._reject(
                f"overloaded: class {slo.name!r} would wait about {predicted:.1f} s for its first token, "
                f"its target is {target_s:g} s",
                slo,
                predicted,
                predicted - target_s,
            )

    def most_overdue(self) -> Ticket | None:
        """The waiting request furthest past its class's TTFT target (by its share of the target), if any is
        past it: a late first token known before it comes."""
        now = self.clock()
        late = [t for t in self._pending.values() if now - t.admitted_at > t.slo.ttft_ms / 1000]
        return max(late, key=lambda t: (now - t.admitted_at) / t.slo.ttft_ms, default=None)

    def observed_ttft_s(self, slo: SLOClass) -> float | None:
        """The median time from admission to first token of the class's requests of the last observe_s."""
        samples = self._observed.get(slo.name)
        if not samples:
            return None
        now = self.clock()
        while samples and now - samples[0][0] > self.observe_s:
            samples.popleft()
        return statistics.median(t for _, t in samples) if samples else None

    def _reject(self, message: str, slo: SLOClass, predicted_s: float, retry_s: float) -> None:
        self.rejected[slo.name] = self.rejected.get(slo.name, 0) + 1
        retry_after = max(1, math.ceil(min(retry_s, 3600.0)))
        raise Overloaded(f"{message}; retry after {retry_after} s", slo, predicted_s, retry_after)

    def first_token(self, ticket: Ticket) -> None:
        """The request got its first token: its prompt tokens drained. Idempotent."""
        if self._pending.pop(ticket.id, None) is not None:
            self._sample(ticket.prompt_tokens)
            now = self.clock()
            self._observed.setdefault(ticket.slo.name, deque()).append((now, now - ticket.admitted_at))

    def cancel(self, ticket: Ticket) -> None:
        """The request ended before its first token (error, disconnect). Idempotent."""
        if self._pending.pop(ticket.id, None) is not None:
            self._sample(0)

    def _sample(self, tokens: int) -> None:
        """Close the busy time since the last mark into a sample; busy goes on while anything is pending."""
        now = self.clock()
        busy = now - self._mark if self._mark is not None else 0.0
        self._samples.append((now, busy, tokens))
        self._mark = now if self._pending else None


class AdmitEverything:
    """No admission control (a server configured without it): every request is admitted, nothing measured."""

    def admit(self, slo: SLOClass, prompt_tokens: int) -> Ticket:
        return Ticket(slo, prompt_tokens)

    def first_token(self, ticket: Ticket) -> None:
        """Nothing measured."""

    def cancel(self, ticket: Ticket) -> None:
        """Nothing queued."""

    def most_overdue(self) -> Ticket | None:
        return None
