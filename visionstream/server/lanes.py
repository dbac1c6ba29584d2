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
from typing import Any

from visionstream.server.inference.api import Detector, DetectorSpec, InFlight, load_detector
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.inference.imaging import DecodeError, decode_frame
from visionstream.server.replies import Replies
from visionstream.server.scheduler import Job, Scheduler
from visionstream.server.stats import Stats
from visionstream.wire.errors import ModelLoadError

log = logging.getLogger("visionstream.server")

Detections = list[dict[str, Any]]


def to_sent_pixels(detections: Detections, sx: float, sy: float, width: int, height: int) -> None:
    """Boxes found on an image decoded at 1/sx x 1/sy of its size, back in the sent image's pixels."""
    for d in detections:
        x1, y1, x2, y2 = d["bbox"]
        d["bbox"] = [round(min(x1 * sx, width), 1), round(min(y1 * sy, height), 1),
                     round(min(x2 * sx, width), 1), round(min(y2 * sy, height), 1)]


def infer(detector: Detector, frame: Any, target: tuple[int, int] | None, inflight: InFlight
          ) -> tuple[Detections, float, float, float, tuple[int, int]]:
    """Lane-thread body: decode, detect, map boxes to the sent image.

    Returns (detections, start, decoded, detected (perf_counter), (width, height) of the sent image).
    """
    with inflight:
        t0 = time.perf_counter()
        image, (sx, sy) = decode_frame(frame, target)
        t1 = time.perf_counter()
        detections = detector.detect(image)
        t2 = time.perf_counter()
    h, w = image.shape[:2]
    width, height = round(w * sx), round(h * sy)
    if sx != 1.0 or sy != 1.0:  # decoded at reduced size
        to_sent_pixels(detections, sx, sy, width, height)
    return detections, t0, t1, t2, (width, height)


def _lower_priority(nice: int) -> None:
    """Executor initializer: this lane thread (and the OpenVINO threads it starts, which inherit it)
    yields the CPU to the event loop, so reading frames and writing replies do not queue behind
    inference. Linux only: elsewhere setpriority would renice the whole process."""
    if nice and sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class _Lane:
    """What one lane thread holds: the frame it is working on (read by the loop at shutdown)."""

    job: Job | None = None


class Lanes:
    """`count` lane threads, each with its own detector (ultralytics models are not thread-safe), each
    taking its next frame from the scheduler as soon as it finishes one, without a round trip through
    the event loop. A supervisor task per lane restarts it after a bug instead of losing it."""

    def __init__(self, scheduler: Scheduler, replies: Replies, stats: Stats, post: Callable[..., Any],
                 inflight: InFlight) -> None:
        self.scheduler = scheduler
        self.replies = replies
        self.stats = stats
        self.post = post  # runs fn(*args) on the event loop, from a lane thread
        self.inflight = inflight
        self.decode_target: tuple[int, int] | None = None  # large JPEGs decode at a reduced size covering it
        self._executors: list[ThreadPoolExecutor] = []
        self._tasks: list[asyncio.Task] = []
        self._busy_lock = threading.Lock()  # lane threads count themselves in stats.workers_busy

    def __len__(self) -> int:
        return len(self._executors)

    async def load(self, spec: DetectorSpec, resolved: str | None, count: int, nice: int) -> list[Detector]:
        """Start `count` lane threads and build a detector on each; placeholders (and a warning) if the
        model cannot be loaded. Returns the detectors, in lane order."""
        loop = asyncio.get_running_loop()
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"lane-{i}", initializer=_lower_priority,
                                              initargs=(nice,))
                           for i in range(count)]
        try:
            return list(await asyncio.gather(
                *(loop.run_in_executor(ex, load_detector, spec, resolved, self.inflight) for ex in self._executors)))
        except ModelLoadError as exc:
            log.warning("%s", exc)
            return [PlaceholderDetector() for _ in self._executors]

    def start(self, detectors: list[Detector]) -> None:
        self._tasks = [asyncio.create_task(self._supervise(d, ex), name=f"lane-{i}")
                       for i, (d, ex) in enumerate(zip(detectors, self._executors, strict=True))]

    async def stop(self, grace: float) -> int:
        """Once the scheduler is closed: wait up to `grace` s for the lanes to finish their frames, then
        give up the rest (their frames are answered `shutdown`). Returns how many were given up."""
        if not self._tasks:
            return 0
        _done, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def close(self) -> None:
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)

    async def _supervise(self, detector: Detector, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        lane = _Lane()
        while True:
            try:
                await loop.run_in_executor(executor, self._run, detector, lane)
                return
            except asyncio.CancelledError:
                if lane.job is not None:  # given up at shutdown: the frame still gets its one answer
                    self.replies.abandon(lane.job)
                raise
            except Exception:
                self.stats.error("worker_crash")
                log.exception("lane crashed; restarting it")

    def _run(self, detector: Detector, lane: _Lane) -> None:
        """Lane thread: take the next frame straight from the scheduler, decode and detect it, post its
        answer to the loop; until the scheduler closes."""
        post, replies = self.post, self.replies
        while (job := self.scheduler.wait_take()) is not None:
            lane.job = job
            with self._busy_lock:
                self.stats.workers_busy += 1
            released = False  # the scheduler has this frame back (its stream's lane share is free)
            try:
                detections, t0, t1, t2, size = infer(detector, job.frame, self.decode_target, self.inflight)
                self.scheduler.done(job, t2 - t0)
                released = True
            except DecodeError as exc:
                post(replies.failed, job, "decode_error", str(exc))
            except Exception as exc:  # one bad frame (or a bug here) must not kill the lane or lose the frame
                log.exception("inference failed on %s frame %s", job.stream.name, job.frame.frame_id)
                post(replies.failed, job, "inference_error", f"{type(exc).__name__}: {exc}")
            else:
                post(replies.result, job, detections, t0, t1, t2, size)
            finally:
                lane.job = None
                if not released:  # failed, or the bookkeeping itself raised: not measured
                    self.scheduler.done(job, None)
                with self._busy_lock:
                    self.stats.workers_busy -= 1
