"""The scheduler's mechanics in isolation: supersede/stale/full drops, lane shares, backpressure, threads, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visionstream.server.scheduler import (
    DISCONNECTED,
    QUEUE_FULL,
    SHUTDOWN,
    STALE,
    SUPERSEDED,
    Job,
    Scheduler,
    StreamQueue,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """A scheduler whose drops are recorded, with jobs that carry a unique id as their frame."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = kwargs.pop("clock", None) or FakeClock()
        self.service = 0.010  # worker seconds each frame taken by `take` costs
        self.drops: list[tuple[Any, str]] = []
        self.sched = Scheduler(on_drop=lambda job, reason: self.drops.append((job.frame, reason)),
                               clock=self.clock, **kwargs)
        self._ids = itertools.count()

    def job(self, sq: StreamQueue, received: float | None = None) -> Job:
        return Job(sq, f"{sq.name}#{next(self._ids)}", self.clock() if received is None else received)

    def offer(self, sq: StreamQueue, received: float | None = None) -> Job:
        job = self.job(sq, received)
        self.sched.offer(job)
        return job

    def measured(self, seconds: float) -> None:
        """As if lanes had taken `seconds` per frame for a while (the service-time estimate)."""
        self.service = self.sched.service_time = seconds

    def take(self) -> Job | None:
        """One lane takes the next job and finishes it at once, after `service` worker seconds."""
        job = self.sched.take()
        if job is not None:
            self.sched.done(job, self.service)
        return job

    def take_all(self) -> list[Any]:
        out = []
        while (job := self.take()) is not None:
            out.append(job.frame)
        return out


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=5))


async def settle(n: int = 5) -> None:
    """Let other tasks run until they block."""
    for _ in range(n):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- superseded


def test_newer_frame_supersedes_the_waiting_one_at_depth_1() -> None:
    h = Harness(queue_depth=1)
    sq = h.sched.add_stream(1, "cam")
    old = h.offer(sq)
    new = h.job(sq)
    assert h.sched.offer(new) is True
    assert h.drops == [(old.frame, SUPERSEDED)]
    assert len(h.sched) == 1
    assert h.take() is new
    # Regression: superseding used to put the stream into the ring twice, so this take raised IndexError.
    assert h.take() is None
    assert len(h.sched) == 0


def test_supersede_many_times_then_drain() -> None:
    h = Harness(queue_depth=1)
    sq = h.sched.add_stream(1, "cam")
    jobs = [h.offer(sq) for _ in range(10)]
    assert [f for f, _ in h.drops] == [j.frame for j in jobs[:-1]]
    assert {r for _, r in h.drops} == {SUPERSEDED}
    assert h.take_all() == [jobs[-1].frame]


def test_deeper_queue_drops_the_oldest_and_keeps_order() -> None:
    h = Harness(queue_depth=3)
    sq = h.sched.add_stream(1, "cam")
    jobs = [h.offer(sq) for _ in range(5)]
    assert h.drops == [(jobs[0].frame, SUPERSEDED), (jobs[1].frame, SUPERSEDED)]
    assert h.take_all() == [j.frame for j in jobs[2:]]


def test_superseding_keeps_the_streams_turn() -> None:
    h = Harness(queue_depth=1)
    a = h.sched.add_stream(1, "a")
    b = h.sched.add_stream(2, "b")
    h.offer(a)
    b1 = h.offer(b)
    a2 = h.offer(a)  # replaces a's frame without moving a behind b
    assert h.take_all() == [a2.frame, b1.frame]


# --------------------------------------------------------------------------- fairness


@pytest.mark.parametrize("greedy_lossless", [False, True])
def test_seven_small_streams_are_served_within_the_first_eight_takes(greedy_lossless: bool) -> None:
    h = Harness(queue_depth=100, lossless_depth=100, max_queue=1000)
    greedy = h.sched.add_stream(0, "greedy", lossless=greedy_lossless)
    small = [h.sched.add_stream(i, f"s{i}") for i in range(1, 8)]
    for _ in range(100):
        h.offer(greedy)
    for sq in small:
        h.offer(sq)
    assert not h.drops
    first8 = [h.take() for _ in range(8)]
    served = Counter(job.stream.name for job in first8 if job is not None)
    assert all(served[sq.name] == 1 for sq in small), served
    assert served["greedy"] == 1
    # The rest of the greedy backlog follows, in order.
    rest = h.take_all()
    assert len(rest) == 99
    assert all(f.startswith("greedy#") for f in rest)


