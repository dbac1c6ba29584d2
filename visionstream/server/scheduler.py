"""The scheduler's mechanics: per-stream queues, a global cap, the lock, lane hand-off and backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from visionstream.server.policy import FairShare, stale

# Drop reasons that reach clients (and /stats) verbatim.
SUPERSEDED = "superseded"
STALE = "stale"
QUEUE_FULL = "queue_full"
SHUTDOWN = "shutdown"
DISCONNECTED = "disconnected"
REPLACED = "replaced"  # a newer connection took the stream's name (connection.ClientConnection.replace)

# The detector's choice between one inference on every core (a frame alone) and one core per lane:
# above this offered load (arrivals x completion interval) the next frame would likely arrive during
# the current inference and the two would fight over the cores (see `busy`). Not a scheduling rule.
BUSY_LOAD: Final = 0.5


class Owner(Protocol):
    """Who a stream's answers go to (server.connection.ClientConnection): what replies need of it."""

    key: int
    closed: bool
    jobs: set[Job]  # its frames not yet answered

    def send(self, msg: dict[str, Any]) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One received frame on its way to a worker."""

    stream: StreamQueue
    frame: Any  # protocol.Frame
    received: float  # scheduler clock (perf_counter) at receipt
    charged: float = 0.0  # worker seconds the policy charged its stream when a lane took it


@dataclass(eq=False)
class StreamQueue:
    """The waiting frames of one connection's stream, and what the policy keeps of it (policy.Flow)."""

    key: int
    name: str
    lossless: bool
    depth: int
    owner: Owner | None = None  # the connection, for replies (None in the scheduler's own tests)
    jobs: deque[Job] = field(default_factory=deque)
    closed: bool = False
    work: float = 0.0  # worker seconds charged (policy)
    cost: float = 0.0  # EWMA of its worker time per frame (policy)
    in_flight: int = 0  # its frames in lanes now (policy)
    last_arrival: float | None = None
    period: float = 0.0  # EWMA of the gap between its frames (s); 0 until two have arrived
    space: asyncio.Event = field(default_factory=asyncio.Event)

    def head_received(self) -> float:
        return self.jobs[0].received


DropHandler = Callable[[Job, str], None]
Effect = tuple[Callable[..., Any], tuple[Any, ...]]


