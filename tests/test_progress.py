"""The ETA of progress events: the rate of recent reports, so a pause does not skew it for good."""

from __future__ import annotations

import pytest

from snapgen_app.progress import EtaEstimator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_at_a_steady_rate_is_the_time_left_at_that_rate() -> None:
    clock = FakeClock()
    eta = EtaEstimator(100, window=4, clock=clock)
    assert eta.eta(0) is None  # nothing done yet: no rate
    for done in range(1, 11):
        clock.now += 2.0
        assert eta.eta(done) == pytest.approx(2.0 * (100 - done))
    assert eta.eta(10) == pytest.approx(180.0)  # a repeated report keeps the estimate


def test_eta_after_a_pause_returns_to_the_rate_of_the_last_reports() -> None:
    """A run paused for 1,000 s (a laptop asleep) at unit 20 of 400, at 1 s a unit before and after:
    a mean since the start would say about 36 s a unit for the rest of the run, about 10,000 s at
    unit 120; the window of 8 reports is back at 1 s a unit 8 reports after the pause."""
    clock = FakeClock()
    eta = EtaEstimator(400, window=8, clock=clock)
    for done in range(1, 21):
        clock.now += 1.0
        eta.eta(done)
    clock.now += 1000.0
    assert eta.eta(21) > 1000.0  # right after the pause the window still holds it
    for done in range(22, 30):
        clock.now += 1.0
        last = eta.eta(done)
    assert last == pytest.approx(400 - 29)
    assert eta.eta(400) == 0.0
    with pytest.raises(ValueError):
        EtaEstimator(10, window=0)
