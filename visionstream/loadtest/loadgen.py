"""Asyncio load generator: many paced camera streams, one TCP connection each, every reply accounted for."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import math
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionstream.client.connection import ClientError, Connection
from visionstream.client.pacing import next_due
from visionstream.measure import RateWindow, percentile

DEFAULT_ASSETS = ("bus.jpg", "zidane.jpg")


# --------------------------------------------------------------------------- frames


def parse_size(text: str) -> tuple[int, int] | None:
    """'640x480' -> (640, 480); 'native' -> None (keep the image's own size)."""
    if text.strip().lower() == "native":
        return None
    w_s, sep, h_s = text.lower().partition("x")
    try:
        w, h = int(w_s), int(h_s)
    except ValueError:
        raise ValueError(f"size must be WxH (e.g. 640x480) or 'native', got {text!r}") from None
    if not sep or not (8 <= w <= 8192 and 8 <= h <= 8192):
        raise ValueError(f"size must be WxH with sides 8-8192, got {text!r}")
    return w, h


def asset_path(name: str) -> Path:
    """A real photo shipped inside the ultralytics package (bus.jpg, zidane.jpg)."""
    # find_spec locates the package without importing it (importing ultralytics takes about a second).
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("ultralytics is not installed: pass --image or --synthetic")
    path = Path(spec.origin).parent / "assets" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --image or --synthetic")
    return path


@dataclass(frozen=True)
class FramePayload:
    """One pre-encoded frame: sent again and again so the client never competes with the server's CPU."""

    label: str
    data: bytes
    encoding: str  # "jpeg" or "raw"
    shape: tuple[int, int, int]  # (h, w, 3) of the decoded image

    def send_kwargs(self) -> dict[str, Any]:
        if self.encoding == "raw":
            return {"encoding": "raw", "shape": self.shape}
        return {"encoding": "jpeg"}


def load_bgr(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return img


def make_payload(
    img: np.ndarray, label: str, size: tuple[int, int] | None, *, encoding: str = "jpeg", quality: int = 90
) -> FramePayload:
    import cv2

    if size is not None and (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    img = np.ascontiguousarray(img)
    if encoding == "raw":
        return FramePayload(label, img.tobytes(), "raw", tuple(img.shape))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding of {label} failed")
    return FramePayload(label, buf.tobytes(), "jpeg", tuple(img.shape))


def prepare_payloads(
    *,
    image: Path | None = None,
    size: tuple[int, int] | None = (640, 480),
    synthetic: bool = False,
    encoding: str = "jpeg",
    quality: int = 90,
    seed: int = 0,
) -> list[FramePayload]:
    """The frames the streams cycle through, encoded once up front.

    Default: the two real photos shipped with ultralytics, so the server does real work (decode,
    NMS over real detections). `synthetic` gives uniform noise, which JPEG compresses badly and
    the model finds nothing in: a different, not a lighter, load.
    """
    if synthetic:
        w, h = size or (640, 480)
        rng = np.random.default_rng(seed)
        return [
            make_payload(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"noise-{i}", None,
                         encoding=encoding, quality=quality)
            for i in range(2)
        ]
    paths = [image] if image is not None else [asset_path(n) for n in DEFAULT_ASSETS]
    return [make_payload(load_bgr(p), p.name, size, encoding=encoding, quality=quality) for p in paths]


# --------------------------------------------------------------------------- load shape


class Phase(str, enum.Enum):
    """Where in its period each stream's first frame falls."""

    STAGGER = "stagger"  # stream k of n starts at k/n of its period: cameras spread evenly
    LOCKSTEP = "lockstep"  # every stream's slot i at the same instant: an NVR pushing all cameras per tick
    RANDOM = "random"  # each stream's offset uniform in [0, period): cameras switched on at random moments


def stream_rng(seed: int, k: int, purpose: int) -> np.random.Generator:
    """Stream k's own generator: (seed, k) fixes it, whatever the number of streams.

    `purpose` 0 draws the random phase, 1 the Poisson gaps, so switching the phase policy moves a
    stream's arrival pattern in time without changing it.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, k, purpose])


def phase_offset(phase: Phase | str, k: int, n: int, period: float, seed: int = 0) -> float:
    """Seconds from the run start to stream k of n's first frame, by the `phase` policy."""
    phase = Phase(phase)
    if not 0 <= k < n:
        raise ValueError(f"stream index {k} outside 0..{n - 1}")
    if phase is Phase.STAGGER:
        return (k / n) * period
    if phase is Phase.LOCKSTEP:
        return 0.0
    offset = float(stream_rng(seed, k, 0).random()) * period
    return min(offset, math.nextafter(period, 0.0))  # [0, period) even when the product rounds up


def send_times(
    phase: Phase | str, k: int, n: int, fps: float, duration: float, *, poisson: bool = False, seed: int = 0
) -> Iterator[float]:
    """Due times (seconds from the run start, ascending, all < duration) of stream k of n's frames.

    Periodic: offset + i / fps. Poisson: the first frame at the offset, then exponential gaps with
    mean 1 / fps, drawn from the stream's own seeded generator and summed up front, so the
    schedule is absolute (it does not move when a send is slow) and the same for the same seed.
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be > 0, got {fps}")
    period = 1.0 / fps
    offset = phase_offset(phase, k, n, period, seed)
    if not poisson:
        i = 0
        while (due := offset + i * period) < duration:
            yield due
            i += 1
        return
    rng = stream_rng(seed, k, 1)
    due = offset
    while True:
        for gap in rng.exponential(period, 256).tolist():
            if due >= duration:
                return
            yield due
            due += gap


# --------------------------------------------------------------------------- run bookkeeping


@dataclass(frozen=True)
class StreamSpec:
    name: str
    fps: float
    payload: FramePayload
    lossless: bool | None = None  # None: the generator's `drop`; True: hello drop=False; False: real-time


@dataclass(slots=True)
class FrameRecord:
    frame_id: int
    sent_at: float  # seconds since the run started (monotonic clock)
    answered_at: float | None = None
    outcome: str | None = None  # "result", "dropped", "error" or None while unanswered
    latency_ms: float | None = None  # client-side end-to-end: send() returned -> reply decoded
    reason: str | None = None
    server_latency_ms: float | None = None
    queue_ms: float | None = None
    decode_ms: float | None = None
    infer_ms: float | None = None
    detections: int | None = None


@dataclass
class StreamRun:
    spec: StreamSpec
    lossless: bool = False  # what this stream asked for in its hello (drop=False)
    records: dict[int, FrameRecord] = field(default_factory=dict)
    missed_slots: int = 0  # schedule slots skipped because the sender itself fell behind
    # Slots skipped because they came due while the sender was blocked in a send: the server had
    # stopped reading (a lossless stream's backpressure), not the load generator lagging.
    backpressure_slots: int = 0
    duplicate_replies: int = 0
    unexpected_replies: int = 0
    timestamp_mismatches: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    closed_by_server: bool = False
    failure: str | None = None
    welcome: dict[str, Any] | None = None
    pending: int = 0


@dataclass
class RunResult:
    streams: list[StreamRun]
    duration: float  # planned sending window, seconds
    send_window: float  # actual time from start to the last sender finishing
    started_wall: float
    grace_used: float
    warmup: float = 0.0
    interrupted: bool = False  # stopped early (Ctrl-C): the window is what was actually sent
    phase: Phase = Phase.STAGGER
    poisson: bool = False
    seed: int = 0


class LiveCounters:
    """Running totals for a progress display, updated as replies arrive."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.sent = 0
        self.results = 0
        self.drops = 0
        self.errors = 0
        self._recent = RateWindow(window)  # answered_at, with its latency_ms

    def add_result(self, t: float, latency_ms: float) -> None:
        self.results += 1
        self._recent.add(t, latency_ms)

    def recent(self, now: float) -> tuple[float, float | None]:
        """(results per second, p95 latency ms) over the last `window` seconds (`now` counts from
        the run start, so the first seconds are a shorter window)."""
        return self._recent.rate(now, since=0.0), percentile(self._recent.values(now), 95)


# --------------------------------------------------------------------------- the generator


class LoadGenerator:
    """Runs `specs` against one server for `duration` seconds, then waits up to `grace` for replies.

    Each stream sends on an absolute schedule (`send_times`: the `phase` offset plus i / fps, or
    plus exponential gaps with `poisson`), so a slow send does not shift later frames. A slot due
    one mean period ago or longer is skipped (counted) instead of sent late, like a camera whose
    frames nobody picked up; frames due within the last period go out at once, so a Poisson burst
    is sent back-to-back. Skipped slots that came due while the sender was blocked in a send (the
    server not reading: lossless backpressure) count as `backpressure_slots`, the rest as
    `missed_slots` (the load generator itself lagging).
    """

    def __init__(
        self,
        host: str,
        port: int,
        specs: Sequence[StreamSpec],
        *,
        token: str | None = None,
        drop: bool = True,
        phase: Phase = Phase.STAGGER,
        poisson: bool = False,
        seed: int = 0,
        connect_retries: int = 1,
        connect_timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not specs:
            raise ValueError("at least one stream is needed")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.host = host
        self.port = port
        self.specs = list(specs)
        self.token = token
        self.drop = drop
        self.phase = Phase(phase)
        self.poisson = poisson
        self.seed = seed
        self.connect_retries = connect_retries
        self.connect_timeout = connect_timeout
        self.tls = tls
        self.live = LiveCounters()
        self._t0 = 0.0
        self._wall0 = 0.0
        self._started = False
        self._conns: list[Connection] | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """End sending early (e.g. on Ctrl-C); outstanding replies are still waited for."""
        self._stop.set()

    def stream_drop(self, spec: StreamSpec) -> bool:
        """The hello's drop flag for `spec`: its own `lossless` choice, else the generator's `drop`."""
        return self.drop if spec.lossless is None else not spec.lossless

    def now(self) -> float:
        """Seconds since sending started (0 before)."""
        return time.perf_counter() - self._t0 if self._started else 0.0

    async def connect(self) -> list[Connection]:
        """Open and greet every stream's connection; raises ClientError on the first failure."""
        async def one(spec: StreamSpec) -> Connection:
            conn = await Connection.open(
                self.host, self.port, retries=self.connect_retries, timeout=self.connect_timeout, tls=self.tls
            )
            try:
                await conn.hello(spec.name, token=self.token, drop=self.stream_drop(spec))
            except (asyncio.TimeoutError, OSError, ConnectionError) as exc:
                await conn.close()
                raise ClientError(
                    f"no welcome from {self.host}:{self.port} for {spec.name}: {exc!r}"
                ) from exc
            except BaseException:
                await conn.close()
                raise
            return conn

        results = await asyncio.gather(*(one(s) for s in self.specs), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await asyncio.gather(*(c.close() for c in results if isinstance(c, Connection)))
            raise failure
        return list(results)  # type: ignore[arg-type]

    async def open(self) -> None:
        """Connect and greet all streams now (otherwise `run` does it); raises ClientError."""
        if self._conns is None:
            self._conns = await self.connect()

    async def run(self, duration: float, *, grace: float = 5.0, warmup: float = 0.0) -> RunResult:
        """Send for `duration` seconds, wait for outstanding replies, close every connection."""
        await self.open()
        conns, self._conns = self._conns, None
        assert conns is not None
        runs = [StreamRun(spec, lossless=not self.stream_drop(spec)) for spec in self.specs]
        for run, conn in zip(runs, conns, strict=True):
            run.welcome = conn.welcome
        # Frame timestamps are wall-clock (the protocol's), latencies monotonic: one anchor for both.
        self._wall0 = time.time()
        self._t0 = time.perf_counter()
        self._started = True
        receivers = [asyncio.create_task(self._receive(r, c)) for r, c in zip(runs, conns, strict=True)]
        n = len(runs)
        senders = [
            asyncio.create_task(self._send(r, c, send_times(self.phase, k, n, r.spec.fps, duration,
                                                            poisson=self.poisson, seed=self.seed)))
            for k, (r, c) in enumerate(zip(runs, conns, strict=True))
        ]
        try:
            await asyncio.gather(*senders)
            send_window = self.now()
            grace_start = time.perf_counter()
            while time.perf_counter() - grace_start < grace:
                if all(r.pending == 0 or r.closed_by_server for r in runs):
                    break
                await asyncio.sleep(0.02)
            grace_used = time.perf_counter() - grace_start
        finally:
            for task in senders + receivers:
                task.cancel()
            await asyncio.gather(*senders, *receivers, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        return RunResult(runs, duration, send_window, self._wall0, grace_used, warmup, self._stop.is_set(),
                         phase=self.phase, poisson=self.poisson, seed=self.seed)

    async def _send(self, run: StreamRun, conn: Connection, times: Iterable[float]) -> None:
        period = 1.0 / run.spec.fps  # the mean gap under Poisson
        payload = run.spec.payload
        kwargs = payload.send_kwargs()
        frame_id = 0
        # [start, end) of the last send: a send that returns at once leaves no slot inside; one that
        # waited for the server to read (TCP backpressure) explains the slots that came due meanwhile.
        blocked = (0.0, 0.0)
        slots = iter(times)
        try:
            while not self._stop.is_set():
                now = self.now()
                due, skipped = next_due(slots, now, period)
                for late in skipped:
                    if blocked[0] <= late < blocked[1]:
                        run.backpressure_slots += 1
                    else:
                        run.missed_slots += 1
                if due is None:
                    return
                delay = due - now
                if delay > 0:
                    try:  # sleeps until the slot is due, or wakes at once on stop()
                        await asyncio.wait_for(self._stop.wait(), delay)
                        return
                    except asyncio.TimeoutError:
                        pass
                if run.closed_by_server:
                    return
                rec = FrameRecord(frame_id, self.now())
                run.records[frame_id] = rec
                run.pending += 1
                self.live.sent += 1
                await conn.send_frame(run.spec.name, frame_id, payload.data,
                                      timestamp=self._wall0 + rec.sent_at, **kwargs)
                blocked = (rec.sent_at, self.now())
                frame_id += 1
        except (ConnectionError, OSError) as exc:
            run.closed_by_server = True
            run.failure = f"send failed: {exc!r}"

    async def _receive(self, run: StreamRun, conn: Connection) -> None:
        try:
            while True:
                msg = await conn.recv()
                if msg is None:
                    run.closed_by_server = True
                    return
                self._account(run, msg)
        except (ClientError, ConnectionError, OSError) as exc:
            run.closed_by_server = True
            run.failure = f"receive failed: {exc}"

    def _account(self, run: StreamRun, msg: dict[str, Any]) -> None:
        t = self.now()
        kind = msg.get("type")
        if kind not in ("result", "dropped", "error"):
            return  # pong and future message types carry no per-frame outcome
        fid = msg.get("frame_id")
        rec = run.records.get(fid) if isinstance(fid, int) else None
        if kind == "error":
            run.errors.append({k: v for k, v in msg.items() if k != "type"})
            self.live.errors += 1
            if rec is None:
                return
        if rec is None:
            run.unexpected_replies += 1
            return
        if rec.outcome is not None:
            run.duplicate_replies += 1
            return
        rec.outcome = kind
        rec.answered_at = t
        run.pending -= 1
        if kind == "dropped":
            rec.reason = str(msg.get("reason"))
            self.live.drops += 1
        elif kind == "result":
            rec.latency_ms = (t - rec.sent_at) * 1000.0
            self.live.add_result(t, rec.latency_ms)
            ts = msg.get("timestamp")
            if not isinstance(ts, (int, float)) or abs(ts - (self._wall0 + rec.sent_at)) > 1e-6:
                run.timestamp_mismatches += 1
            lat = msg.get("latency_ms")
            rec.server_latency_ms = float(lat) if isinstance(lat, (int, float)) else None
            timings = msg.get("timings") or {}
            if isinstance(timings, dict):
                rec.queue_ms = _num(timings.get("queue_ms"))
                rec.decode_ms = _num(timings.get("decode_ms"))
                rec.infer_ms = _num(timings.get("infer_ms"))
            dets = msg.get("detections")
            rec.detections = len(dets) if isinstance(dets, list) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