class Scheduler:
    """Queues frames per stream and hands them to lanes in the order `policy.FairShare` decides.

    Real-time streams keep their newest `queue_depth` frames (an older one is superseded); lossless
    streams keep up to `lossless_depth` and their reader waits for space (`wait_space`). A global cap,
    `max_queue`, bounds everything waiting. Every job that leaves without being taken by a lane is
    reported once through `on_drop(job, reason)`, so no frame disappears silently; every job a lane
    takes must be given back with `done(job, seconds)`, which frees its stream's lane share.

    Threads: the event loop offers frames and opens and closes streams; lane threads take frames
    (`wait_take`), so a lane that finishes a frame starts the next one without a round trip through
    the loop. One lock guards the queues and the policy. What a take causes outside the scheduler (a
    stale drop's notice, waking a lossless reader) goes through `dispatch(fn, *args)`, which the
    server points at the loop (`call_soon_threadsafe`); by default it calls at once, for
    single-threaded use.
    """

    def __init__(
        self,
        *,
        on_drop: DropHandler,
        queue_depth: int = 1,
        lossless_depth: int = 4,
        max_queue: int = 256,
        max_age_ms: float = 0.0,
        lanes: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        dispatch: Callable[..., Any] | None = None,
    ) -> None:
        self.on_drop = on_drop
        self.dispatch: Callable[..., Any] = dispatch or (lambda fn, *args: fn(*args))
        self.queue_depth = queue_depth
        self.lossless_depth = lossless_depth
        self.max_queue = max_queue
        self.max_age = max(0.0, max_age_ms) / 1000.0  # 0: frames never go stale
        self.policy = FairShare(lanes)
        self.service_time = 0.0  # seconds per frame across streams, EWMA; 0 until a frame was served
        self.clock = clock
        self.streams: dict[int, StreamQueue] = {}
        self._waiting: dict[StreamQueue, None] = {}  # streams with waiting jobs (an ordered set)
        self._blocked: set[StreamQueue] = set()  # lossless readers waiting in wait_space
        self._size = 0
        self._lossless = 0  # lossless streams open
        self._closed = False
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # notified when a frame may be taken, or on close

    @property
    def closed(self) -> bool:
        """No more work is handed out (shutdown)."""
        return self._closed

    def __len__(self) -> int:
        return self._size

    @property
    def lanes(self) -> int:
        """Frames the lanes process at once (set by the server once they are up)."""
        return self.policy.lanes

    @lanes.setter
    def lanes(self, n: int) -> None:
        with self._lock:
            self.policy.lanes = n

    # ------------------------------------------------------------------ streams

    def add_stream(self, key: int, name: str, *, lossless: bool = False, owner: Owner | None = None
                   ) -> StreamQueue:
        if key in self.streams:
            raise KeyError(f"stream key {key} already registered")
        sq = StreamQueue(key, name, lossless, self.lossless_depth if lossless else self.queue_depth, owner)
        with self._lock:
            self.policy.rejoin(sq)
            self.streams[key] = sq
            self._lossless += lossless
            # One stream fewer or more changes every stream's lane share.
            self._work.notify_all()
        self._update_space(sq)
        return sq

    def remove_stream(self, key: int, reason: str = DISCONNECTED) -> int:
        """Forget a stream; its waiting frames are dropped with `reason`. Returns how many."""
        with self._lock:
            sq = self.streams.pop(key, None)
            if sq is None:
                return 0
            sq.closed = True
            self._lossless -= sq.lossless
            jobs = self._discard(sq)
            self._work.notify_all()  # the others' lane share may have grown
        sq.space.set()  # release a reader blocked on backpressure
        for job in jobs:
            self.on_drop(job, reason)
        if jobs:
            self._wake_lossless()  # the global cap may have freed up for another lossless reader
        return len(jobs)

    def _discard(self, sq: StreamQueue) -> list[Job]:
        """Empty one stream's queue (lock held); the caller reports the jobs."""
        jobs = list(sq.jobs)
        if jobs:
            self._waiting.pop(sq, None)
            sq.jobs.clear()
            self._size -= len(jobs)
        return jobs

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
        with self._lock:
            dropped, reason, queued = self._offer(job)
            if queued:
                self._work.notify()
        if dropped is not None:
            self.on_drop(dropped, reason)
        self._update_space(sq)
        return queued

    def _offer(self, job: Job) -> tuple[Job | None, str, bool]:
        """(lock held) -> (the job dropped, if any; why; whether `job` was queued)."""
        sq = job.stream
        if sq.closed or self._closed:
            return job, SHUTDOWN if self._closed else DISCONNECTED, False
        old = None
        if len(sq.jobs) >= sq.depth:
            if sq.lossless:  # the reader should have waited; never silently replace a lossless frame
                return job, QUEUE_FULL, False
            old = sq.jobs.popleft()
            self._size -= 1
        elif self._size >= self.max_queue:
            return job, QUEUE_FULL, False
        if not sq.jobs:
            if not sq.in_flight:  # it was idle: it starts sending again
                self.policy.rejoin(sq)
            self._waiting[sq] = None
        if sq.last_arrival is not None:
            gap = job.received - sq.last_arrival
            sq.period = gap if not sq.period else 0.8 * sq.period + 0.2 * gap
        sq.last_arrival = job.received
        sq.jobs.append(job)
        self._size += 1
        return old, SUPERSEDED, True

    # ------------------------------------------------------------------ consumers

    def done(self, job: Job, seconds: float | None) -> None:
        """A lane is finished with `job` after `seconds` of worker time (None: it failed before that
        was measured). Frees the lane share of its stream; must follow every take (any thread)."""
        with self._lock:
            self.policy.finish(job.stream, job.charged, seconds)
            if seconds is not None:
                self.service_time = seconds if not self.service_time else \
                    0.8 * self.service_time + 0.2 * seconds
            if job.stream.jobs:  # its waiting frame may be taken now
                self._work.notify()

    def _interval(self) -> float:
        """Seconds between two frames finishing when every lane is busy."""
        return self.service_time / max(1, self.lanes)

    @staticmethod
    def _sending(sq: StreamQueue, now: float) -> bool:
        """Still sending at its usual rate (the end of a burst is not)."""
        return sq.period > 0.0 and sq.last_arrival is not None and now - sq.last_arrival <= 2.0 * sq.period

    def _load(self, now: float) -> float:
        """Offered load: the arrival rate of the streams still sending x the completion interval."""
        return sum(1.0 / sq.period for sq in self.streams.values() if self._sending(sq, now)) * self._interval()

    def busy(self) -> bool:
        """Frames are waiting, or arriving often enough that one is likely to come during the next
        inference (any thread; the detector's choice of compiled model, see BUSY_LOAD)."""
        if self._size:
            return True
        with self._lock:
            return bool(self.service_time) and self._load(self.clock()) > BUSY_LOAD

    def take(self) -> Job | None:
        """Next job (policy.FairShare), dropping stale ones on the way; None if no stream may be served.
        Give it back with `done`."""
        with self._lock:
            job, effects = self._take()
        self._apply(effects)
        return job

    def wait_take(self, timeout: float | None = None) -> Job | None:
        """For a lane thread: the next job, waiting for one if none is queued. None once the scheduler
        is closed (or after `timeout` seconds without work)."""
        job: Job | None = None
        effects: list[Effect] = []
        with self._work:
            while not self._closed:
                job, effects = self._take()
                if job is not None:
                    break
                # Before sleeping: a stale drop's notice must not wait for the next frame to arrive.
                self._apply(effects)
                effects = []
                if not self._work.wait(timeout):
                    break
        self._apply(effects)
        return job

    def _take(self) -> tuple[Job | None, list[Effect]]:
        """(lock held) -> (the job, or None; the effects to apply outside the lock)."""
        effects: list[Effect] = []
        now = self.clock()
        while (sq := self.policy.pick(self._waiting, len(self.streams))) is not None:
            job = sq.jobs.popleft()
            self._size -= 1
            if not sq.jobs:
                del self._waiting[sq]
            if self._lossless:  # only lossless readers wait for space
                effects.append((self._freed, (sq,)))
            if stale(sq.lossless, now - job.received, self.max_age):
                effects.append((self.on_drop, (job, STALE)))
                continue
            job.charged = self.policy.start(sq, self.service_time)
            return job, effects
        return None, effects

    def _apply(self, effects: list[Effect]) -> None:
        for fn, args in effects:
            self.dispatch(fn, *args)

    def close(self, reason: str = SHUTDOWN) -> int:
        """Stop handing out work; every waiting frame is dropped with `reason`. Returns how many."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            streams = list(self.streams.values())
            jobs = [job for sq in streams for job in self._discard(sq)]
        for sq in streams:
            sq.space.set()
        for job in jobs:
            self.on_drop(job, reason)
        return len(jobs)

    # ------------------------------------------------------------------ internals

    # Event loop only (a lane's take dispatches them there): asyncio events are not thread-safe.

    def _update_space(self, sq: StreamQueue) -> None:
        if self.has_space(sq):
            sq.space.set()
        else:
            sq.space.clear()

    def _freed(self, sq: StreamQueue) -> None:
        """A frame of `sq` left the queue: its reader, or one held back by the global cap, may go on."""
        self._update_space(sq)
        if self._size < self.max_queue:
            self._wake_lossless()

    def _wake_lossless(self) -> None:
        # Only lossless readers block; the global cap freeing up may unblock any of them.
        for sq in self._blocked:  # usually empty: take() pays nothing per stream
            if not sq.space.is_set() and self.has_space(sq):
                sq.space.set()
