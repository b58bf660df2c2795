"""Admission control's prediction (Little's law on queued prompt tokens over the measured drain rate) and
the price list, on a controlled clock."""

import pytest

from control_plane.admission import AdmissionController, Overloaded
from control_plane.cost import PriceList, default_price_per_hour
from control_plane.slo import DEFAULT_SLO_TABLE

INTERACTIVE, STANDARD, BATCH = (DEFAULT_SLO_TABLE.by_name[n] for n in ("interactive", "standard", "batch"))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_cold_server_admits_everything_and_measures_the_drain_rate():
    clock = Clock()
    ac = AdmissionController(window_s=10, min_busy_s=1, clock=clock)
    tickets = [ac.admit(STANDARD, 1000) for _ in range(50)]  # no measurement yet: nothing is refused
    assert ac.rate() is None
    for i, t in enumerate(tickets[:20]):  # 20 000 prompt tokens drained in 2 s: 10 000 tokens/s
        clock.t = 100.0 + 0.1 * (i + 1)
        ac.first_token(t)
    assert ac.rate() == pytest.approx(10_000)
    # 30 000 tokens queued: a standard request (target 2 s) would wait ~3 s, an interactive one jumps them
    with pytest.raises(Overloaded) as e:
        ac.admit(STANDARD, 100)
    assert e.value.retry_after_s == 2 and e.value.predicted_s == pytest.approx(30_100 / 10_000)
    assert ac.admit(INTERACTIVE, 100) is not None  # nothing of its class or above waits: the probe
    # batch's own target (60 s) would hold, but it is shed while standard's queue is past half its target
    with pytest.raises(Overloaded, match="shed while 'standard'"):
        ac.admit(BATCH, 100)
    assert ac.rejected == {"standard": 1, "batch": 1}


def test_queue_ahead_counts_only_equal_or_higher_classes():
    clock = Clock()
    ac = AdmissionController(window_s=5, min_busy_s=1, clock=clock)
    first = ac.admit(STANDARD, 500)
    clock.t += 1.0
    ac.first_token(first)  # 500 tokens/s, measured over a 1 s busy period
    assert ac.rate() == pytest.approx(500)
    for _ in range(4):
        ac.admit(BATCH, 500)  # 2000 batch tokens queued: 4 s for anyone behind them
    assert ac.predict_ttft_s(BATCH, 100) == pytest.approx(4.2)
    assert ac.predict_ttft_s(INTERACTIVE, 100) == pytest.approx(0.2)
    ac.admit(INTERACTIVE, 100)
    with pytest.raises(Overloaded):  # interactive's own queue (target 0.5 s) is what limits it
        for _ in range(3):
            ac.admit(INTERACTIVE, 100)


def test_one_slow_request_does_not_wedge_admission():
    """A request that waited through a worker restart (11 s for 100 tokens) makes the measured rate tiny;
    refused requests measure nothing, so the estimate must expire by itself."""
    clock = Clock()
    ac = AdmissionController(window_s=10, min_busy_s=0.2, clock=clock)
    slow = ac.admit(STANDARD, 100)
    clock.t += 11.0
    ac.first_token(slow)
    assert ac.rate() == pytest.approx(100 / 11)
    waiting = ac.admit(INTERACTIVE, 100)  # the probe: nothing ahead of it
    with pytest.raises(Overloaded):
        ac.admit(INTERACTIVE, 100)  # 200 tokens at 9 tokens/s: 22 s against 0.5 s
    clock.t += 0.05
    ac.first_token(waiting)
    clock.t += 10.0  # the slow sample leaves the window: stale, so admitted and measured afresh
    assert ac.rate() is None
    tickets = [ac.admit(INTERACTIVE, 100) for _ in range(3)]
    for t in tickets:
        clock.t += 0.1
        ac.first_token(t)
    assert ac.rate() == pytest.approx(1000)


def test_the_measured_capacity_floors_the_estimate():
    clock = Clock()
    ac = AdmissionController(
        window_s=10, min_busy_s=0.2, capacity_busy_s=2.0, capacity_floor=0.25, clock=clock
    )
    tickets = [ac.admit(BATCH, 1000) for _ in range(30)]
    for t in tickets:  # 1000 tokens every 0.1 s for 3 s: a capacity of 10 000 tokens/s
        clock.t += 0.1
        ac.first_token(t)
    assert ac.rate() == pytest.approx(10_000)
    clock.t += 20.0
    stalled = ac.admit(STANDARD, 100)
    clock.t += 30.0  # a stall: 30 s busy, nothing drained
    assert ac.rate() == pytest.approx(0.25 * 10_000 * 0.5 ** (50 / 300))
    ac.first_token(stalled)
    ac.admit(INTERACTIVE, 100)
    assert ac.admit(INTERACTIVE, 100) is not None  # at the floor, 200 tokens wait well under 0.5 s


