"""The one percentile and the one rate window every report (server, client, load test) is computed with."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, numpy's default; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def window_rate(times: Iterable[float], start: float, end: float) -> float:
    """Events per second of the `times` within [start, end); 0 for an empty window."""
    span = end - start
    if span <= 0:
        return 0.0
    return sum(1 for t in times if start <= t < end) / span


class RateWindow:
    """The events of the last `span` seconds (one exactly `span` old still counts) and their rate.

    Memory is bounded by the span: events are forgotten as they leave it. An event may carry a
    value (a latency, say); `values` gives those of the events still inside.
    """

    def __init__(self, span: float) -> None:
        self.span = span
        self._t: deque[float] = deque()
        self._v: deque[Any] = deque()

    def add(self, now: float, value: Any = None) -> None:
        self._t.append(now)
        self._v.append(value)
        self._trim(now)

    def count(self, now: float) -> int:
        self._trim(now)
        return len(self._t)

    def values(self, now: float) -> list[Any]:
        self._trim(now)
        return list(self._v)

    def rate(self, now: float, *, since: float | None = None) -> float:
        """Events per second over the span, or over `now - since` while that is shorter (a window
        opened at `since`, e.g. the start of a run, has not seen a whole span yet)."""
        span = self.span if since is None else min(self.span, max(now - since, 1e-9))
        return self.count(now) / span

    def tick_rate(self, now: float) -> float:
        """Events per second between the oldest event inside and now, not counting that one:
        (n - 1) / (now - oldest); 0 with fewer than two. Right from the second event on, where
        `rate` under-reports until a whole span has passed."""
        n = self.count(now)
        if n < 2:
            return 0.0
        span = now - self._t[0]
        return (n - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        cutoff = now - self.span
        while self._t and self._t[0] < cutoff:
            self._t.popleft()
            self._v.popleft()