@pytest.mark.parametrize("takes_per_cycle", [1, 3, 8])
def test_a_greedy_stream_cannot_starve_the_others(takes_per_cycle: int) -> None:
    """Overload: one stream offers 20 frames per cycle, seven offer one; workers take a few per cycle."""
    h = Harness(queue_depth=4, max_queue=64)
    greedy = h.sched.add_stream(0, "greedy")
    polite = [h.sched.add_stream(i, f"p{i}") for i in range(1, 8)]
    served: Counter[str] = Counter()
    cycles = 400
    for _ in range(cycles):
        for _ in range(20):
            h.offer(greedy)
        for sq in polite:
            h.offer(sq)
        for _ in range(takes_per_cycle):
            job = h.take()
            if job is not None:
                served[job.stream.name] += 1
    total = sum(served.values())
    assert total == cycles * takes_per_cycle  # always work available, so every take served a frame
    fair = total / 8
    for name in ["greedy", *(sq.name for sq in polite)]:
        assert 0.9 * fair <= served[name] <= 1.1 * fair + 1, served
    assert len(h.sched) <= 64


def test_round_robin_order_across_streams_with_backlogs() -> None:
    h = Harness(queue_depth=3)
    streams = [h.sched.add_stream(i, n) for i, n in enumerate("abc")]
    for sq in streams:
        for _ in range(3):
            h.offer(sq)
    order = [f.split("#")[0] for f in h.take_all()]
    assert order == list("abc" * 3)


# --------------------------------------------------------------------------- stale


def test_stale_frames_are_dropped_when_a_worker_reaches_them() -> None:
    h = Harness(queue_depth=1, max_age_ms=100)
    a = h.sched.add_stream(1, "a")
    b = h.sched.add_stream(2, "b")
    old = h.offer(a, received=0.0)
    fresh = h.offer(b, received=0.15)
    h.clock.now = 0.2  # a's frame is 200 ms old, b's 50 ms
    assert h.take() is fresh  # the stale one is skipped within the same take
    assert h.drops == [(old.frame, STALE)]
    assert h.take() is None
    assert len(h.sched) == 0


def test_busy_means_frames_waiting_or_arriving_faster_than_the_lanes_finish_them() -> None:
    h = Harness(queue_depth=1)
    h.sched.lanes = 2
    a = h.sched.add_stream(1, "a")
    assert not h.sched.busy()
    h.offer(a)
    assert h.sched.busy()  # a frame waits
    h.measured(0.010)  # 2 lanes: one frame done every 5 ms, 200 frames/s
    h.take()
    for i in range(1, 6):  # every 4 ms: 250 frames/s
        h.clock.now = 0.004 * i
        h.offer(a)
        h.take()
    assert len(h.sched) == 0 and h.sched.busy()  # nothing waits, but the next frame is due any moment
    h.clock.now += 0.1  # the stream went quiet
    assert not h.sched.busy()


@pytest.mark.parametrize(("gap_ms", "busy"), [(25.0, False), (8.0, True)])
def test_busy_from_half_load_up(gap_ms: float, busy: bool) -> None:
    """2 lanes of 10 ms: 40 frames/s is 20 % load (a lone frame may take every core), 125 frames/s is
    62 % (the next frame would likely arrive during that inference)."""
    h = Harness(queue_depth=1)
    h.sched.lanes = 2
    a = h.sched.add_stream(1, "a")
    h.measured(0.010)
    for i in range(10):
        h.clock.now = gap_ms / 1000 * i
        h.offer(a)
        h.take()
    assert len(h.sched) == 0 and h.sched.busy() is busy


def test_explicit_age_limit_applies_to_every_real_time_stream() -> None:
    h = Harness(queue_depth=1, max_age_ms=20)
    slow = h.sched.add_stream(1, "slow")
    h.measured(0.010)
    job = h.offer(slow, received=0.0)
    h.clock.now = 0.05
    assert h.take() is None
    assert h.drops == [(job.frame, STALE)]


