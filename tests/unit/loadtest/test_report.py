"""Load-test maths: latency summaries, Jain fairness index, knee detection, per-second buckets, rate specs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visionstream.loadtest.loadgen import FrameRecord
from visionstream.loadtest.report import (
    fair_share_fractions,
    fairness,
    find_knee,
    jain_index,
    latency_summary,
    max_min_shares,
    p99_bound_ms,
    parse_stream_fps,
    per_second,
    stream_service,
)


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


# --------------------------------------------------------------------------- max-min fair share


def test_max_min_shares_water_fill():
    # 10 to share among demands 1, 2, 8, 8: the small two are filled, the rest split 7 equally.
    assert max_min_shares([8, 1, 8, 2], 10) == pytest.approx([3.5, 1, 3.5, 2])
    assert max_min_shares([1, 2, 3], 100) == pytest.approx([1, 2, 3])  # enough for everyone
    assert max_min_shares([5, 5, 5, 5], 8) == pytest.approx([2, 2, 2, 2])
    assert max_min_shares([math.inf, 1, math.inf], 7) == pytest.approx([3, 1, 3])  # backlogged streams
    assert max_min_shares([0, 4], 3) == pytest.approx([0, 3])
    assert max_min_shares([], 5) == []
    assert max_min_shares([3, 3], 0) == [0, 0]


def test_max_min_shares_rejects_bad_input():
    for demands, capacity in (([1, -1], 1), ([math.nan], 1), ([1], -1), ([1], math.inf), ([1], math.nan)):
        with pytest.raises(ValueError):
            max_min_shares(demands, capacity)


demand_lists = st.lists(st.one_of(st.floats(0, 1e4), st.just(math.inf)), max_size=70)
capacities = st.floats(0, 1e5)


@given(demand_lists, capacities)
def test_max_min_shares_properties(demands, capacity):
    shares = max_min_shares(demands, capacity)
    assert len(shares) == len(demands)
    tol = 1e-9 * max(1.0, capacity)
    # Nothing wasted and nothing invented: the shares add up to what there is or what is asked.
    assert sum(shares) == pytest.approx(min(capacity, sum(demands)), rel=1e-9, abs=tol)
    for d, s in zip(demands, shares):
        assert 0 <= s <= d + tol  # no share exceeds its demand
        if demands and d <= capacity / len(demands):
            assert s == pytest.approx(d, rel=1e-9, abs=tol)  # below the equal share: fully served
    # Max-min: a stream that did not get its demand has a share no smaller than anyone's.
    top = max(shares, default=0.0)
    for d, s in zip(demands, shares):
        if s < d - tol:
            assert s == pytest.approx(top, rel=1e-9, abs=tol)


@given(demand_lists, capacities, st.randoms(use_true_random=False))
def test_max_min_shares_ignore_stream_order(demands, capacity, rnd):
    order = list(range(len(demands)))
    rnd.shuffle(order)
    shares = max_min_shares(demands, capacity)
    shuffled = max_min_shares([demands[i] for i in order], capacity)
    assert shuffled == pytest.approx([shares[i] for i in order], rel=1e-9, abs=1e-9 * max(1.0, capacity))


def test_fair_share_fractions_equal_costs_is_the_frame_rate_water_fill():
    # 8 equal streams at 60 fps offered, 280 served in all, one of them starved to 20.
    served = [260 / 7] * 7 + [20.0]
    out = fair_share_fractions([60.0] * 8, served, [7.0] * 8)
    assert [o["share_fps"] for o in out] == pytest.approx([35.0] * 8)
    assert out[-1]["fraction"] == pytest.approx(20 / 35)
    assert out[0]["fraction"] == pytest.approx((260 / 7) / 35)
    # Streams asking less than the equal share are owed exactly what they asked.
    out = fair_share_fractions([5, 20, 150, 150], [5, 20, 100, 75], [7, 7, 7, 7])
    assert [o["share_fps"] for o in out] == pytest.approx([5, 20, 87.5, 87.5])
    assert [o["fraction"] for o in out] == pytest.approx([1, 1, 100 / 87.5, 75 / 87.5])


def test_fair_share_fractions_weigh_worker_time_not_frames():
    # A 2 fps stream of 1-second decodes beside four cameras at 50 fps of 7 ms frames, on a server
    # that did 2000 ms of work per second: the cameras (350 ms/s each) are owed all they send, the
    # heavy stream the 600 ms/s left, 0.6 fps. Serving it 0.6 fps is fair; 0.1 is not.
    demand, cost = [2.0] + [50.0] * 4, [1000.0] + [7.0] * 4
    fair = fair_share_fractions(demand, [0.6] + [50.0] * 4, cost)
    assert fair[0]["share_fps"] == pytest.approx(0.6)
    assert [f["fraction"] for f in fair] == pytest.approx([1.0] * 5)
    # Served 0.1 fps while the server did only 1500 ms/s: an equal 300 ms/s each was there to give.
    starved = fair_share_fractions(demand, [0.1, 50.0, 50.0, 50.0, 50.0], cost)
    assert starved[0]["fraction"] == pytest.approx(100 / 300)
    assert starved[1]["fraction"] == pytest.approx(350 / 300)
    # The cameras are the ones hurt when the heavy stream takes their time.
    # 2180 ms/s of work: each camera was owed its 350, the heavy stream the remaining 780.
    hog = fair_share_fractions(demand, [1.2, 35.0, 35.0, 35.0, 35.0], cost)
    assert hog[1]["fraction"] == pytest.approx(245 / 350)
    assert hog[0]["fraction"] == pytest.approx(1200 / 780)


def test_fair_share_fractions_edge_cases():
    out = fair_share_fractions([0.0, 10.0], [0.0, 10.0], [5.0, 5.0])
    assert out[0]["fraction"] is None and out[1]["fraction"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fair_share_fractions([1.0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        fair_share_fractions([1.0], [1.0], [0.0])


# --------------------------------------------------------------------------- p99 bound


def test_p99_bound_is_the_shorter_of_period_and_turn_plus_three_inferences():
    # 8 streams at 70 fps (200 % of 280): period 14.3 ms, one turn 8/280 s = 28.6 ms.
    assert p99_bound_ms(70, 8, 280, 6.0) == pytest.approx(1000 / 70 + 18)
    # A 5 fps stream among 8: its period (200 ms) is longer than one turn (28.6 ms).
    assert p99_bound_ms(5, 8, 280, 6.0) == pytest.approx(1000 * 8 / 280 + 18)
    assert p99_bound_ms(5, 8, 280, 6.0, inferences=1) == pytest.approx(1000 * 8 / 280 + 6)
    # Nothing answered: no turn, only the period.
    assert p99_bound_ms(10, 4, 0.0, 5.0) == pytest.approx(115)
    for bad in ((0, 8, 280, 6), (10, 0, 280, 6), (10, 8, 280, -1)):
        with pytest.raises(ValueError):
            p99_bound_ms(*bad)


def test_stream_service_counts_frames_sent_in_the_window_however_late_answered():
    recs = [
        FrameRecord(0, 0.2, 0.21, "result", 10.0, decode_ms=1.0, infer_ms=6.0),  # before the window
        FrameRecord(1, 1.0, 1.01, "result", 10.0, decode_ms=1.0, infer_ms=5.0),
        FrameRecord(2, 1.5, 1.6, "dropped", reason="superseded"),
        FrameRecord(3, 2.9, 3.4, "result", 500.0, decode_ms=2.0, infer_ms=7.0),  # answered in the grace
        FrameRecord(4, 2.95),  # unanswered
    ]
    s = stream_service(recs, 0.5, 3.0)
    assert s["served"] == 2 and s["served_fps"] == pytest.approx(2 / 2.5)
    assert s["worker_ms_served"] == pytest.approx(15.0)  # frames 1 and 3, not 0
    assert s["worker_ms_median"] == pytest.approx(7.5)
    assert s["first_sent_s"] == 0.2
    early = stream_service(recs[:1], 0.5, 3.0)  # no result in the window: the median of the others
    assert early["served_fps"] == 0 and early["worker_ms_served"] == 0 and early["worker_ms_median"] == 7.0
    assert stream_service([], 0.5, 3.0) == {"served": 0, "served_fps": 0.0, "worker_ms_served": 0,
                                            "worker_ms_median": None, "first_sent_s": None}


def test_a_cameras_last_frame_is_left_out_of_latency_but_counted() -> None:
    """Nothing can supersede a camera's last frame: it waits out the end-of-run drain, which is no
    steady state. A lossless stream's last frame is an ordinary one."""
    from visionstream.loadtest.loadgen import FramePayload, RunResult, StreamRun, StreamSpec
    from visionstream.loadtest.report import summarize

    pl = FramePayload("x", b"", "jpeg", (1, 1, 3))

    def run(lossless: bool) -> StreamRun:
        sr = StreamRun(StreamSpec("cam", 10.0, pl, lossless=lossless))
        sr.lossless = lossless
        for fid, lat in enumerate([10.0, 12.0, 11.0, 900.0]):
            sr.records[fid] = FrameRecord(fid, 0.1 * fid, answered_at=0.1 * fid + lat / 1000, outcome="result",
                                          latency_ms=lat)
        return sr

    for lossless, count, worst in ((False, 3, 12.0), (True, 4, 900.0)):
        s = summarize(RunResult([run(lossless)], 1.0, 1.0, 0.0, 0.0))
        assert s["results"] == 4
        assert s["latency_ms"]["count"] == count and s["latency_ms"]["max"] == worst
