"""The inference lanes: one thread each, taking frames from the scheduler and posting answers to the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol

from visionstream.server.inference.api import Detector, DetectorSpec, InFlight, load_detector
from visionstream.server.inference.imaging import DecodeError, decode_frame
from visionstream.server.inference.models import load_failure
from visionstream.server.replies import Replies
from visionstream.server.scheduler import Job, Scheduler
from visionstream.server.stats import Stats
from visionstream.server.tracking import StreamTracker
from visionstream.wire.protocol import DEFAULT_MAX_PIXELS

log = logging.getLogger("visionstream.server")

Detections = list[dict[str, Any]]


def to_sent_pixels(detections: Detections, sx: float, sy: float, width: int, height: int) -> None:
    """Boxes found on an image decoded at 1/sx x 1/sy of its size, back in the sent image's pixels."""
    for d in detections:
        x1, y1, x2, y2 = d["bbox"]
        d["bbox"] = [round(min(x1 * sx, width), 1), round(min(y1 * sy, height), 1),
                     round(min(x2 * sx, width), 1), round(min(y2 * sy, height), 1)]


TIMEOUT: Final = "timeout"  # drop reason: the frame outlived --infer-timeout in its lane
# Lane threads abandoned to a hung detector that may still be running (each holds a thread and
# whatever the detector holds): past this many, a timed-out lane is not replaced any more.
MAX_STUCK_LANES: Final = 4
WATCH_PERIOD: Final = 1.0  # seconds between the watchdog's looks at the lanes (at most a quarter of the timeout)


def infer(detector: Detector, frame: Any, target: tuple[int, int] | None, inflight: InFlight,
          max_pixels: int = DEFAULT_MAX_PIXELS, track: Callable[[Any, Detections], None] | None = None
          ) -> tuple[Detections, float, float, float, tuple[int, int]]:
    """Lane-thread body: decode, detect, track (`track(image, detections)`, in the decoded image's pixels, which
    BoT-SORT's motion compensation needs; outside `inflight`: it is not inference), map boxes to the sent image.

    Returns (detections, start, decoded, detected (perf_counter), (width, height) of the sent image).
    """
    with inflight:
        t0 = time.perf_counter()
        image, (sx, sy) = decode_frame(frame, target, max_pixels)
        t1 = time.perf_counter()
        detections = detector.detect(image)
        t2 = time.perf_counter()
    if track is not None:
        track(image, detections)
    h, w = image.shape[:2]
    width, height = round(w * sx), round(h * sy)
    if sx != 1.0 or sy != 1.0:  # decoded at reduced size
        to_sent_pixels(detections, sx, sy, width, height)
    return detections, t0, t1, t2, (width, height)


class LaneExecutor(Protocol):
    """What the server uses of its inference lanes, whichever executor runs them (--executor): threads in this
    process (`Lanes`) or Ray actors (`raylanes.RayLanes`). Both take frames from the scheduler and answer each once."""

    decode_target: tuple[int, int] | None
    max_pixels: int
    infer_timeout: float

    def __len__(self) -> int: ...

    @property
    def stuck(self) -> int: ...

    async def load(self, spec: DetectorSpec, resolved: str | None, count: int, nice: int) -> list[Any]: ...

    def start(self, detectors: list[Any]) -> None: ...

    async def stop(self, grace: float) -> int: ...

    def close(self) -> None: ...


def tracker_of(job: Job) -> StreamTracker | None:
    """The tracker of the job's stream (its connection's), when --track is on."""
    return getattr(job.stream.owner, "tracker", None)


def _lower_priority(nice: int) -> None:
    """Executor initializer: this lane thread (and the OpenVINO threads it starts, which inherit it)
    yields the CPU to the event loop, so reading frames and writing replies do not queue behind
    inference. Linux only: elsewhere setpriority would renice the whole process."""
    if nice and sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class _Lane:
    """One lane thread and what the loop's watchdog needs of it: the frame it works on, since when, and
    whether the watchdog gave up on it (then the thread must neither answer that frame nor give it back)."""

    def __init__(self, index: int, executor: ThreadPoolExecutor, detector: Detector | None) -> None:
        self.index = index
        self.executor = executor
        self.detector = detector  # None: no working detector is left; frames are refused without decoding
        self.task: asyncio.Task | None = None
        self.job: Job | None = None
        self.started = 0.0  # time.monotonic() when it took `job`
        self.abandoned = False
        self.exited = threading.Event()  # its thread left the lane loop
        self.lock = threading.Lock()


