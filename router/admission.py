"""How long a client refused for a full queue should wait: the queue ahead of it over the rate at which
requests have been leaving the queue (reaching their first token, or failing) lately.

Pure bookkeeping (no Ray, no HTTP): the router records each departure and asks for a Retry-After when
it refuses a request at `serve.max_num_queued_requests`."""

from __future__ import annotations

import math
import time
from collections import deque

MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S = 1, 60


class DrainRate:
    """Departures from the router's queue over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._times: deque[float] = deque()

    def departed(self) -> None:
        now = self.clock()
        self._times.append(now)
        self._trim(now)

    def rate(self) -> float:
        """Departures per second over the window (0 when none were seen)."""
        self._trim(self.clock())
        return len(self._times) / self.window_s

    def retry_after(self, queued: int) -> int:
        """Whole seconds until `queued` requests ahead have drained at the recent rate, within [1, 60]. With
        no departure seen lately (a cold start, or a stuck server) it assumes one second per request ahead."""
        rate = self.rate()
        wait = queued / rate if rate > 0 else float(queued)
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(wait)))

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
