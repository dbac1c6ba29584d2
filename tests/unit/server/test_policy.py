"""The scheduling policy on a simulated clock: random arrival traces against lanes, no threads.

Each simulation (bench/simulate.py) drives the real `Scheduler` with a discrete-event loop:
frames arrive on a trace (staggered, lockstep, random phases or Poisson gaps; equal or mixed rates;
cheap and costly streams; lossless uploads), lanes take them and finish after the stream's cost.
The properties are the policy's promises: every frame answered exactly once; no lane idle while a
frame it may serve waits; every stream within its max-min fair share of worker time; bounded queues.

Fair shares count the frames a stream really sent. With Poisson gaps a camera also replaces some of
its own frames (two arrive within one wait), and those count in its demand though newest-wins means
no lane should serve them: there the bound is 0.8, everywhere else 0.9 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.simulate import Source, cameras, max_min, simulate
from visionstream.server.policy import RULES, FairShare, stale
from visionstream.server.scheduler import STALE, SUPERSEDED, Job, Scheduler

# --------------------------------------------------------------------------- the rule itself


def test_the_rule_is_three_sentences() -> None:
    assert RULES.count(". ") == 2 and RULES.endswith(".")


def test_lane_share_is_the_rounded_up_equal_split() -> None:
    assert [FairShare(2).lane_share(n) for n in (0, 1, 2, 3, 64)] == [2, 2, 1, 1, 1]
    assert [FairShare(8).lane_share(n) for n in (1, 3, 8, 9)] == [8, 3, 1, 1]


def test_stale_only_with_an_explicit_limit_and_never_lossless() -> None:
    assert not stale(False, 10.0, 0.0)
    assert stale(False, 0.2, 0.1) and not stale(False, 0.1, 0.1) and not stale(True, 9.0, 0.1)


def test_max_min_water_filling() -> None:
    assert max_min([1, 1, 1], 6) == [1, 1, 1]
    assert max_min([0.1, 5, 5], 2.1) == pytest.approx([0.1, 1.0, 1.0])
    assert max_min([0.5, 0.2, 3, 1], 2) == pytest.approx([0.5, 0.2, 0.65, 0.65])


# --------------------------------------------------------------------------- load shapes


@pytest.mark.parametrize("shape", ["stagger", "lockstep", "random", "poisson"])
@pytest.mark.parametrize(("n", "load"), [(8, 2.0), (32, 2.0), (64, 2.0), (32, 0.5), (8, 1.0)])
def test_equal_cameras_every_shape_full_throughput_and_fair(shape: str, n: int, load: float) -> None:
    """2 lanes of 7 ms (286 frames/s): n cameras offering `load` times that. Lockstep used to collapse
    to an eighth of the throughput (the stale drops of an age limit); now no lane ever waits."""
    lanes, cost = 2, 0.007
    rate = load * lanes / cost / n
    out = simulate(cameras(n, rate, cost, shape, random.Random(n)), lanes, horizon=3.0, seed=n)
    assert out.idle_lane_with_work == 0
    if load > 1 or shape != "poisson":  # Poisson gaps below capacity leave lanes idle at times, rightly
        assert sum(out.busy) / out.horizon >= 0.97 * min(load, 1.0) * lanes
    assert min(out.fraction(i) for i in range(n)) >= (0.8 if shape == "poisson" else 0.9)
    # Only newer frames replace waiting ones: no frame is lost to anything else.
    assert {r for c in out.drops for r in c} <= {SUPERSEDED}
    if shape != "poisson":  # a periodic camera's waiting frame is replaced within one period
        fair_turn = n * cost / lanes
        worst = max(max(w) for w in out.waits if w)
        assert worst <= min(1 / rate, fair_turn) + 2 * cost


@pytest.mark.parametrize("shape", ["random", "poisson", "lockstep"])
@pytest.mark.parametrize("load", [1.0, 2.0])
def test_mixed_rates_get_their_max_min_share(shape: str, load: float) -> None:
    """Rates 5, 20, 60 and 150 (scaled to `load` x capacity), twice over: the slow cameras get every
    frame, the fast ones split what is left equally."""
    lanes, cost = 2, 0.007
    base = [5, 20, 60, 150] * 2
    scale = load * lanes / cost / sum(base)
    rng = random.Random(3)
    sources = [Source(r * scale, cost, rng.random(), poisson=shape == "poisson") for r in base]
    out = simulate(sources, lanes, horizon=4.0, seed=5)
    assert out.idle_lane_with_work == 0
    assert {r for c in out.drops for r in c} <= {SUPERSEDED}
    if shape != "poisson":
        assert min(out.fraction(i) for i in range(len(sources))) >= 0.9
    elif load > 1:  # at exactly capacity, Poisson bursts replace 25 % of the fastest cameras' frames
        assert min(out.fraction(i) for i in range(len(sources))) >= 0.8


def test_a_decode_heavy_stream_beside_cameras_holds_one_lane_at_most() -> None:
    """One stream of 1.07 s frames (an 8192x8192 PNG) at 2 fps beside four 30 fps cameras of 7 ms:
    the heavy stream keeps one lane busy, the cameras keep every frame on the other."""
    cams = [Source(30, 0.007, k / 4) for k in range(4)]
    out = simulate([Source(2, 1.07), *cams], lanes=2, horizon=10.0)
    assert out.idle_lane_with_work == 0
    for i in range(1, 5):
        assert out.served[i] >= 0.99 * out.offered[i]
        assert max(out.waits[i]) <= 0.007 * 4 + 1e-9  # never behind the heavy frame
    assert out.busy[0] / out.horizon >= 0.95  # and the heavy stream uses its lane fully


def test_costly_frames_count_as_worker_time_not_frames() -> None:
    """Two always-backlogged streams on one lane, one with frames 10x dearer: equal worker time."""
    out = simulate([Source(1000, 0.001), Source(1000, 0.010)], lanes=1, horizon=5.0)
    assert out.busy[0] == pytest.approx(out.busy[1], rel=0.02)
    assert out.served[0] == pytest.approx(10 * out.served[1], rel=0.05)


def test_a_lossless_upload_among_cameras_gets_its_share_and_loses_nothing() -> None:
    lanes, cost = 2, 0.007
    cams = [Source(2 * lanes / cost / 7, cost, k / 7) for k in range(7)]
    out = simulate([Source(1, cost, lossless=True), *cams], lanes, horizon=3.0)
    assert out.idle_lane_with_work == 0
    assert sum(out.drops[0].values()) == 0
    assert min(out.fraction(i) for i in range(8)) >= 0.9


def test_a_single_camera_may_use_every_lane() -> None:
    out = simulate([Source(1000, 0.007)], lanes=2, horizon=2.0)
    assert sum(out.busy) / out.horizon >= 1.97


def test_a_stream_that_was_idle_banks_no_credit() -> None:
    """b sends nothing for 2 s while a is served, then both are backlogged: b must not get the lane
    for 2 s to catch up; they alternate."""
    h = Scheduler(on_drop=lambda job, reason: None, lanes=1, clock=lambda: 0.0)
    a, b = h.add_stream(1, "a"), h.add_stream(2, "b")
    for k in range(200):
        h.offer(Job(a, k, 0.0))
        h.done(h.take(), 0.01)  # type: ignore[arg-type]
    order = []
    for k in range(6):
        h.offer(Job(a, 1000 + k, 0.0))
        h.offer(Job(b, 2000 + k, 0.0))
        for _ in range(2):
            job = h.take()
            assert job is not None
            order.append(job.stream.name)
            h.done(job, 0.01)
    assert order.count("b") == 6 and order.count("a") == 6
    assert all(order[i] != order[i + 1] or i % 2 for i in range(len(order) - 1))


def test_explicit_age_limit_bounds_every_served_wait() -> None:
    """With --max-age-ms a lane drops what is older: the trade a user may choose, never the default."""
    lanes, cost = 2, 0.007
    out = simulate(cameras(32, 30, cost, "lockstep", random.Random(1)), lanes, max_age_ms=20)
    assert max(max(w) for w in out.waits if w) <= 0.020
    assert sum(c[STALE] for c in out.drops) > 0


# --------------------------------------------------------------------------- properties


source = st.builds(
    Source,
    rate=st.floats(2.0, 400.0),
    cost=st.floats(0.002, 0.012),
    phase=st.floats(0.0, 0.999),
    poisson=st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(sources=st.lists(source, min_size=1, max_size=10), lanes=st.integers(1, 4), seed=st.integers(0, 99),
       lossless=st.integers(0, 2), jitter=st.sampled_from([0.0, 0.3]))
def test_property_answered_once_work_conserving_bounded(sources: list[Source], lanes: int, seed: int,
                                                        lossless: int, jitter: float) -> None:
    """Any trace: every frame answered exactly once (simulate checks), no idle lane while a frame it may
    serve waits, queues bounded by their depths."""
    sources = sources + [Source(1, 0.005, lossless=True)] * lossless
    out = simulate(sources, lanes, horizon=1.0, seed=seed, jitter=jitter)
    assert out.idle_lane_with_work == 0
    assert out.max_waiting <= len(sources) * 4


periodic = st.builds(Source, rate=st.floats(2.0, 300.0), cost=st.floats(0.004, 0.012), phase=st.floats(0.0, 0.999))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(sources=st.lists(periodic, min_size=2, max_size=12), lanes=st.integers(1, 3), seed=st.integers(0, 99))
def test_property_every_stream_gets_its_max_min_share(sources: list[Source], lanes: int, seed: int) -> None:
    """Periodic cameras at any rates and phases whose frames cost at most 3x one another and less than
    the fastest camera's period: each gets at least 0.9 of its max-min fair share of worker time, less
    two of its frames for the finite run."""
    fastest = max(s.rate for s in sources)
    sources = [s for s in sources if s.cost < 1 / fastest] or sources[:1]
    horizon = 4.0
    out = simulate(sources, lanes, horizon=horizon, seed=seed)
    share = out.share()
    for i, s in enumerate(sources):
        assert out.busy[i] / horizon >= 0.9 * share[i] - 2 * s.cost / horizon, (i, out.fraction(i))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(n=st.integers(2, 40), lanes=st.integers(1, 3), load=st.floats(0.3, 3.0), seed=st.integers(0, 99),
       shape=st.sampled_from(["stagger", "lockstep", "random", "poisson"]))
def test_property_equal_cameras_never_starve(n: int, lanes: int, load: float, seed: int, shape: str) -> None:
    """Equal cameras, any shape and load, over 60 fair turns: periodic ones each get 0.9 of their fair
    share and none waits more than a fair turn beyond one frame. A Poisson camera's count over 60
    turns varies by about 1/sqrt(60) = 0.13 of its share on its own, so for them this only says
    nobody starves (0.5); the fixed traces above hold them to 0.8."""
    cost = 0.007
    rate = load * lanes / cost / n
    fair_turn = n * cost / lanes
    out = simulate(cameras(n, rate, cost, shape, random.Random(seed)), lanes, horizon=max(3.0, 60 * fair_turn),
                   seed=seed)
    assert out.idle_lane_with_work == 0
    worst = min(out.fraction(i) + 2 * cost / out.horizon / out.share()[i] for i in range(n))  # two frames slack
    if shape != "poisson":
        assert worst >= 0.9
        assert max(max(w, default=0.0) for w in out.waits) <= min(1 / rate, fair_turn) + 2 * cost + 1e-9
    elif load >= 1.5:
        assert worst >= 0.5
