"""The lanes' watchdog with deliberately hung detectors: a timed-out frame is answered once, the lane replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import numpy as np

from visionstream.server import lanes as lanes_module
from visionstream.server.broadcast import Broadcaster
from visionstream.server.inference.api import DetectorSpec, InFlight
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.lanes import MAX_STUCK_LANES, TIMEOUT, Lanes
from visionstream.server.replies import Replies
from visionstream.server.scheduler import Job, Scheduler
from visionstream.server.stats import Stats
from visionstream.wire.protocol import Frame

TIMEOUT_S = 0.3
ANSWER_S = 10.0  # generous bound on any one answer


class Owner:
    """A connection as replies see it: every message it is sent, in order."""

    def __init__(self, key: int = 1) -> None:
        self.key = key
        self.closed = False
        self.sent: list[dict[str, Any]] = []
        self.jobs: set[Any] = set()  # frames not yet answered, as ClientConnection keeps them
        self.arrived = asyncio.Event()

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)
        self.arrived.set()

    def answers(self, fid: int) -> list[dict[str, Any]]:
        return [m for m in self.sent if m.get("frame_id") == fid]

    async def answer(self, fid: int) -> dict[str, Any]:
        deadline = time.monotonic() + ANSWER_S
        while not self.answers(fid):
            assert time.monotonic() < deadline, f"frame {fid} not answered within {ANSWER_S}s: {self.sent}"
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.5)
        return self.answers(fid)[0]


class HungDetector(PlaceholderDetector):
    """Hangs on images whose width is `hang_width` until released (or for ever, if `every`)."""

    def __init__(self, hang_width: int = 7, every: bool = False) -> None:
        self.hang_width = hang_width
        self.every = every
        self.release = threading.Event()
        self.entered = 0
        self.returned = 0

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        if self.every or image.shape[1] == self.hang_width:
            self.entered += 1
            self.release.wait(30)
            self.returned += 1
        return super().detect(image)


class Rig:
    """Scheduler, replies, stats and lanes wired as the server wires them, on this loop."""

    def __init__(self, count: int = 1, timeout: float = TIMEOUT_S) -> None:
        loop = asyncio.get_running_loop()
        self.stats = Stats(model="test", device="cpu", workers=count)
        self.replies = Replies(self.stats, Broadcaster(self.stats))

        def post(fn: Any, *args: Any) -> None:
            loop.call_soon_threadsafe(fn, *args)

        self.scheduler = Scheduler(on_drop=self.replies.drop, lossless_depth=8, lanes=count, dispatch=post)
        self.lanes = Lanes(self.scheduler, self.replies, self.stats, post, InFlight(), infer_timeout=timeout)
        self.stats.lanes_stuck_fn = lambda: self.lanes.stuck
        self.owner = Owner()
        self.stream = self.scheduler.add_stream(1, "cam", lossless=True, owner=self.owner)
        self.count = count
        self.done_calls: list[Job] = []
        real_done = self.scheduler.done

        def counted_done(job: Job, seconds: float | None) -> None:
            self.done_calls.append(job)
            real_done(job, seconds)

        self.scheduler.done = counted_done  # type: ignore[method-assign]

    async def start(self, *detectors: Any) -> None:
        # resolved=None: the placeholder detector, which is what a replacement lane gets too.
        await self.lanes.load(DetectorSpec("none"), None, self.count, 0)
        self.lanes.start(list(detectors))

    def send(self, fid: int, width: int = 8) -> Job:
        frame = Frame("cam", fid, 0.0, bytes(8 * width * 3), "raw", (8, width, 3))
        job = Job(self.stream, frame, time.perf_counter())
        assert self.scheduler.offer(job)
        return job

    async def stop(self) -> int:
        self.scheduler.close()
        given_up = await self.lanes.stop(1.0)
        self.lanes.close()
        return given_up


def test_a_hung_frame_is_answered_timeout_and_a_fresh_lane_serves_the_next(caplog):
    """Frame 1 hangs its lane: it is answered `timeout` once, frames 2 and 3 get results from the new
    lane, and when the stuck thread finally returns it neither answers nor gives the frame back again."""
    caplog.set_level(logging.WARNING, logger="visionstream.server")
    hung = HungDetector()

    async def scenario() -> Rig:
        rig = Rig()
        await rig.start(hung)
        rig.send(0)
        assert (await rig.owner.answer(0))["type"] == "result"
        started = time.monotonic()
        job = rig.send(1, width=7)
        rig.send(2)
        timed_out = await rig.owner.answer(1)
        assert time.monotonic() - started >= TIMEOUT_S
        assert (timed_out["type"], timed_out["reason"]) == ("dropped", TIMEOUT), timed_out
        assert rig.done_calls.count(job) == 1  # given back at once: its stream is not blocked
        assert (await rig.owner.answer(2))["type"] == "result"
        rig.send(3)
        assert (await rig.owner.answer(3))["type"] == "result"
        assert rig.lanes.stuck == 1 and rig.stats.snapshot()["lanes_stuck"] == 1
        hung.release.set()  # the abandoned thread finishes frame 1 now
        deadline = time.monotonic() + ANSWER_S
        while rig.lanes.stuck:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # room for a (wrong) late answer to arrive
        assert await rig.stop() == 0
        return rig

    rig = asyncio.run(scenario())
    assert hung.returned == 1
    assert [len(rig.owner.answers(f)) for f in range(4)] == [1, 1, 1, 1]
    assert len(rig.done_calls) == 4  # one give-back per frame, none for the late return
    snap = rig.stats.snapshot()
    assert (snap["infer_timeouts"], snap["lanes_replaced"], snap["lanes_stuck"]) == (1, 1, 0)
    assert snap["drops_by_reason"] == {TIMEOUT: 1} and snap["workers_busy"] == 0
    warnings = [r for r in caplog.records if "--infer-timeout" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "cam frame 1" in warnings[0].getMessage()


def test_a_detector_that_hangs_on_every_frame_stops_being_replaced(caplog, monkeypatch):
    """Each replacement hangs again: after MAX_STUCK_LANES abandoned threads no new lane (thread and
    model) is made; the last slot then refuses frames, so every frame is still answered."""
    caplog.set_level(logging.WARNING, logger="visionstream.server")
    made: list[HungDetector] = []

    def load(*_args: Any) -> HungDetector:
        made.append(HungDetector(every=True))
        return made[-1]

    monkeypatch.setattr(lanes_module, "load_detector", load)
    first = HungDetector(every=True)
    frames = MAX_STUCK_LANES + 2

    async def scenario() -> Rig:
        rig = Rig(timeout=0.2)
        await rig.start(first)
        made.clear()  # load()'s own, which start() did not use
        for fid in range(frames):
            rig.send(fid)
        for fid in range(frames):
            await rig.owner.answer(fid)
        threads = threading.active_count()
        await asyncio.sleep(1.0)  # no more lanes appear while the stuck ones stay stuck
        assert threading.active_count() <= threads
        await rig.stop()
        for d in [first, *made]:
            d.release.set()
        return rig

    rig = asyncio.run(scenario())
    answers = [rig.owner.answers(f) for f in range(frames)]
    assert all(len(a) == 1 for a in answers), answers
    reasons = [a[0]["reason"] for a in answers]
    assert reasons[:MAX_STUCK_LANES] == [TIMEOUT] * MAX_STUCK_LANES
    assert reasons[MAX_STUCK_LANES:] == ["inference_error"] * (frames - MAX_STUCK_LANES)
    assert "no working inference lane" in answers[-1][0]["message"]
    assert len(made) == MAX_STUCK_LANES - 1  # replacements stopped at the cap
    assert rig.stats.infer_timeouts == MAX_STUCK_LANES and rig.stats.lanes_replaced == MAX_STUCK_LANES - 1
    assert [r.levelno for r in caplog.records if "not replaced" in r.getMessage()] == [logging.ERROR]


def test_stop_does_not_wait_for_an_abandoned_lane():
    """Shutdown with a lane stuck in the detector: it is not waited for, and its frame was answered once."""
    hung = HungDetector()

    async def scenario() -> tuple[Rig, float]:
        rig = Rig(timeout=0.2)
        await rig.start(hung)
        rig.send(1, width=7)
        assert (await rig.owner.answer(1))["reason"] == TIMEOUT
        started = time.monotonic()
        await rig.stop()
        return rig, time.monotonic() - started

    rig, took = asyncio.run(scenario())
    hung.release.set()
    assert took < 1.0 + 2.0  # the grace (1 s) at most: the stuck thread is not waited for
    assert len(rig.owner.answers(1)) == 1


def test_no_timeout_means_no_watchdog():
    async def scenario() -> Rig:
        rig = Rig(timeout=0)
        await rig.start(PlaceholderDetector())
        rig.send(1)
        assert (await rig.owner.answer(1))["type"] == "result"
        assert not any(t.get_name() == "lane-watchdog" for t in asyncio.all_tasks())
        await rig.stop()
        return rig

    asyncio.run(scenario())


def test_with_two_lanes_the_other_serves_while_one_hangs():
    """One lane hangs on frame 1; the other serves frames 2-4 meanwhile (before the timeout), then frame 1 is
    answered `timeout` and the server has two working lanes again."""
    hung = HungDetector()

    async def scenario() -> tuple[Rig, float]:
        rig = Rig(count=2, timeout=1.0)
        # Both lanes hold the hanging detector: either may take frame 1, and the one that does hangs.
        await rig.start(hung, hung)
        rig.send(1, width=7)
        deadline = time.monotonic() + ANSWER_S
        while not hung.entered:
            assert time.monotonic() < deadline, "no lane took frame 1"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        for fid in (2, 3, 4):
            rig.send(fid)
            assert (await rig.owner.answer(fid))["type"] == "result"
        served = time.monotonic() - started
        assert (await rig.owner.answer(1))["reason"] == TIMEOUT
        deadline = time.monotonic() + ANSWER_S
        while rig.stats.lanes_replaced < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        rig.send(5)
        assert (await rig.owner.answer(5))["type"] == "result"
        assert rig.stats.lanes == 2 and rig.scheduler.lanes == 2
        await rig.stop()
        hung.release.set()
        return rig, served

    rig, served = asyncio.run(scenario())
    assert served < 1.0  # not held up behind the hung lane
    assert [len(rig.owner.answers(f)) for f in range(1, 6)] == [1] * 5
