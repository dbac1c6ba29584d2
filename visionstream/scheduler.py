"""Bounded, fair frame scheduler: per-stream queues, a global cap, round-robin service, stale drops."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Drop reasons that reach clients (and /stats) verbatim.
SUPERSEDED = "superseded"
STALE = "stale"
QUEUE_FULL = "queue_full"
SHUTDOWN = "shutdown"
DISCONNECTED = "disconnected"

STARVING_TURNS = 3.0  # fair turns a dense stream may go unserved before freshness stops mattering for it


@dataclass(eq=False, slots=True)
class Job:
    """One received frame on its way to a worker."""

    stream: StreamQueue
    frame: Any  # protocol.Frame
    received: float  # scheduler clock (perf_counter) at receipt


@dataclass(eq=False)
class StreamQueue:
    """The waiting frames of one connection's stream."""

    key: int
    name: str
    lossless: bool
    depth: int
    owner: Any = None  # the connection, for replies
    jobs: deque[Job] = field(default_factory=deque)
    closed: bool = False
    last_served: float = float("-inf")  # scheduler clock when a worker last took one of its frames
    last_arrival: float | None = None
    period: float = 0.0  # EWMA of the gap between its frames (s); 0 until two have arrived
    space: asyncio.Event = field(default_factory=asyncio.Event)


DropHandler = Callable[[Job, str], None]