class Lanes:
    """`count` lane threads, each with its own detector (ultralytics models are not thread-safe), each
    taking its next frame from the scheduler as soon as it finishes one, without a round trip through
    the event loop. A supervisor task per lane restarts it after a bug instead of losing it; with an
    `infer_timeout`, a watchdog on the loop answers a frame stuck in a lane longer than that `timeout`
    and replaces the lane (a Python thread cannot be killed: the stuck one is abandoned)."""

    def __init__(self, scheduler: Scheduler, replies: Replies, stats: Stats, post: Callable[..., Any],
                 inflight: InFlight, *, infer_timeout: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.scheduler = scheduler
        self.replies = replies
        self.stats = stats
        self.post = post  # runs fn(*args) on the event loop, from a lane thread
        self.inflight = inflight
        self.infer_timeout = infer_timeout  # seconds a frame may spend in a lane (decode and detect); 0: no limit
        self.max_pixels = max_pixels
        self.decode_target: tuple[int, int] | None = None  # large JPEGs decode at a reduced size covering it
        self._nice = 0
        self._spec: DetectorSpec | None = None
        self._resolved: str | None = None
        self._executors: list[ThreadPoolExecutor] = []
        self._lanes: list[_Lane] = []
        self._stuck: list[_Lane] = []  # abandoned lanes, until their thread leaves
        self._replacing: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None
        self._spawned = 0
        self._busy_lock = threading.Lock()  # lane threads count themselves in stats.workers_busy

    def __len__(self) -> int:
        return len(self._executors)

    def _executor(self, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_lower_priority, initargs=(self._nice,))

    async def load(self, spec: DetectorSpec, resolved: str | None, count: int, nice: int) -> list[Detector]:
        """Start `count` lane threads and build a detector on each (`resolved` None: placeholders).
        Returns the detectors, in lane order; weights that do not load are a ModelLoadError of one
        readable line (the library's own message and traceback go to the debug log)."""
        loop = asyncio.get_running_loop()
        self._nice, self._spec, self._resolved = nice, spec, resolved
        self._executors = [self._executor(f"lane-{i}") for i in range(count)]
        results = await asyncio.gather(
            *(loop.run_in_executor(ex, load_detector, spec, resolved, self.inflight) for ex in self._executors),
            return_exceptions=True)  # every lane settles before the failure is reported
        for result in results:
            if isinstance(result, BaseException):
                log.debug("loading %s failed", spec.model, exc_info=result)
                self.close()
                if not isinstance(result, Exception):
                    raise result
                raise load_failure(spec.model, result) from result
        return [r for r in results if not isinstance(r, BaseException)]

    def start(self, detectors: list[Detector]) -> None:
        self._lanes = [_Lane(i, ex, d) for i, (d, ex) in enumerate(zip(detectors, self._executors, strict=True))]
        for lane in self._lanes:
            self._launch(lane)
        if self.infer_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch(), name="lane-watchdog")

    def _launch(self, lane: _Lane) -> None:
        lane.task = asyncio.create_task(self._supervise(lane), name=f"lane-{lane.index}")

    @property
    def stuck(self) -> int:
        """Abandoned lane threads still inside the detector."""
        self._stuck = [lane for lane in self._stuck if not lane.exited.is_set()]
        return len(self._stuck)

    async def stop(self, grace: float) -> int:
        """Once the scheduler is closed: wait up to `grace` s for the lanes to finish their frames, then
        give up the rest (their frames are answered `shutdown`). Returns how many were given up."""
        for task in [self._watchdog, *self._replacing]:
            if task is not None:
                task.cancel()
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        if not tasks:
            return 0
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def close(self) -> None:
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)

    async def _supervise(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(lane.executor, self._run, lane)
                return
            except asyncio.CancelledError:
                with lane.lock:
                    job = None if lane.abandoned else lane.job
                if job is not None:  # given up at shutdown: the frame still gets its one answer
                    self.replies.abandon(job)
                raise
            except Exception:
                self.stats.error("worker_crash")
                log.exception("lane crashed; restarting it")

    # ------------------------------------------------------------------ lane threads

    def _run(self, lane: _Lane) -> None:
        """Lane thread: take the next frame straight from the scheduler, decode and detect it, post its
        answer to the loop; until the scheduler closes, or the watchdog abandons this lane."""
        lane.exited.clear()  # run again by its supervisor after a crash
        try:
            while not lane.abandoned and (job := self.scheduler.wait_take()) is not None:
                with lane.lock:
                    lane.job, lane.started = job, time.monotonic()
                if (tracker := tracker_of(job)) is not None:  # later frames of its stream wait for its step
                    tracker.taken(id(job), job.received)
                with self._busy_lock:
                    self.stats.workers_busy += 1
                if not self._serve(lane, job, tracker):
                    return
        finally:
            lane.exited.set()

    def _serve(self, lane: _Lane, job: Job, tracker: StreamTracker | None) -> bool:
        """One frame (with its stream's tracker, if any), answered once and given back to the scheduler
        once; False if the watchdog has meanwhile answered it (this lane is abandoned: its thread must leave)."""
        post, replies = self.post, self.replies
        seconds: float | None = None
        answer: tuple[Any, ...]
        new_tracks: list[str] = []
        track: Callable[[Any, Detections], None] | None = None
        if tracker is not None:
            def _track(image: Any, detections: Detections) -> None:
                new_tracks.extend(tracker.step(job.frame.frame_id, image, detections, job.received, id(job)))
            track = _track
        try:
            if lane.detector is None:
                answer = (replies.failed, job, "inference_error",
                          "no working inference lane is left: the detector hung (restart the server)")
            else:
                detections, t0, t1, t2, size = infer(lane.detector, job.frame, self.decode_target, self.inflight,
                                                     self.max_pixels, track)
                answer, seconds = (replies.result, job, detections, t0, t1, t2, size, new_tracks), t2 - t0
        except DecodeError as exc:
            answer = (replies.failed, job, "decode_error", str(exc), exc.code)
        except Exception as exc:  # one bad frame (or a bug here) must not kill the lane or lose the frame
            log.exception("inference failed on %s frame %s", job.stream.name, job.frame.frame_id)
            answer = (replies.failed, job, "inference_error", f"{type(exc).__name__}: {exc}")
        if tracker is not None:  # failed before its step (or stepped: then this does nothing)
            tracker.forget(id(job))
        with lane.lock:
            if lane.abandoned:  # answered `timeout`, given back and uncounted by the watchdog
                return False
            lane.job = None
        released = False  # the scheduler has this frame back (its stream's lane share is free)
        try:
            self.scheduler.done(job, seconds)
            released = True
            post(*answer)
        except Exception as exc:  # the bookkeeping itself raised: the frame still gets its one answer
            log.exception("lane bookkeeping failed on %s frame %s", job.stream.name, job.frame.frame_id)
            post(replies.failed, job, "inference_error", f"{type(exc).__name__}: {exc}")
        finally:
            if not released:
                self.scheduler.done(job, None)
            with self._busy_lock:
                self.stats.workers_busy -= 1
        return True

    # ------------------------------------------------------------------ the watchdog (event loop)

    async def _watch(self) -> None:
        period = min(WATCH_PERIOD, self.infer_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for lane in list(self._lanes):
                with lane.lock:
                    job = lane.job
                    if job is None or lane.abandoned or now - lane.started <= self.infer_timeout:
                        continue
                    lane.abandoned, lane.job = True, None
                self._timed_out(lane, job, now - lane.started)

    def _timed_out(self, lane: _Lane, job: Job, elapsed: float) -> None:
        """`lane` has held `job` too long: answer it, free its stream, and put a fresh lane in its place."""
        with self._busy_lock:
            self.stats.workers_busy -= 1
        self.stats.infer_timeout()
        self._lanes.remove(lane)
        self._stuck.append(lane)
        if lane.task is not None:
            lane.task.cancel()  # its supervisor would wait for the stuck thread forever
        lane.executor.shutdown(wait=False)  # the thread leaves once (if ever) the detector returns
        self._executors.remove(lane.executor)
        self.scheduler.done(job, None)
        if (tracker := tracker_of(job)) is not None:  # its stream's later frames must not wait for it
            tracker.forget(id(job))
        self.replies.drop(job, TIMEOUT, f"decode and inference outlived --infer-timeout ({self.infer_timeout:g} s)")
        stuck = self.stuck
        replace = stuck < MAX_STUCK_LANES
        log.warning("lane-%d: %s frame %s still in inference after %.1fs (--infer-timeout %g): answered "
                    "'timeout', %s (%d stuck lane thread(s))", lane.index, job.stream.name, job.frame.frame_id,
                    elapsed, self.infer_timeout, "replacing the lane" if replace else "NOT replaced", stuck)
        if not replace:
            log.error("the detector hung %d times without returning: lane-%d is not replaced; %s", stuck,
                      lane.index, "the remaining lanes go on" if self._lanes else
                      "no lane is left, every frame is answered 'inference_error' (restart the server)")
        task = asyncio.create_task(self._replace(lane.index, fresh=replace), name=f"lane-{lane.index}-replace")
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, index: int, *, fresh: bool) -> None:
        """A new lane in slot `index`: a fresh thread with a freshly loaded detector (off the loop). Without
        one (too many stuck, or it cannot be loaded) the slot is given up, unless it was the last lane:
        then its replacement refuses frames, so that every frame is still answered."""
        self._spawned += 1
        executor = self._executor(f"lane-{index}.{self._spawned}")
        detector: Detector | None = None
        if fresh:
            try:
                assert self._spec is not None  # resolved None: load_detector makes a placeholder
                detector = await asyncio.get_running_loop().run_in_executor(
                    executor, load_detector, self._spec, self._resolved, self.inflight)
            except Exception:
                log.exception("lane-%d: the replacement detector could not be loaded", index)
        if detector is None and (self._lanes or len(self._replacing) > 1):  # another lane is or will be up
            executor.shutdown(wait=False)
            self.stats.lanes = self.scheduler.lanes = len(self._lanes)
            return
        self._executors.append(executor)
        lane = _Lane(index, executor, detector)
        self._lanes.append(lane)
        self._launch(lane)
        if fresh and detector is not None:
            self.stats.lane_replaced()
        self.stats.lanes = self.scheduler.lanes = len(self._lanes)