def test_shedding_goes_batch_then_standard_then_interactive():
    clock = Clock()
    ac = AdmissionController(window_s=10, min_busy_s=0.2, shed_at=0.5, clock=clock)
    first = ac.admit(STANDARD, 1000)
    clock.t += 1.0
    ac.first_token(first)  # 1000 tokens/s
    ac.admit(INTERACTIVE, 100)
    ac.admit(INTERACTIVE, 200)  # 0.3 s of interactive work queued: more than half its 0.5 s target
    with pytest.raises(Overloaded, match="shed while 'interactive'"):
        ac.admit(BATCH, 10)
    with pytest.raises(Overloaded, match="shed while 'interactive'"):
        ac.admit(STANDARD, 10)
    assert ac.admit(INTERACTIVE, 100) is not None  # 0.4 s: its own target still holds
    assert ac.rejected == {"batch": 1, "standard": 1}


def test_slow_first_tokens_of_a_higher_class_shed_the_lower_ones():
    """On a machine where prefill competes with decode the prompt queue looks short while every first token
    is late: what interactive requests took is the signal."""
    clock = Clock()
    ac = AdmissionController(window_s=10, min_busy_s=0.2, shed_at=0.5, observe_s=5, clock=clock)
    for _ in range(3):
        t = ac.admit(INTERACTIVE, 50)  # nothing ahead each time: the queue never builds
        clock.t += 0.4  # but each first token takes 0.4 s: past half the 0.5 s target
        ac.first_token(t)
    assert ac.observed_ttft_s(INTERACTIVE) == pytest.approx(0.4)
    for cls in (STANDARD, BATCH):
        with pytest.raises(Overloaded, match="shed while 'interactive'"):
            ac.admit(cls, 10)
    fast = ac.admit(INTERACTIVE, 50)
    clock.t += 0.05
    ac.first_token(fast)
    clock.t += 6.0  # the slow observations age out: lower classes come back
    assert ac.observed_ttft_s(INTERACTIVE) is None or ac.observed_ttft_s(INTERACTIVE) < 0.25
    assert ac.admit(BATCH, 10) is not None


def test_the_most_overdue_waiting_request_is_known_before_its_first_token():
    clock = Clock()
    ac = AdmissionController(clock=clock)
    batch, interactive = ac.admit(BATCH, 10), ac.admit(INTERACTIVE, 10)
    clock.t += 0.4
    assert ac.most_overdue() is None
    clock.t += 0.2  # interactive is 0.6 s into a 0.5 s target; batch far from its 60 s
    assert ac.most_overdue() is interactive
    ac.first_token(interactive)
    assert ac.most_overdue() is None and batch in ac._pending.values()


def test_inflight_cap_reserves_room_for_higher_classes():
    limits = {c.name: DEFAULT_SLO_TABLE.inflight_limit(c, 256) for c in (INTERACTIVE, STANDARD, BATCH)}
    assert limits == {"interactive": 256, "standard": 192, "batch": 128}
    assert DEFAULT_SLO_TABLE.inflight_limit(BATCH, 1) == 1


def test_tickets_leave_the_queue_once_and_bad_arguments_are_named():
    clock = Clock()
    ac = AdmissionController(clock=clock)
    t = ac.admit(STANDARD, 10)
    ac.cancel(t)
    ac.cancel(t)
    ac.first_token(t)
    assert ac.num_pending == 0 and ac.rate() is None  # a cancelled request drained nothing
    with pytest.raises(ValueError, match="prompt_tokens"):
        ac.admit(STANDARD, 0)
    with pytest.raises(ValueError, match="min_busy_s"):
        AdmissionController(window_s=1, min_busy_s=2)


def test_price_list_charges_engine_seconds_at_the_pool_price():
    class Usage:
        prefill_seconds, decode_seconds, prefill_tokens, decode_tokens = 1.5, 0.5, 300, 40

    prices = PriceList({"prefill": 3.6, "decode": 0.0})
    charge = prices.charge("prefill", Usage())
    assert charge.usd == pytest.approx(2.0 * 3.6 / 3600) and charge.seconds == 2.0
    assert (charge.prefill_tokens, charge.decode_tokens) == (300, 40)
    assert prices.charge("decode", Usage()).usd == 0.0
    with pytest.raises(ValueError, match="pool: 'draft'"):
        prices.charge("draft", Usage())
    with pytest.raises(ValueError, match="price_per_hour"):
        PriceList({"decode": -1})
    assert default_price_per_hour(num_gpus=1, num_cpus=2) > default_price_per_hour(num_gpus=0, num_cpus=2) > 0