class Scheduler:
    """Fair across streams, fresh under overload; newest-wins for real-time streams, backpressure for
    lossless ones.

    A free worker gets the waiting frame of the least recently served stream, except that a *dense*
    real-time stream (one sending faster than its fair share of the measured capacity, so a newer
    frame of it comes soon anyway) is only eligible while its frame is about as fresh as the freshest
    dense frame waiting. Under overload this serves fresh frames (low latency) while streams that
    ask for less than their share, and lossless ones, are served in turn (fairness). Until a service
    time is measured, plain round-robin.

    Single-threaded (event loop only). Every job that leaves without being taken by a worker is
    reported once through `on_drop(job, reason)`, so no frame disappears silently.
    """

    def __init__(
        self,
        *,
        on_drop: DropHandler,
        queue_depth: int = 1,
        lossless_depth: int = 4,
        max_queue: int = 256,
        max_age_ms: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.on_drop = on_drop
        self.queue_depth = queue_depth
        self.lossless_depth = lossless_depth
        self.max_queue = max_queue
        # max_age_ms < 0: adaptive, one recent service time (EWMA of worker time per frame).
        self.adaptive_age = max_age_ms < 0
        self.max_age = 0.0 if self.adaptive_age else max_age_ms / 1000.0
        self.service_time = 0.0  # seconds, EWMA; 0 until a frame was served
        self.lanes = 1  # frames the workers process at once (set by the server once they are up)
        self.clock = clock
        self.streams: dict[int, StreamQueue] = {}
        self._ring: deque[StreamQueue] = deque()  # streams with waiting jobs, in service order
        self._blocked: set[StreamQueue] = set()  # lossless readers waiting in wait_space
        self._size = 0
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return self._size

    # ------------------------------------------------------------------ streams

    def add_stream(self, key: int, name: str, *, lossless: bool = False, owner: Any = None) -> StreamQueue:
        if key in self.streams:
            raise KeyError(f"stream key {key} already registered")
        sq = StreamQueue(key, name, lossless, self.lossless_depth if lossless else self.queue_depth, owner)
        self.streams[key] = sq
        self._update_space(sq)
        return sq

    def remove_stream(self, key: int, reason: str = DISCONNECTED) -> int:
        """Forget a stream; its waiting frames are dropped with `reason`. Returns how many."""
        sq = self.streams.pop(key, None)
        if sq is None:
            return 0
        sq.closed = True
        sq.space.set()  # release a reader blocked on backpressure
        dropped = self._discard(sq, reason)
        if dropped:
            self._wake_lossless()  # the global cap may have freed up for another lossless reader
        return dropped

    def _discard(self, sq: StreamQueue, reason: str) -> int:
        n = len(sq.jobs)
        if n:
            try:
                self._ring.remove(sq)
            except ValueError:
                pass
            jobs = list(sq.jobs)
            sq.jobs.clear()
            self._size -= n
            for job in jobs:
                self.on_drop(job, reason)
        return n

    # ------------------------------------------------------------------ producers

    def has_space(self, sq: StreamQueue) -> bool:
        return len(sq.jobs) < sq.depth and self._size < self.max_queue

    async def wait_space(self, sq: StreamQueue) -> None:
        """Backpressure for lossless streams: returns once `offer` would not drop."""
        while not sq.closed and not self._closed and not self.has_space(sq):
            sq.space.clear()
            self._blocked.add(sq)
            try:
                await sq.space.wait()
            finally:
                self._blocked.discard(sq)

    def offer(self, job: Job) -> bool:
        """Queue a job. Returns False if the job itself was dropped (reported via on_drop)."""
        sq = job.stream
        if sq.closed or self._closed:
            self.on_drop(job, SHUTDOWN if self._closed else DISCONNECTED)
            return False
        queued = bool(sq.jobs)  # already in the ring (a superseded job leaves its place to the new one)
        if len(sq.jobs) >= sq.depth:
            if sq.lossless:  # the reader should have waited; never silently replace a lossless frame
                self.on_drop(job, QUEUE_FULL)
                return False
            old = sq.jobs.popleft()
            self._size -= 1
            self.on_drop(old, SUPERSEDED)
        elif self._size >= self.max_queue:
            self.on_drop(job, QUEUE_FULL)
            return False
        if not queued:
            self._ring.append(sq)
        if sq.last_arrival is not None:
            gap = job.received - sq.last_arrival
            sq.period = gap if not sq.period else 0.8 * sq.period + 0.2 * gap
        sq.last_arrival = job.received
        sq.jobs.append(job)
        self._size += 1
        self._ready.set()
        self._update_space(sq)
        return True

    # ------------------------------------------------------------------ consumers

    def record_service(self, seconds: float) -> None:
        """One frame's worker time: feeds the service-time estimate (and an adaptive age limit)."""
        self.service_time = seconds if not self.service_time else 0.8 * self.service_time + 0.2 * seconds
        if self.adaptive_age:
            self.max_age = self.service_time

    def _interval(self) -> float:
        """Seconds between two frames finishing when every worker is busy."""
        return self.service_time / max(1, self.lanes)

    def _fair_gap(self) -> float:
        """Seconds between one stream's turns if all streams shared the measured capacity equally."""
        return len(self.streams) * self._interval()

    @staticmethod
    def _sending(sq: StreamQueue, now: float) -> bool:
        """Still sending at its usual rate (the end of a burst is not)."""
        return sq.period > 0.0 and sq.last_arrival is not None and now - sq.last_arrival <= 2.0 * sq.period

    def _dense(self, sq: StreamQueue, fair_gap: float, now: float) -> bool:
        """A real-time stream sending faster than its fair share, and still sending: a newer frame of
        it comes soon."""
        return not sq.lossless and sq.period < fair_gap and self._sending(sq, now)

    def _overloaded(self, now: float) -> bool:
        """Frames arrive faster than the workers finish them (arrival rates of the streams still sending)."""
        rate = sum(1.0 / sq.period for sq in self.streams.values() if self._sending(sq, now))
        return rate * self._interval() > 1.0

    def _pick(self, now: float, fair_gap: float) -> StreamQueue:
        """The stream whose frame a free worker should take (see the class docstring)."""
        ring = self._ring
        if len(ring) == 1 or not self.service_time:
            return ring[0]
        dense = {sq for sq in ring if self._dense(sq, fair_gap, now)}
        # Frames within one completion interval of the freshest are equally fresh.
        limit = min(now - sq.jobs[0].received for sq in dense) + self._interval() if dense else float("inf")
        # A dense stream whose frames keep missing that window (its phase locked against the workers')
        # still gets a turn once it has waited three fair turns: freshness must not starve anyone.
        starving = now - STARVING_TURNS * fair_gap
        best = None
        for sq in ring:
            if best is not None and sq.last_served >= best.last_served:
                continue
            if sq not in dense or now - sq.jobs[0].received <= limit or sq.last_served < starving:
                best = sq
        assert best is not None  # the freshest dense frame, or any other, is always eligible
        return best

    def take(self) -> Job | None:
        """Next job (fair, fresh: `_pick`), dropping stale ones on the way; None if nothing waits."""
        now = self.clock()
        fair_gap = self._fair_gap()
        while self._ring:
            sq = self._pick(now, fair_gap)
            self._ring.remove(sq)
            sq.last_served = now
            job = sq.jobs.popleft()
            self._size -= 1
            if sq.jobs:
                self._ring.append(sq)
            self._update_space(sq)
            if self._size < self.max_queue:
                self._wake_lossless()
            # The adaptive limit only trades an old frame for a fresher one, so only under overload
            # (at 80 % load the wait was transient and 2 % of frames were lost for nothing), and it
            # spares streams at or below their fair share (their next frame is far off).
            if self.max_age and not sq.lossless and now - job.received > self.max_age and \
                    (not self.adaptive_age or (self._dense(sq, fair_gap, now) and self._overloaded(now))):
                self.on_drop(job, STALE)
                continue
            return job
        self._ready.clear()
        return None

    async def get(self) -> Job | None:
        """Wait for the next job; None once the scheduler is closed."""
        while not self._closed:
            job = self.take()
            if job is not None:
                return job
            await self._ready.wait()
        return None

    def close(self, reason: str = SHUTDOWN) -> int:
        """Stop handing out work; every waiting frame is dropped with `reason`. Returns how many."""
        self._closed = True
        n = 0
        for sq in list(self.streams.values()):
            n += self._discard(sq, reason)
            sq.space.set()
        self._ready.set()
        return n

    # ------------------------------------------------------------------ internals

    def _update_space(self, sq: StreamQueue) -> None:
        if self.has_space(sq):
            sq.space.set()
        else:
            sq.space.clear()

    def _wake_lossless(self) -> None:
        # Only lossless readers block; the global cap freeing up may unblock any of them.
        for sq in self._blocked:  # usually empty: take() pays nothing per stream
            if not sq.space.is_set() and self.has_space(sq):
                sq.space.set()
