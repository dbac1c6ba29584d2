"""Every frame's one answer: its result, or a drop notice saying why (and the counters that go with it)."""

from __future__ import annotations

import time
from typing import Any

from visionstream.server.broadcast import Broadcaster
from visionstream.server.latest import LatestFrames
from visionstream.server.scheduler import DISCONNECTED, SHUTDOWN, Job, Owner
from visionstream.server.stats import Stats
from visionstream.wire.protocol import dropped_msg, result_msg


class Replies:
    """Event loop only. A frame whose lane is given up at shutdown is answered then (`abandon`) and
    nothing is sent when its lane finishes it later."""

    def __init__(self, stats: Stats, broadcaster: Broadcaster, latest: LatestFrames | None = None) -> None:
        self.stats = stats
        self.broadcaster = broadcaster
        self.latest = latest  # the dashboard's newest frame per stream
        self._abandoned: set[Job] = set()

    def result(self, job: Job, detections: list[dict[str, Any]], t0: float, t1: float, t2: float,
               size: tuple[int, int], new_tracks: list[str] | tuple[str, ...] = (), transfer: float | None = None
               ) -> None:
        """The lane's detections for `job`: decode started at t0, inference at t1, done at t2; `new_tracks`:
        the labels of the tracks its stream's tracker confirmed for the first time on it; `transfer`: seconds
        the frame and its answer spent between the front and a Ray actor (--executor ray)."""
        conn = job.stream.owner
        assert conn is not None  # the server's streams always have their connection
        if job in self._abandoned:
            self._abandoned.discard(job)
            return
        conn.jobs.discard(job)
        if new_tracks:  # counted even when the client is gone: they were confirmed
            self.stats.tracks_confirmed(conn.key, new_tracks)
        if conn.closed:
            self.stats.frame_dropped(conn.key, DISCONNECTED)
            return
        latency_ms = (time.perf_counter() - job.received) * 1000.0
        timings = {"queue_ms": round((t0 - job.received) * 1000.0, 3),
                   "decode_ms": round((t1 - t0) * 1000.0, 3), "infer_ms": round((t2 - t1) * 1000.0, 3)}
        if transfer is not None:
            timings["transfer_ms"] = round(transfer * 1000.0, 3)
        frame = job.frame
        msg = result_msg(frame.stream_name, frame.frame_id, detections, latency_ms=round(latency_ms, 3),
                         timings=timings, timestamp=frame.timestamp, image_size=size, server_time=time.time())
        conn.send(msg)
        self.stats.frame_processed(conn.key, latency_ms, timings)
        if not job.stream.closed:  # removed while in a lane: its name may be another connection's by now
            self.broadcaster.publish(msg)
            st = self.stats.streams.get(conn.key)
            if self.latest is not None and st is not None:
                self.latest.record(frame, st, detections, size)  # references only: no copy, no encoding

    def failed(self, job: Job, reason: str, message: str, code: str | None = None) -> None:
        """The lane could not process `job` (`decode_error`, `inference_error`); a `code` (the error's,
        e.g. `too_many_pixels`) is counted and sent along."""
        if code is not None or reason == "decode_error":
            self.stats.error(code or reason)
        self.drop(job, reason, message, code if code != reason else None)

    def drop(self, job: Job, reason: str, message: str | None = None, code: str | None = None) -> None:
        """`job` leaves without a result (the scheduler's `on_drop`, and lane failures)."""
        conn = job.stream.owner
        assert conn is not None
        if job in self._abandoned:
            self._abandoned.discard(job)
            return
        self._drop(conn, job, reason, message, code)

    def _drop(self, conn: Owner, job: Job, reason: str, message: str | None = None, code: str | None = None
              ) -> None:
        conn.jobs.discard(job)
        self.stats.frame_dropped(conn.key, reason)
        if reason != DISCONNECTED:  # nobody is left to tell
            msg = dropped_msg(job.frame.stream_name, job.frame.frame_id, reason)
            if message:
                msg["message"] = message
            if code:
                msg["code"] = code
            conn.send(msg)

    def abandon(self, job: Job, reason: str = SHUTDOWN) -> None:
        """The lane working on `job` is given up on (shutdown; a replaced connection that could wait no
        longer): answer it now, and only now; what its lane posts later is ignored."""
        conn = job.stream.owner
        assert conn is not None
        if job in self._abandoned or job not in conn.jobs:  # answered already
            return
        self._abandoned.add(job)
        self._drop(conn, job, reason)