def test_lossless_frames_are_never_stale_dropped() -> None:
    h = Harness(max_age_ms=10, lossless_depth=4)
    sq = h.sched.add_stream(1, "ll", lossless=True)
    jobs = [h.offer(sq, received=0.0) for _ in range(4)]
    h.clock.now = 1000.0
    assert h.take_all() == [j.frame for j in jobs]
    assert not h.drops


def test_no_max_age_means_nothing_goes_stale() -> None:
    h = Harness(max_age_ms=0)
    sq = h.sched.add_stream(1, "a")
    job = h.offer(sq, received=0.0)
    h.clock.now = 1e9
    assert h.take() is job


def test_all_stale_returns_none_and_clears_the_queue() -> None:
    h = Harness(max_age_ms=5)
    streams = [h.sched.add_stream(i, f"s{i}") for i in range(3)]
    for sq in streams:
        h.offer(sq, received=0.0)
    h.clock.now = 1.0
    assert h.take() is None
    assert [r for _, r in h.drops] == [STALE] * 3
    assert len(h.sched) == 0


# --------------------------------------------------------------------------- bounds


def test_global_cap_refuses_a_new_streams_frame() -> None:
    h = Harness(queue_depth=1, max_queue=2)
    a = h.sched.add_stream(1, "a")
    b = h.sched.add_stream(2, "b")
    c = h.sched.add_stream(3, "c")
    h.offer(a)
    h.offer(b)
    refused = h.job(c)
    assert h.sched.offer(refused) is False
    assert h.drops == [(refused.frame, QUEUE_FULL)]
    assert len(h.sched) == 2
    # A stream already queued may still replace its own frame: the total does not grow.
    a2 = h.offer(a)
    assert h.drops[-1][1] == SUPERSEDED
    assert len(h.sched) == 2
    assert h.take_all()[0] == a2.frame


def test_lossless_stream_never_supersedes() -> None:
    h = Harness(lossless_depth=2)
    sq = h.sched.add_stream(1, "ll", lossless=True)
    j1, j2 = h.offer(sq), h.offer(sq)
    assert not h.drops
    assert h.sched.has_space(sq) is False
    extra = h.job(sq)
    assert h.sched.offer(extra) is False
    assert h.drops == [(extra.frame, QUEUE_FULL)]
    assert h.take_all() == [j1.frame, j2.frame]
    assert h.sched.has_space(sq) is True


def test_has_space_respects_the_global_cap() -> None:
    h = Harness(queue_depth=1, lossless_depth=4, max_queue=1)
    rt = h.sched.add_stream(1, "rt")
    ll = h.sched.add_stream(2, "ll", lossless=True)
    assert h.sched.has_space(ll)
    h.offer(rt)
    assert not h.sched.has_space(ll)
    refused = h.job(ll)
    assert h.sched.offer(refused) is False
    assert h.drops == [(refused.frame, QUEUE_FULL)]


def test_wait_space_blocks_until_a_take_frees_space() -> None:
    async def scenario() -> None:
        h = Harness(lossless_depth=2)
        sq = h.sched.add_stream(1, "ll", lossless=True)
        h.offer(sq)
        await asyncio.wait_for(h.sched.wait_space(sq), 1)  # space left: returns at once
        h.offer(sq)
        waiter = asyncio.create_task(h.sched.wait_space(sq))
        await settle()
        assert not waiter.done()
        assert h.take() is not None
        await asyncio.wait_for(waiter, 1)
        assert h.sched.has_space(sq)

    run(scenario)


def test_wait_space_on_the_global_cap_is_released_by_another_streams_take() -> None:
    async def scenario() -> None:
        h = Harness(queue_depth=1, lossless_depth=4, max_queue=2)
        rts = [h.sched.add_stream(i, f"rt{i}") for i in range(2)]
        ll = h.sched.add_stream(9, "ll", lossless=True)
        for sq in rts:
            h.offer(sq)
        waiter = asyncio.create_task(h.sched.wait_space(ll))
        await settle()
        assert not waiter.done()
        job = h.take()
        assert job is not None and job.stream is rts[0]
        await asyncio.wait_for(waiter, 1)

    run(scenario)


