"""The one percentile and rate window: numpy's linear percentile, counts over a sliding span, window rates."""

from __future__ import annotations

import random

import numpy as np
import pytest

from visionstream.measure import RateWindow, percentile, window_rate

# --------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(q, n):
    rng = random.Random(n * 1000 + int(q * 10))
    data = [rng.expovariate(1 / 20) for _ in range(n)]
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12, abs=1e-12)


def test_percentile_small_cases():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3  # input order is irrelevant
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100):
        vals = rng.exponential(30, n).tolist()
        for q in (0, 50, 95, 99, 100):
            assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# --------------------------------------------------------------------------- rate window


def test_rate_window_counts_events_in_the_last_span() -> None:
    w = RateWindow(span=5.0)
    assert w.rate(0.0) == 0.0
    for t in range(5):  # one event per second at t = 0..4
        w.add(float(t))
    assert w.rate(4.0) == 1.0
    assert w.rate(5.0) == 1.0  # the event at t=0 is exactly `span` old: still inside
    assert w.rate(5.5) == 0.8
    assert w.rate(9.5) == 0.0
    w.add(10.0)
    assert w.rate(10.0) == 0.2


def test_rate_window_memory_is_bounded_by_the_span() -> None:
    w = RateWindow(span=1.0)
    for i in range(10_000):
        w.add(i * 0.01)  # 100 events per second for 100 s
    assert w.rate(99.99) == pytest.approx(101, abs=1)
    assert len(w._t) <= 102


def test_window_rate_counts_the_half_open_window() -> None:
    assert window_rate([0.0, 0.5, 1.0, 1.5, 2.0], 0.0, 2.0) == 2.0  # 2.0 is outside [0, 2)
    assert window_rate([1.0, 2.0], 1.0, 1.0) == 0.0  # an empty window has no rate


def test_rate_window_keeps_the_values_of_the_events_inside() -> None:
    w = RateWindow(span=2.0)
    for t, v in ((0.0, "a"), (1.0, "b"), (2.5, "c")):
        w.add(t, v)
    assert w.values(2.5) == ["b", "c"] and w.count(2.5) == 2


def test_rate_window_since_shortens_a_young_window() -> None:
    w = RateWindow(span=2.0)
    w.add(0.2)
    w.add(0.4)
    assert w.rate(0.5, since=0.0) == pytest.approx(4.0)  # two events in the first half second
    assert w.rate(0.5) == 1.0  # over the whole span
    assert w.rate(3.0, since=0.0) == 0.0


def test_tick_rate_is_the_rate_between_events() -> None:
    w = RateWindow(span=2.0)
    assert w.tick_rate(0.0) == 0.0
    w.add(0.0)
    assert w.tick_rate(0.5) == 0.0  # one event: no interval yet
    w.add(0.5)
    assert w.tick_rate(0.5) == pytest.approx(2.0)
