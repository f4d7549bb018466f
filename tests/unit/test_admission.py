"""Retry-After for a full queue: the queue ahead over the rate requests have been leaving it lately."""

from __future__ import annotations

from pdserve.engine.config import ServeConfig
from pdserve.router.admission import DrainRate


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_retry_after_is_the_queue_over_the_recent_drain_rate():
    clock = Clock()
    d = DrainRate(window_s=10.0, clock=clock)
    for _ in range(20):  # 20 departures within the last 10 s: 2 per second
        clock.t += 0.4
        d.departed()
    assert d.rate() == 2.0
    assert [d.retry_after(q) for q in (0, 1, 10, 11, 1000)] == [1, 1, 5, 6, 60]  # within [1, 60], rounded up


def test_departures_older_than_the_window_no_longer_count():
    clock = Clock()
    d = DrainRate(window_s=10.0, clock=clock)
    for _ in range(50):
        d.departed()
    clock.t += 10.0
    assert d.rate() == 0.0
    assert d.retry_after(7) == 7  # nothing left lately: a second per request ahead


def test_the_queue_is_bounded_by_default():
    assert ServeConfig().max_num_queued_requests == 256