def test_wait_space_is_released_when_stale_drops_empty_the_queue() -> None:
    # Regression: a take that only found stale frames freed the global cap but did not wake lossless readers.
    async def scenario() -> None:
        h = Harness(queue_depth=1, lossless_depth=4, max_queue=1, max_age_ms=10)
        rt = h.sched.add_stream(1, "rt")
        ll = h.sched.add_stream(2, "ll", lossless=True)
        h.offer(rt, received=0.0)
        waiter = asyncio.create_task(h.sched.wait_space(ll))
        await settle()
        assert not waiter.done()
        h.clock.now = 1.0
        assert h.take() is None
        await asyncio.wait_for(waiter, 1)

    run(scenario)


def test_wait_space_is_released_when_another_stream_leaves() -> None:
    # Regression: remove_stream freed the global cap but did not wake other lossless readers.
    async def scenario() -> None:
        h = Harness(queue_depth=1, lossless_depth=4, max_queue=1)
        rt = h.sched.add_stream(1, "rt")
        ll = h.sched.add_stream(2, "ll", lossless=True)
        h.offer(rt)
        waiter = asyncio.create_task(h.sched.wait_space(ll))
        await settle()
        assert not waiter.done()
        h.sched.remove_stream(1)
        await asyncio.wait_for(waiter, 1)

    run(scenario)


# --------------------------------------------------------------------------- remove / close


def test_remove_stream_drops_waiting_jobs_as_disconnected() -> None:
    h = Harness(lossless_depth=3)
    sq = h.sched.add_stream(1, "ll", lossless=True)
    other = h.sched.add_stream(2, "other")
    jobs = [h.offer(sq) for _ in range(3)]
    kept = h.offer(other)
    assert h.sched.remove_stream(1) == 3
    assert h.drops == [(j.frame, DISCONNECTED) for j in jobs]
    assert len(h.sched) == 1
    assert h.take_all() == [kept.frame]
    # A frame still arriving for the removed stream is reported, not queued.
    late = h.job(sq)
    assert h.sched.offer(late) is False
    assert h.drops[-1] == (late.frame, DISCONNECTED)
    assert h.sched.remove_stream(1) == 0  # unknown key: nothing happens
    h.sched.add_stream(1, "ll-again")  # the key is free again


def test_duplicate_stream_key_is_refused() -> None:
    h = Harness()
    h.sched.add_stream(1, "a")
    with pytest.raises(KeyError):
        h.sched.add_stream(1, "b")


def test_remove_stream_releases_a_blocked_wait_space() -> None:
    async def scenario() -> None:
        h = Harness(lossless_depth=1)
        sq = h.sched.add_stream(1, "ll", lossless=True)
        h.offer(sq)
        waiter = asyncio.create_task(h.sched.wait_space(sq))
        await settle()
        assert not waiter.done()
        h.sched.remove_stream(1)
        await asyncio.wait_for(waiter, 1)
        assert h.drops[-1][1] == DISCONNECTED

    run(scenario)


def test_close_drops_everything_as_shutdown_and_wait_take_returns_none() -> None:
    async def scenario() -> None:
        h = Harness(queue_depth=2, lossless_depth=1)
        rt = h.sched.add_stream(1, "rt")
        ll = h.sched.add_stream(2, "ll", lossless=True)
        queued = [h.offer(rt), h.offer(rt), h.offer(ll)]
        waiter = asyncio.create_task(h.sched.wait_space(ll))
        await settle()
        assert not waiter.done()
        assert h.sched.close() == 3
        assert sorted(h.drops) == sorted((j.frame, SHUTDOWN) for j in queued)
        assert len(h.sched) == 0
        await asyncio.wait_for(waiter, 1)
        assert h.sched.wait_take() is None  # closed: no wait
        late = h.job(rt)
        assert h.sched.offer(late) is False
        assert h.drops[-1] == (late.frame, SHUTDOWN)

    run(scenario)


