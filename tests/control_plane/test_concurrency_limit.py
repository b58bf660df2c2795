"""The adaptive in-flight cap: TCP-like AIMD with time to first token against the SLO target as the signal,
on a controlled clock."""

import pytest

from control_plane.concurrency_limit import ConcurrencyLimit


class Clock:
    def __init__(self):
        self.t = 10.0

    def __call__(self) -> float:
        return self.t


def test_grows_while_it_is_what_holds_requests_back_and_keeps_what_it_learned_when_quiet():
    clock = Clock()
    limit = ConcurrencyLimit(max_limit=64, initial=4, clock=clock)
    for _ in range(4):  # slow start: +1 for each timely first token of a request admitted at the limit
        limit.observe(0.1, 0.5, admitted_at=clock.t, inflight_at_admission=limit.value - 1)
    assert limit.value == 8
    limit.observe(0.1, 0.5, admitted_at=clock.t, inflight_at_admission=1)  # far below the limit: says nothing
    assert limit.value == 8


def test_late_first_tokens_cut_it_once_per_round_then_it_grows_additively():
    clock = Clock()
    limit = ConcurrencyLimit(max_limit=64, initial=16, backoff=0.75, clock=clock)
    admitted = clock.t
    clock.t += 1.0
    limit.observe(0.6, 0.5, admitted_at=admitted, inflight_at_admission=15)  # a little late: by backoff
    assert limit.value == 12
    limit.observe(0.8, 0.5, admitted_at=admitted, inflight_at_admission=15)  # same round: no second cut
    assert limit.value == 12
    limit.observe(0.6, 0.5, admitted_at=clock.t, inflight_at_admission=11)  # admitted after the cut: cuts
    assert limit.value == 9
    for _ in range(10):  # congestion avoidance: about +1 per limit's worth of timely first tokens
        limit.observe(0.1, 0.5, admitted_at=clock.t, inflight_at_admission=8)
    assert limit.value == 10


def test_starts_at_the_maximum_and_a_far_late_first_token_halves_it():
    clock = Clock()
    limit = ConcurrencyLimit(max_limit=256, clock=clock)
    assert limit.value == 256  # refuses nothing before the first late first token
    clock.t += 1.0
    limit.observe(4.0, 0.5, admitted_at=clock.t, inflight_at_admission=200)
    assert limit.value == 128


def test_stays_within_its_bounds_and_bad_settings_are_named():
    clock = Clock()
    limit = ConcurrencyLimit(max_limit=6, initial=100, min_limit=2, clock=clock)
    assert limit.value == 6
    for _ in range(20):
        clock.t += 1.0
        limit.observe(5.0, 0.5, admitted_at=clock.t, inflight_at_admission=0)
    assert limit.value == 2
    with pytest.raises(ValueError, match="backoff"):
        ConcurrencyLimit(max_limit=8, backoff=1.5)
    with pytest.raises(ValueError, match="min_limit"):
        ConcurrencyLimit(max_limit=1, min_limit=2)
