"""Load-test maths: percentiles, Jain fairness index, knee detection, per-second buckets, rate specs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from visionstream.report import (
    fairness,
    find_knee,
    jain_index,
    latency_summary,
    parse_stream_fps,
    per_second,
    percentile,
)


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


def test_latency_summary_fields():
    s = latency_summary([10.0, 20.0, 30.0, 40.0])
    assert s == {"count": 4, "mean": 25.0, "p50": 25.0, "p95": pytest.approx(38.5),
                 "p99": pytest.approx(39.7), "max": 40.0}
    empty = latency_summary([])
    assert empty["count"] == 0 and empty["p99"] is None and empty["max"] is None


def test_jain_index_bounds():
    assert jain_index([5, 5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)  # one stream takes everything: 1/n
    assert jain_index([2, 1]) == pytest.approx(9 / 10)
    # Scale-free: the same shares in other units give the same index.
    assert jain_index([3, 6, 9]) == pytest.approx(jain_index([1, 2, 3]))
    assert jain_index([]) is None
    assert jain_index([0, 0]) is None
    with pytest.raises(ValueError):
        jain_index([1, -1])


def test_jain_index_of_near_equal_streams_passes_the_bench_target():
    assert jain_index([2.0, 2.0, 2.0, 1.9, 2.0, 2.0, 2.0]) > 0.99
    assert jain_index([2.0, 2.0, 2.0, 1.0, 2.0, 2.0, 2.0]) < 0.99


def test_fairness_groups_streams_by_demand():
    streams = [{"offered_fps": 60.0, "achieved_fps": 40.0}] + [
        {"offered_fps": 2.0, "achieved_fps": 2.0} for _ in range(7)
    ]
    f = fairness(streams)
    assert f["jain_by_offered_fps"]["2"] == {"streams": 7, "jain": pytest.approx(1.0)}
    assert f["jain_by_offered_fps"]["60"]["streams"] == 1
    assert f["jain_all"] < 0.3  # raw fps across unequal demands is not a fairness verdict on its own
    assert f["jain_normalized"] == pytest.approx(jain_index([40 / 60] + [1.0] * 7))


def test_knee_found_where_throughput_stops_growing():
    offered = [20, 40, 80, 160, 320]
    achieved = [20, 40, 78, 110, 111]
    assert find_knee(offered, achieved) == 3


def test_knee_none_while_still_growing_or_too_short():
    assert find_knee([10, 20, 40], [10, 20, 40]) is None
    assert find_knee([10], [10]) is None
    assert find_knee([], []) is None


def test_knee_with_throughput_collapse_after_saturation():
    assert find_knee([50, 100, 200, 400], [50, 98, 120, 90]) == 2


def test_knee_threshold_is_relative():
    # +4 % is below the default 5 % gain, +6 % is above it.
    assert find_knee([100, 200], [100, 104]) == 0
    assert find_knee([100, 200], [100, 106]) is None
    assert find_knee([100, 200], [100, 106], min_gain=0.1) == 0


def test_knee_when_nothing_gets_through():
    # A server answering nothing is saturated at zero from the first step, not "still growing".
    assert find_knee([10, 20, 40], [0.0, 0.0, 0.0]) == 0


def test_knee_ignores_steps_without_more_offered_load():
    assert find_knee([100, 100, 200], [100, 90, 180]) is None


def test_knee_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        find_knee([1, 2], [1])


def test_per_second_buckets():
    sent = [0.1, 0.5, 0.9, 1.2, 1.8, 2.5]
    answers = [
        (0.2, "result", 10.0),
        (0.6, "result", 20.0),
        (1.0, "dropped", None),  # exactly on a boundary: belongs to the second that starts there
        (1.3, "result", 30.0),
        (3.4, "result", 40.0),  # arrived in the grace period after a 3 s run
    ]
    rows = per_second(sent, answers, duration=3.0)
    assert [r["t"] for r in rows] == [0, 1, 2, 3]
    assert [r["sent"] for r in rows] == [3, 2, 1, 0]
    assert [r["results"] for r in rows] == [2, 1, 0, 1]
    assert [r["dropped"] for r in rows] == [0, 1, 0, 0]
    assert rows[0]["p50"] == 15.0 and rows[0]["max"] == 20.0
    assert rows[2]["p50"] is None and rows[2]["fps"] == 0
    assert rows[3]["p99"] == 40.0


def test_per_second_covers_the_whole_run_even_when_idle():
    rows = per_second([], [], duration=2.5)
    assert len(rows) == 3 and all(r["sent"] == 0 and r["results"] == 0 for r in rows)


def test_parse_stream_fps():
    assert parse_stream_fps("60,2x7") == [60.0] + [2.0] * 7
    assert parse_stream_fps(" 5, 2.5X2 ,") == [5.0, 2.5, 2.5]
    for bad in ("", "0", "-3", "2x0", "fast", "2x", "nan"):
        with pytest.raises(ValueError):
            parse_stream_fps(bad)