@contextlib.contextmanager
def lane_threads(h: Harness, n: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for wait_take; the scheduler is closed on the way out, so a failed assertion cannot
    leave a lane waiting forever (and the test run hanging)."""
    pool = ThreadPoolExecutor(n)
    try:
        yield pool
    finally:
        h.sched.close()
        pool.shutdown(wait=True)


def test_wait_take_in_a_thread_waits_for_an_offer_and_a_blocked_one_ends_on_close() -> None:
    h = Harness()
    sq = h.sched.add_stream(1, "a")
    with lane_threads(h, 2) as pool:
        lane = pool.submit(h.sched.wait_take)
        time.sleep(0.05)
        assert not lane.done()
        job = h.offer(sq)
        assert lane.result(timeout=2) is job
        blocked = [pool.submit(h.sched.wait_take) for _ in range(2)]
        time.sleep(0.05)
        assert not any(f.done() for f in blocked)
        h.sched.close()
        assert [f.result(timeout=2) for f in blocked] == [None, None]


def test_wait_take_times_out_with_none() -> None:
    h = Harness()
    h.sched.add_stream(1, "a")
    assert h.sched.wait_take(timeout=0.01) is None


def test_a_take_in_a_lane_thread_sends_its_side_effects_through_dispatch() -> None:
    """Drop notices and lossless wake-ups caused by a lane's take must run where dispatch says (the
    event loop), never on the lane thread."""
    calls: list[tuple[Any, tuple[Any, ...], int]] = []
    h = Harness(queue_depth=1, lossless_depth=1, max_age_ms=5)
    h.sched.dispatch = lambda fn, *args: calls.append((fn, args, threading.get_ident()))
    rt = h.sched.add_stream(1, "rt")
    ll = h.sched.add_stream(2, "ll", lossless=True)
    old = h.offer(rt)
    h.clock.now += 0.010  # past the 5 ms limit
    fresh = h.offer(ll)
    with lane_threads(h, 1) as pool:
        lane_thread = pool.submit(threading.get_ident).result()
        assert pool.submit(h.sched.wait_take).result(timeout=2) is fresh
    assert h.drops == []  # the stale frame's notice was dispatched, not sent from the lane
    assert [args for fn, args, _ in calls if fn == h.sched.on_drop] == [(old, STALE)]
    assert [args for fn, args, _ in calls if fn == h.sched._freed] == [(rt,), (ll,)]
    assert {t for _, _, t in calls} == {lane_thread}


def test_a_lane_that_drops_stale_frames_and_then_waits_reports_them_at_once() -> None:
    """Found by the bench: a waiting lane held a stale drop's notice until the next frame came, and
    at the end of a run that was never (1 frame unanswered)."""
    h = Harness(queue_depth=1, max_age_ms=5)
    sq = h.sched.add_stream(1, "a")
    job = h.offer(sq)
    h.clock.now += 0.010
    with lane_threads(h, 1) as pool:
        lane = pool.submit(h.sched.wait_take)
        deadline = time.monotonic() + 2
        while not h.drops and time.monotonic() < deadline:
            time.sleep(0.005)
        assert h.drops == [(job.frame, STALE)]
        assert not lane.done()  # still waiting for work
    assert lane.result(timeout=2) is None


def test_concurrent_lanes_and_offers_lose_nothing_and_serve_each_frame_once() -> None:
    """The loop offering while lanes take (the server's arrangement): every frame ends exactly once,
    as taken or dropped (superseded, or stale past the 0.2 ms limit, from a lane thread)."""
    h = Harness(queue_depth=2, clock=time.perf_counter, max_age_ms=0.2)
    streams = [h.sched.add_stream(i, f"s{i}") for i in range(6)]
    taken: list[Any] = []
    lock = threading.Lock()

    def lane() -> None:
        while (job := h.sched.wait_take()) is not None:
            with lock:
                taken.append(job.frame)

    sent = []
    with lane_threads(h, 3) as pool:
        lanes = [pool.submit(lane) for _ in range(3)]
        for i in range(3000):
            sent.append(h.offer(streams[i % 6]).frame)
        time.sleep(0.1)
        h.sched.close()
        for f in lanes:
            f.result(timeout=5)
    dropped = [frame for frame, _ in h.drops]
    assert len(taken) == len(set(taken))
    assert sorted(taken + dropped) == sorted(sent)


# --------------------------------------------------------------------------- conservation (property)

N_STREAMS = 4

op = st.one_of(
    st.tuples(st.just("offer"), st.integers(0, N_STREAMS - 1)),
    st.tuples(st.just("offer"), st.integers(0, N_STREAMS - 1)),
    st.tuples(st.just("offer"), st.integers(0, N_STREAMS - 1)),
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("done"), st.integers(0, 3)),
    st.tuples(st.just("done"), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, N_STREAMS - 1)),
    st.tuples(st.just("tick"), st.integers(1, 30)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, max_size=120),
    lossless=st.lists(st.booleans(), min_size=N_STREAMS, max_size=N_STREAMS),
    queue_depth=st.integers(1, 3),
    lossless_depth=st.integers(1, 4),
    max_queue=st.integers(1, 8),
    max_age_ms=st.sampled_from([0, 20]),
    close_at_end=st.booleans(),
    lanes=st.integers(1, 3),
)
def test_every_offered_job_is_taken_or_dropped_exactly_once(
    ops: list[tuple[str, int]],
    lossless: list[bool],
    queue_depth: int,
    lossless_depth: int,
    max_queue: int,
    max_age_ms: int,
    close_at_end: bool,
    lanes: int,
) -> None:
    clock = FakeClock(0.0)
    dropped: dict[int, str] = {}
    taken: list[Job] = []
    offered: dict[int, Job] = {}

    def on_drop(job: Job, reason: str) -> None:
        assert id(job) in offered, "drop of a job never offered"
        assert id(job) not in dropped, f"job dropped twice ({dropped[id(job)]}, then {reason})"
        dropped[id(job)] = reason

    sched = Scheduler(on_drop=on_drop, queue_depth=queue_depth, lossless_depth=lossless_depth,
                      max_queue=max_queue, max_age_ms=max_age_ms, clock=clock, lanes=lanes)
    in_lanes: list[Job] = []  # taken, not yet given back
    keys = itertools.count()
    live: dict[int, StreamQueue] = {}  # slot -> stream currently registered in that slot

    def stream(slot: int) -> StreamQueue:
        if slot not in live:  # (re)connect: a fresh key, as a new connection gets
            live[slot] = sched.add_stream(next(keys), f"s{slot}", lossless=lossless[slot])
        return live[slot]

    seq = itertools.count()
    for kind, arg in ops:
        if kind == "offer":
            sq = stream(arg)
            job = Job(sq, next(seq), clock())
            offered[id(job)] = job
            sched.offer(job)
        elif kind == "take":
            job = sched.take()
            if job is not None:
                assert id(job) not in dropped
                taken.append(job)
                in_lanes.append(job)
                # a lane share is checked when a frame is taken (a stream joining later shrinks it)
                assert job.stream.in_flight <= sched.policy.lane_share(len(sched.streams))
            else:  # work-conserving: nothing waits that this lane may serve
                assert sched.policy.pick(sched._waiting, len(sched.streams)) is None
        elif kind == "done":
            if in_lanes:
                sched.done(in_lanes.pop(arg % len(in_lanes)), arg / 100.0 or None)
        elif kind == "remove":
            if arg in live:
                sched.remove_stream(live.pop(arg).key)
        else:
            clock.now += arg / 1000.0
        queued = sum(len(sq.jobs) for sq in sched.streams.values())
        assert len(sched) == queued
        assert len(sched) <= max_queue
        assert len(offered) == len(taken) + len(dropped) + queued
        for sq in sched.streams.values():
            assert len(sq.jobs) <= sq.depth
            assert sq.in_flight == sum(j.stream is sq for j in in_lanes)

    if close_at_end:
        sched.close()
        assert sched.take() is None
    else:
        for job in in_lanes:
            sched.done(job, 0.01)
        while (job := sched.take()) is not None:  # draining must hand out exactly what is queued
            taken.append(job)
            sched.done(job, 0.01)
    assert len(sched) == 0
    taken_ids = [id(j) for j in taken]
    assert len(set(taken_ids)) == len(taken_ids), "a job was handed out twice"
    assert set(taken_ids).isdisjoint(dropped)
    assert set(taken_ids) | set(dropped) == set(offered)
    # Lossless frames are only ever lost to the connection or server going away, or a reader that did not wait.
    for key, reason in dropped.items():
        if offered[key].stream.lossless:
            assert reason in (QUEUE_FULL, DISCONNECTED, SHUTDOWN), reason
    # Per stream, frames are handed out in the order they were offered.
    by_stream: dict[int, list[int]] = {}
    for job in taken:
        by_stream.setdefault(job.stream.key, []).append(job.frame)
    assert all(frames == sorted(frames) for frames in by_stream.values())
