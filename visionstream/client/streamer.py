"""Client-side streaming loop: paced sending, result matching, JSONL results, reconnects and the summary."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from visionstream.client.connection import ClientError, Connection, connect
from visionstream.client.pacing import PacingSchedule, retry_delays
from visionstream.client.sources import FrameSource, SourceFrame, encode_frame
from visionstream.measure import percentile
from visionstream.wire.errors import HelloRefused, ServerUnreachable, VisionStreamError
from visionstream.wire.protocol import DEFAULT_MAX_FRAME_BYTES

log = logging.getLogger("visionstream.client")

# Reasons written for frames the server never answered.
LOST_WITH_CONNECTION = "connection_lost"
NO_REPLY = "no_reply"
# Room for the msgpack map around the image within the server's default message limit.
MAX_PAYLOAD = DEFAULT_MAX_FRAME_BYTES - 4096
# The `type` of the line that starts each run in a results file; readers counting frames skip it.
RUN_RECORD: Final = "run"
# Longest a single reconnect attempt may wait for the TCP connection (and the TLS handshake).
RECONNECT_ATTEMPT_TIMEOUT: Final = 5.0
# Refusals of hello that a restarting or busy server gives; any other (auth, say) would be given again.
RETRYABLE_REFUSALS: Final = frozenset({"too_many_clients", "shutdown", "evicted", "hello_timeout"})


# --------------------------------------------------------------------------- statistics


@dataclass
class ClientStreamStats:
    """Counts for one client run; every sent frame ends in exactly one of results, drops, lost or no_reply.

    (The server's own per-stream counters are `visionstream.server.stats.StreamStats`.)
    """

    stream: str = ""
    source: str = ""
    lossless: bool = False
    sent: int = 0
    results: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    lost: int = 0  # in flight when the connection dropped
    no_reply: int = 0  # still unanswered when the grace period ended
    e2e_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    detections: int = 0
    disconnects: int = 0
    reconnects: int = 0
    skipped_slots: int = 0  # pacing slips: the sender fell behind
    skipped_outage: int = 0  # send slots that passed while the server was unreachable
    outage_s: float = 0.0  # time without a connection, summed over the outages that ended in a reconnect
    source_reopens: int = 0  # a live source (URL) that dropped and was opened again
    skipped_source: int = 0  # send slots that passed while the live source was being reopened
    skipped_files: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False
    failure: str | None = None
    results_path: str | None = None
    grace_s: float = 0.0

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def unanswered(self) -> int:
        return self.lost + self.no_reply

    @property
    def balanced(self) -> bool:
        return self.sent == self.results + self.dropped + self.unanswered

    def latency(self, values: Sequence[float] | None = None) -> dict[str, float | None]:
        vals = self.e2e_ms if values is None else values
        return {f"p{q}": percentile(vals, q) for q in (50, 95, 99)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "source": self.source,
            "lossless": self.lossless,
            "sent": self.sent,
            "results": self.results,
            "dropped": self.dropped,
            "drops": dict(self.drops),
            "unanswered": self.unanswered,
            "lost": self.lost,
            "no_reply": self.no_reply,
            "e2e_ms": self.latency(),
            "server_latency_ms": self.latency(self.server_ms),
            "detections": self.detections,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "skipped_slots": self.skipped_slots,
            "skipped_outage": self.skipped_outage,
            "outage_s": round(self.outage_s, 3),
            "source_reopens": self.source_reopens,
            "skipped_source": self.skipped_source,
            "skipped_files": list(self.skipped_files),
            "elapsed_s": round(self.elapsed_s, 3),
            "interrupted": self.interrupted,
            "failure": self.failure,
            "results_path": self.results_path,
        }

    def format(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        mode = "lossless" if self.lossless else "real-time (drops allowed)"
        lines = [f"Summary for stream '{self.stream}' ({self.source}, {mode})"]
        rate = f" in {self.elapsed_s:.1f}s" if self.elapsed_s else ""
        lines.append(f"  frames sent:   {self.sent}{rate}")
        lines.append(f"  results:       {self.results} ({self.detections} detections)")
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.drops.items()))
        lines.append(f"  dropped:       {self.dropped}" + (f" ({reasons})" if reasons else ""))
        parts = []
        if self.lost:
            parts.append(f"{self.lost} lost with the connection")
        if self.no_reply:
            parts.append(f"{self.no_reply} without a reply after the {self.grace_s:g}s grace period")
        lines.append(f"  unanswered:    {self.unanswered}" + (f" ({'; '.join(parts)})" if parts else ""))
        e2e, srv = self.latency(), self.latency(self.server_ms)
        lines.append(
            f"  end-to-end ms: p50 {ms(e2e['p50'])}  p95 {ms(e2e['p95'])}  p99 {ms(e2e['p99'])}"
            f"  (n={len(self.e2e_ms)}, client clock, send -> result)"
        )
        if self.server_ms:
            lines.append(f"  server ms:     p50 {ms(srv['p50'])}  p95 {ms(srv['p95'])}  p99 {ms(srv['p99'])}")
        if self.disconnects:
            down = f" after {self.outage_s:.1f}s without a server in all" if self.reconnects else ""
            lines.append(
                f"  connection:    lost {self.disconnects} time(s), reconnected {self.reconnects} time(s){down}"
            )
        if self.skipped_outage:
            lines.append(f"  outage:        {self.skipped_outage} send slot(s) skipped during outage "
                         f"(the server was unreachable)")
        if self.source_reopens or self.skipped_source:
            lines.append(f"  source:        dropped and reopened {self.source_reopens} time(s); "
                         f"{self.skipped_source} send slot(s) skipped meanwhile")
        if self.skipped_slots:
            lines.append(f"  pacing:        {self.skipped_slots} send slot(s) skipped (sending fell behind)")
        if self.skipped_files:
            names = ", ".join(self.skipped_files[:5]) + (" ..." if len(self.skipped_files) > 5 else "")
            lines.append(f"  unreadable:    {len(self.skipped_files)} file(s) skipped: {names}")
        if self.results_path:
            lines.append(f"  results file:  {self.results_path}")
        if self.interrupted:
            lines.append("  stopped early by the user")
        if self.failure:
            lines.append(f"  failed:        {self.failure}")
        if not self.balanced:  # a bug in this module, never expected; say so rather than hide it
            lines.append("  WARNING: counts do not add up (sent != results + dropped + unanswered)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- results file


class ResultLog:
    """Appends one JSON object per line and flushes each, so a crash loses nothing already answered.

    With `overwrite` the file is emptied first (at the first line). The Streamer writes a `run` line
    (`run_record`) when a run first reaches the server; anything else that writes one run starts it
    the same way, so readers can tell runs apart and skip those lines when counting frames.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        # Opened on the first line, so a run that never reaches the server leaves no empty file behind.
        self._fh: TextIO | None = None
        self._closed = False

    def write(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise ValueError("result log is closed")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
            else:
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._fh.write(json.dumps(record, separators=(",", ":"), default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    # msgpack hands back bytes for bin fields; a results line should stay readable rather than fail.
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def run_record(*, started: float, stream_name: str, source: str, server: str, model: Any,
               **extra: Any) -> dict[str, Any]:
    """The line that starts a run in a results file: when (ISO 8601, UTC), what, to where, with which model.
    `source` must already be masked (no credentials from a URL)."""
    when = datetime.datetime.fromtimestamp(started, tz=datetime.timezone.utc).isoformat(timespec="milliseconds")
    return {"type": RUN_RECORD, "started": when, "stream_name": stream_name, "source": source,
            "server": server, "model": model, **extra}


def result_record(msg: dict[str, Any], pending: Pending | None, e2e_ms: float | None) -> dict[str, Any]:
    """The JSONL line for one server reply: the reply itself plus where the frame came from and e2e time."""
    record = dict(msg)
    if pending is not None:
        for key, value in pending.meta.items():
            record.setdefault(key, value)
    record["e2e_ms"] = None if e2e_ms is None else round(e2e_ms, 3)
    # Wall clock of the reply, or of giving up on a frame that never got one.
    record["received_at" if e2e_ms is not None else "given_up_at"] = round(time.time(), 6)
    return record


# --------------------------------------------------------------------------- streamer


@dataclass(slots=True)
class Pending:
    frame_id: int
    sent_mono: float
    timestamp: float
    meta: dict[str, Any]


@dataclass
class StreamConfig:
    host: str
    port: int
    stream: str
    fps: float = 10.0
    token: str | None = None
    lossless: bool = False
    encoding: str = "jpeg"
    quality: int = 80
    duration: float | None = None
    max_frames: int | None = None
    grace: float = 5.0
    connect_retries: int = 3  # the first connection only: attempts after the first, backoff from `backoff`
    reconnect_for: float = 60.0  # seconds to keep trying after losing the connection (0: no reconnect)
    reconnects: int | None = None  # outages to reconnect after in one run (None: no limit)
    backoff: float = 0.5
    status_every: float = 0.0  # seconds between console status lines; 0 = none
    tls: ssl.SSLContext | None = None  # None: plaintext


SentHook = Callable[[int, SourceFrame], None]
ReplyHook = Callable[[dict[str, Any], "Pending | None", "float | None"], None]


class Streamer:
    """Streams one source to the server: a paced sender and an independent receiver over one connection.

    Sending never waits for results (except for TCP backpressure in lossless mode, which is the point of
    lossless mode). A lost connection is re-established, trying with backoff for up to `reconnect_for`
    seconds (at most `reconnects` times when set); frames in flight at that moment are counted and logged
    as lost, and send slots that pass meanwhile as skipped during the outage.
    """

    def __init__(
        self,
        config: StreamConfig,
        source: FrameSource,
        *,
        results: ResultLog | None = None,
        on_sent: SentHook | None = None,
        on_reply: ReplyHook | None = None,
        progress: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = config
        self.source = source
        self.results = results
        self.on_sent = on_sent
        self.on_reply = on_reply
        self.progress = progress
        self.clock = clock
        self.stats = ClientStreamStats(
            stream=config.stream,
            source=source.describe(),
            lossless=config.lossless,
            results_path=str(results.path) if results else None,
            grace_s=config.grace,
        )
        self.welcome: dict[str, Any] | None = None
        self._pending: dict[int, Pending] = {}
        self._next_id = 0
        self._conn: Connection | None = None
        self._recv_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stop = False
        self._replaced: str | None = None  # the server said another connection took this stream name
        self._abort_grace = False
        self._last_status = 0.0
        self._lost_at: float | None = None  # when the current outage began

    # -- control, safe to call from signal handlers and UI callbacks on the loop thread

    def stop(self) -> None:
        """Stop sending; outstanding results are still awaited for the grace period."""
        self._stop = True
        self.stats.interrupted = True
        self.source.interrupt()  # a live source waiting to be reopened gives up at once
        self._changed.set()

    def interrupt(self) -> None:
        """First call: stop sending. Second call: stop waiting for outstanding results too."""
        if self._stop:
            self._abort_grace = True
        elif self._pending:
            log.warning("stopping; waiting up to %gs for %d outstanding result(s) (Ctrl-C again to skip)",
                        self.cfg.grace, len(self._pending))
        else:
            log.info("stopping")
        self.stop()

    def quit(self) -> None:
        """Stop now, without a grace period (e.g. the user closed the window)."""
        self._abort_grace = True
        self.stop()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # -- main entry

    async def run(self) -> ClientStreamStats:
        """Connect, stream until the source ends / duration / stop, wait for stragglers, return the stats.

        Raises ClientError if the first connection fails; later failures end up in `stats.failure`.
        """
        started = self._last_status = self.clock()
        started_wall = time.time()
        await self._open()
        cfg = self.cfg
        if self.results is not None:
            self.results.write(run_record(
                started=started_wall, stream_name=cfg.stream, source=self.source.describe(),
                server=f"{cfg.host}:{cfg.port}", model=(self.welcome or {}).get("model"),
                mode="lossless" if cfg.lossless else "real-time", fps=cfg.fps))
        log.info("streaming %s to %s:%d as '%s' at %g fps (%s; model %s)", self.source.describe(), cfg.host,
                 cfg.port, cfg.stream, cfg.fps, "lossless" if cfg.lossless else "real-time, drops allowed",
                 (self.welcome or {}).get("model", "?"))
        try:
            await self._send_loop()
            await self._grace()
        finally:
            self._finish()
            await self._close_conn()
            self.stats.elapsed_s = self.clock() - started
            skipped = getattr(self.source, "skipped", None)
            if skipped:
                self.stats.skipped_files = list(skipped)
            self.stats.source_reopens = self.source.reopens
            if self.source.failure and not self.stats.failure and not self._stop:
                self.stats.failure = self.source.failure
        return self.stats

    async def _open(self, *, retries: int | None = None, timeout: float = 5.0) -> None:
        cfg = self.cfg
        conn = await connect(
            cfg.host, cfg.port, cfg.stream, token=cfg.token, drop=not cfg.lossless,
            retries=cfg.connect_retries if retries is None else retries, backoff=cfg.backoff, tls=cfg.tls,
            timeout=timeout,
        )
        self.welcome = conn.welcome
        if conn.welcome and "drop" in conn.welcome and conn.welcome["drop"] == cfg.lossless:
            log.warning("server did not accept %s mode; it runs this stream with drop=%s",
                        "lossless" if cfg.lossless else "real-time", conn.welcome["drop"])
        self._conn = conn
        self._recv_task = asyncio.create_task(self._receive_loop(conn))

    async def _close_conn(self) -> None:
        conn, task = self._conn, self._recv_task
        self._conn, self._recv_task = None, None
        if conn is not None:
            await conn.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _reconnect(self) -> bool:
        """Replace a lost connection, trying with backoff for up to `reconnect_for` seconds from the loss;
        False when stopped meanwhile, or (with stats.failure set) when it is off, spent or hopeless."""
        await self._close_conn()
        cfg = self.cfg
        where = f"{cfg.host}:{cfg.port}"
        if self._replaced is not None:  # reconnecting would take the name back: two clients fighting over it
            self.stats.failure = (f"another connection took stream '{cfg.stream}' over "
                                  f"(stream_replaced: {self._replaced}); not reconnecting")
            return False
        if cfg.reconnect_for <= 0:
            self.stats.failure = f"connection to {where} lost (not reconnecting: --reconnect-for 0)"
            return False
        if cfg.reconnects is not None and self.stats.reconnects >= cfg.reconnects:
            self.stats.failure = f"connection lost and the reconnect budget ({cfg.reconnects}) is used up"
            return False
        lost_at = self._lost_at if self._lost_at is not None else self.clock()
        deadline = lost_at + cfg.reconnect_for
        log.warning("connection to %s lost; reconnecting for up to %gs", where, cfg.reconnect_for)
        delays = retry_delays()
        attempts = 0
        while not self._stop:
            attempts += 1
            try:
                await self._open(retries=0, timeout=max(0.5, min(RECONNECT_ATTEMPT_TIMEOUT,
                                                                 deadline - self.clock())))
                break
            except ServerUnreachable as exc:
                why = exc.reason
            except HelloRefused as exc:
                if exc.code not in RETRYABLE_REFUSALS:
                    self.stats.failure = f"connection lost and reconnecting failed: {exc}"
                    return False
                why = str(exc)
            except ClientError as exc:  # TLS, the wrong protocol: trying again would fail the same way
                self.stats.failure = f"connection lost and reconnecting failed: {exc}"
                return False
            delay = next(delays)
            if self.clock() + delay >= deadline:
                self.stats.failure = (f"connection to {where} lost and not back within {cfg.reconnect_for:g}s "
                                      f"({attempts} attempts; last: {why})")
                return False
            log.debug("reconnect attempt %d failed (%s); next in %.2fs", attempts, why, delay)
            await self._pause(delay)
        else:
            return False
        outage = self.clock() - lost_at
        self._lost_at = None
        self.stats.reconnects += 1
        self.stats.outage_s += outage
        log.warning("reconnected after %.1f s (%d attempt(s))", outage, attempts)
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop()."""
        self._changed.clear()
        if self._stop:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    # -- sending

    async def _sleep_until(self, when: float) -> None:
        while not self._stop and self._conn is not None:
            delay = when - self.clock()
            if delay <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)

    def _read_and_encode(self) -> tuple[SourceFrame, bytes, str | None, tuple[int, int, int] | None] | None:
        frame = self.source.read()
        if frame is None:
            return None
        payload, encoding, shape = encode_frame(frame.image, self.cfg.encoding, self.cfg.quality)
        if len(payload) > MAX_PAYLOAD:
            # The server would close the connection on the oversized length prefix; say why here instead.
            raise ClientError(f"a {frame.image.shape[1]}x{frame.image.shape[0]} frame is {len(payload)} bytes "
                              f"as {self.cfg.encoding}, over the server's {DEFAULT_MAX_FRAME_BYTES} byte message "
                              f"limit (use --encoding jpeg or a smaller source)")
        return frame, payload, encoding, shape

    async def _send_loop(self) -> None:
        cfg = self.cfg
        sched = PacingSchedule(cfg.fps, self.clock())
        end = None if cfg.duration is None else sched.start + cfg.duration
        due = sched.due()
        while not self._stop:
            if end is not None and due >= end:
                break
            if cfg.max_frames is not None and self.stats.sent >= cfg.max_frames:
                break
            await self._sleep_until(due)
            if self._stop:
                break
            if self._conn is None:
                if not await self._reconnect():
                    break
                # The slots the outage took are not pacing slips: count them apart, then go on from now.
                due, skipped = sched.catch_up(self.clock())
                self.stats.skipped_outage += skipped
                continue
            reopens = self.source.reopens
            # Camera and file reads block; a thread keeps the receiver running meanwhile.
            item = await asyncio.to_thread(self._read_and_encode)
            if item is None:
                break
            if self.source.reopens != reopens:  # a live source dropped and came back during this read
                due, skipped = sched.catch_up(self.clock())
                self.stats.skipped_source += skipped
            frame, payload, encoding, shape = item
            conn = self._conn
            if conn is None:  # lost while reading; this frame was never sent
                if not await self._reconnect():
                    break
                self.stats.skipped_outage += sched.catch_up(self.clock())[1]
                conn = self._conn
                assert conn is not None
            frame_id = self._next_id
            self._next_id += 1
            ts = time.time()
            self._pending[frame_id] = Pending(frame_id, self.clock(), ts, frame.meta)
            self.stats.sent += 1
            if self.on_sent is not None:
                self.on_sent(frame_id, frame)
            try:
                await conn.send_frame(cfg.stream, frame_id, payload, encoding=encoding, shape=shape,
                                      timestamp=ts)
            except (OSError, ClientError) as exc:
                self._connection_lost(conn, f"send failed: {exc or type(exc).__name__}")
            if self.progress is not None:
                self.progress.update(1)
            self._maybe_status()
            due = sched.advance(self.clock())
        self.stats.skipped_slots = sched.skipped

    def _maybe_status(self) -> None:
        every = self.cfg.status_every
        if every <= 0:
            return
        now = self.clock()
        if now - self._last_status < every:
            return
        self._last_status = now
        st = self.stats
        p50 = percentile(st.e2e_ms[-200:], 50)
        log.info("sent %d, results %d, dropped %d, in flight %d, e2e p50 %s ms", st.sent, st.results,
                 st.dropped, len(self._pending), "-" if p50 is None else f"{p50:.0f}")

    # -- receiving

    async def _receive_loop(self, conn: Connection) -> None:
        reason = "server closed the connection"
        try:
            while True:
                msg = await conn.recv()
                if msg is None:
                    break
                self._handle(msg)
        except asyncio.CancelledError:
            raise
        except (OSError, VisionStreamError, asyncio.IncompleteReadError) as exc:
            # VisionStreamError also covers FrameTooLarge from the decoder: the byte stream is unusable.
            reason = f"{exc or type(exc).__name__}"
        self._connection_lost(conn, reason)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind in ("result", "dropped"):
            self._answer(msg)
        elif kind == "error":
            frame_id = msg.get("frame_id")
            if frame_id in self._pending:
                # An error about one frame is that frame's answer: count it as a drop with the code.
                self._answer({**msg, "type": "dropped", "reason": f"error:{msg.get('code')}"})
            else:
                log.warning("server error: %s: %s", msg.get("code"), msg.get("message"))
                if msg.get("code") == "stream_replaced":
                    self._replaced = str(msg.get("message", ""))
        elif kind == "pong":
            pass
        else:
            log.debug("ignoring server message of type %r", kind)

    def _answer(self, msg: dict[str, Any]) -> None:
        frame_id = msg.get("frame_id")
        pending = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
        if pending is None:
            log.debug("reply for unknown or already answered frame %r", frame_id)
            return
        e2e = (self.clock() - pending.sent_mono) * 1000.0
        if msg.get("type") == "result":
            self.stats.results += 1
            self.stats.e2e_ms.append(e2e)
            server_ms = msg.get("latency_ms")
            if isinstance(server_ms, (int, float)) and not isinstance(server_ms, bool):
                self.stats.server_ms.append(float(server_ms))
            dets = msg.get("detections")
            if isinstance(dets, list):
                self.stats.detections += len(dets)
        else:
            self.stats.drops[str(msg.get("reason", "unknown"))] += 1
        if self.results is not None:
            self.results.write(result_record(msg, pending, e2e))
        self._call_reply_hook(msg, pending, e2e)
        if self.progress is not None:
            self.progress.set_postfix(results=self.stats.results, dropped=self.stats.dropped, refresh=False)
        self._changed.set()

    def _call_reply_hook(self, msg: dict[str, Any], pending: Pending, e2e: float | None) -> None:
        if self.on_reply is None:
            return
        try:
            self.on_reply(msg, pending, e2e)
        except Exception:
            # A failing hook (say, drawing) must not kill the receiver, or every later reply would be lost.
            log.exception("reply handler failed for frame %s", msg.get("frame_id"))

    def _give_up_on(self, reason: str) -> int:
        """Record every pending frame as unanswered for `reason`; returns how many."""
        count = len(self._pending)
        for pending in self._pending.values():
            msg = {"type": "unanswered", "stream_name": self.cfg.stream, "frame_id": pending.frame_id,
                   "reason": reason, "timestamp": pending.timestamp}
            if self.results is not None:
                self.results.write(result_record(msg, pending, None))
            self._call_reply_hook(msg, pending, None)
        self._pending.clear()
        return count

    def _connection_lost(self, conn: Connection, reason: str) -> None:
        if conn is not self._conn:  # an old connection's receiver finishing late
            return
        lost = self._give_up_on(LOST_WITH_CONNECTION)
        self.stats.lost += lost
        self.stats.disconnects += 1
        log.warning("connection lost (%s); %d frame(s) in flight lost", reason, lost)
        self._conn = None
        self._lost_at = self.clock()
        self._changed.set()

    # -- the end

    async def _grace(self) -> None:
        deadline = self.clock() + self.cfg.grace
        while self._pending and self._conn is not None and not self._abort_grace:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _finish(self) -> None:
        self.stats.no_reply += self._give_up_on(NO_REPLY)

