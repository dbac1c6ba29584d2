"""One TCP client: read and validate messages, hand frames to the scheduler, write replies."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Any, Final

from visionstream.server.admission import Admission
from visionstream.server.auth import token_ok
from visionstream.server.ratelimit import TokenBucket
from visionstream.server.replies import Replies
from visionstream.server.scheduler import DISCONNECTED, REPLACED, Job, StreamQueue
from visionstream.server.state import ServerState
from visionstream.server.tracking import StreamTracker
from visionstream.wire.errors import InvalidMessage, ProtocolError
from visionstream.wire.protocol import (
    FrameDecoder,
    Hello,
    Ping,
    dropped_msg,
    encode,
    error_msg,
    parse_client_message,
    validate_stream_name,
    welcome_msg,
)

log = logging.getLogger("visionstream.ingest")
READ_CHUNK = 1 << 18
# On shutdown a socket counts as drained once it has been quiet this long: bytes a client sent
# before the signal are already in the socket buffer, so they arrive well within it on any LAN.
DRAIN_QUIET_S = 0.05
HALF_CLOSE_POLL_S = 0.005  # how often a half-closed connection checks whether its frames are all answered
# Messages one connection decodes and handles before the loop serves everyone else once: one read can
# hold 50,000 tiny messages, and handling them in one go would stall every other camera and /health.
TURN_MESSAGES: Final = 64
# Pings a connection may send (a token bucket): enough for keepalives and round-trip probes; each
# pong is a write, and a flood of them would be the loop's whole work.
PING_RATE: Final = 20.0  # a second, on average
PING_BURST: Final = 40
NOTICE_S: Final = 1.0  # refused pings are told in one `rate_limited` error at most this often
FLOOD_CLOSE: Final = 1000  # refused pings between two notices that close the connection (`flood`)
# A replaced connection: how long its frames in lanes (and what it sent before it learnt of the
# replacement) may take to be answered, and how long its last replies may take to flush.
REPLACE_GRACE_S: Final = 2.0
CLOSE_LINGER_S: Final = 1.0


class ClientConnection:
    """Owns one socket. Replies are written straight to the transport; a client whose unread
    replies pass `send_buffer` bytes is disconnected instead of buffering without limit."""

    def __init__(self, server: ServerState, key: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, admission: Admission, replies: Replies) -> None:
        self.server = server
        self.cfg = server.config
        self.key = key
        self.reader = reader
        self.writer = writer
        self.admission = admission
        self.replies = replies
        self.peer = writer.get_extra_info("peername")
        self.stream: StreamQueue | None = None
        self.authed = server.config.token is None
        # No seat yet: not past its hello (with a token) or its first valid message (without one).
        self.pending = True
        self.replaced = False  # a newer connection carries this stream now; see `replace`
        self.closed = False
        self.jobs: set[Job] = set()  # its frames not yet answered (replies.Replies keeps it)
        self.tracker: StreamTracker | None = None  # its stream's own (--track), from open to removal
        self._stream_removed = False
        self._decoder = FrameDecoder(self.cfg.max_frame_bytes)
        self._turn = 0  # messages handled since this reader last let the loop serve others
        self._more = False  # the decoder stopped at TURN_MESSAGES: it may hold more whole messages
        self._messages = 0  # complete messages received
        loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        self._pings = TokenBucket(PING_RATE, PING_BURST, loop.time)
        self._refused = 0  # pings refused since the last notice
        self._last_notice = -math.inf
        self._notice: asyncio.TimerHandle | None = None
        self._retiring: asyncio.Task | None = None
        # Decoded messages not yet handled; kept on the connection (not in a local) so that a reader
        # cancelled at shutdown leaves them for `drain`, which still answers each one.
        self._backlog: deque[dict[str, Any] | ProtocolError] = deque()
        self._fatal: ProtocolError | None = None  # framing lost: answered after the backlog, then close

    # ------------------------------------------------------------------ output

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.closed = True
            return
        self.writer.write(encode(msg))
        if transport.get_write_buffer_size() > self.cfg.send_buffer:
            log.warning("client %s (%s) stopped reading its results; disconnecting", self.peer, self.name)
            self.server.stats.error("slow_consumer")
            self.abort()

    def send_error(self, exc: ProtocolError) -> None:
        self.server.stats.error(exc.code)
        self.send(error_msg(exc.code, exc.message))

    def abort(self) -> None:
        """Hard close (no flush). The stream goes soon, not now: `send` (and so this) can run inside
        a scheduler callback, and the scheduler must not be changed under its own feet."""
        self.closed = True
        self.writer.transport.abort()
        asyncio.get_running_loop().call_soon(self._remove_stream)

    @property
    def name(self) -> str | None:
        return self.stream.name if self.stream else None

    # ------------------------------------------------------------------ input

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        # A complete message resets the deadline; trickling bytes of one message do not (slowloris).
        deadline = loop.time() + cfg.read_timeout
        hello_by = loop.time() + cfg.hello_timeout  # a fixed deadline: pending connections hold no seat
        try:
            while not self.closed:
                hello_due = self.pending and hello_by < deadline
                remaining = (hello_by if hello_due else deadline) - loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
                except asyncio.TimeoutError:
                    if hello_due:
                        what = "a hello with the token" if cfg.token else "a first message"
                        self.send_error(ProtocolError(
                            f"connection sent no {what} within {cfg.hello_timeout:g}s; closing", code="hello_timeout"))
                        return
                    if self.jobs and not self._decoder.pending_bytes:
                        # Frames of its own still wait or run: a client waiting for what the server owes
                        # it is not idle (a lock-step camera behind slow frames). Answers are bounded
                        # by --infer-timeout, so this cannot hold a seat forever.
                        deadline = loop.time() + cfg.read_timeout
                        continue
                    what = "sent half a message" if self._decoder.pending_bytes else "sent nothing"
                    self.send_error(ProtocolError(
                        f"connection {what} for {cfg.read_timeout:g}s; closing", code="timeout"))
                    return
                if not data:
                    await self._answer_before_close(loop.time() + cfg.read_timeout)
                    return
                self._last_input = loop.time()
                before = self._messages
                if not await self._pump(data):
                    return
                if self.server.stopping:  # see server.InferenceServer._shutdown: a cancel may have been lost
                    return
                if self._messages > before:  # after handling: waiting out backpressure is not the client being idle
                    deadline = loop.time() + cfg.read_timeout
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug must cost this one connection, never the server
            log.exception("client %s: unexpected error; closing its connection", self.peer)
            self.send_error(ProtocolError("internal server error", code="internal"))

    async def _answer_before_close(self, until: float) -> None:
        """The client closed its sending side. It may still be reading (a half-close after its last
        frame), so its frames still waiting or in inference get their answers before the connection
        goes; a client that is really gone makes the first reply fail, and the rest are discarded.
        Bounded by `until` (loop time), and by shutdown."""
        loop = asyncio.get_running_loop()
        st = self.server.stats.streams.get(self.key)
        transport = self.writer.transport
        while (st is not None and st.in_flight > 0 and not self.closed
               and not transport.is_closing() and not self.server.stopping and loop.time() < until):
            await asyncio.sleep(HALF_CLOSE_POLL_S)

    async def drain(self, until: float) -> None:
        """On shutdown, answer what this client already sent: the decoded backlog, then whatever its
        socket holds until it is quiet or `until` (loop time). The scheduler is closed by then, so
        every frame gets a 'shutdown' drop notice instead of vanishing unanswered."""
        loop = asyncio.get_running_loop()
        if self._fatal is not None:  # the byte stream was unusable; the client has its answer
            return
        try:
            if not await self._pump(b""):  # what the reader decoded, or had yet to, when it was stopped
                return
            while not self.closed:
                quiet = min(DRAIN_QUIET_S, until - loop.time())
                if quiet <= 0:
                    return
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), quiet)
                except asyncio.TimeoutError:
                    return
                if not data:
                    return
                if not await self._pump(data):
                    return
        except (ConnectionError, OSError):
            pass

    async def _pump(self, data: bytes) -> bool:
        """Decode and handle `data`, TURN_MESSAGES messages at a time with the loop serving everyone else
        in between; False once the connection must close."""
        self._feed(data)
        while True:
            if not await self._handle_backlog():
                return False
            if self._turn >= TURN_MESSAGES:
                self._turn = 0
                await asyncio.sleep(0)
                if self.closed:
                    return False
            if not self._more:
                return True
            self._feed(b"")

    def _feed(self, data: bytes) -> None:
        """Decode bytes into the backlog, no more messages than are left of this turn's budget."""
        room = max(1, TURN_MESSAGES - self._turn)
        try:
            items = self._decoder.feed(data, room)
        except ProtocolError as exc:  # e.g. frame_too_large: refused before its payload is read
            self._fatal = exc
            self._more = False
            return
        self._turn += len(items)
        self._messages += len(items)
        self._more = len(items) == room
        self._backlog.extend(items)
        self._fatal = self._decoder.failed  # a bad header after these messages: answered after them

    async def _handle_backlog(self) -> bool:
        """Handle decoded messages in order; False once the connection must close."""
        while self._backlog and not self.closed:
            item = self._backlog.popleft()  # popped first: a cancelled handler never sees it twice
            if isinstance(item, ProtocolError):
                self.send_error(item)
                if not self.authed:
                    return False  # an unknown peer gets one answer, not a validator to probe
                continue
            if not await self._handle(item):
                return False
        if self._fatal is not None and not self.closed:
            self.send_error(self._fatal)
            return False
        return not self.closed

    async def _handle(self, raw: dict[str, Any]) -> bool:
        """Handle one message; False closes the connection."""
        try:
            msg = parse_client_message(raw)
        except InvalidMessage as exc:
            self._reject(raw, exc)
            return self.authed
        if isinstance(msg, Hello):
            return self._hello(msg, raw)
        if not self.authed:
            self.send_error(ProtocolError("this server needs a hello with a valid token first",
                                          code="auth_required"))
            log.warning("client %s refused: %s before hello", self.peer, raw.get("type"))
            return False
        if self.pending and not self._take_seat(raw):
            return False
        if isinstance(msg, Ping):
            return self._ping(msg)
        # a Frame
        if self.stream is None:
            self._open_stream(msg.stream_name, drop=True)
        elif msg.stream_name != self.stream.name:
            self._reject(raw, InvalidMessage(
                f"this connection carries stream '{self.stream.name}', not '{msg.stream_name}'",
                code="stream_mismatch"))
            return True
        sq = self.stream
        assert sq is not None  # opened above
        srv = self.server
        srv.stats.frame_received(self.key)
        if self.replaced:  # read after a newer connection took the name: answered, never processed
            srv.stats.frame_dropped(self.key, REPLACED)
            self.send(dropped_msg(msg.stream_name, msg.frame_id, REPLACED))
            return True
        job = Job(sq, msg, time.perf_counter())
        self.jobs.add(job)
        srv.scheduler.offer(job)
        if sq.lossless and not srv.scheduler.has_space(sq):
            await srv.scheduler.wait_space(sq)  # stop reading this socket: backpressure
        return True

    def _reject(self, raw: dict[str, Any], exc: InvalidMessage) -> None:
        """A frame that cannot be used still gets its answer: a drop notice saying why."""
        fid = raw.get("frame_id")
        if self.authed and raw.get("type") == "frame" and isinstance(fid, int) and not isinstance(fid, bool):
            srv = self.server
            srv.stats.frame_received(self.key)
            srv.stats.frame_dropped(self.key, "invalid")
            srv.stats.error(exc.code)
            self.send({**dropped_msg(_echo_name(raw.get("stream_name")), fid, "invalid"),
                       "code": exc.code, "message": exc.message})
        else:
            self.send_error(exc)

    def _hello(self, hello: Hello, raw: dict[str, Any]) -> bool:
        if self.stream is not None:
            self.send_error(InvalidMessage("hello must be the first message", code="unexpected_hello"))
            return True
        if not token_ok(self.cfg.token, hello.token):
            self.send_error(ProtocolError("missing or wrong token", code="auth_failed"))
            log.warning("client %s refused: wrong token", self.peer)
            return False
        self.authed = True
        if self.pending and not self._take_seat(raw):
            return False
        name = hello.stream_name or f"conn-{self.key}"
        self._open_stream(name, drop=hello.drop)
        srv = self.server
        tracking = {} if srv.tracker is None else {"tracking": srv.tracker.kind.value}
        self.send(welcome_msg(model=srv.stats.model, names=srv.names, stream_name=name, drop=hello.drop,
                              server="visionstream", imgsz=srv.imgsz, device=srv.config.device,
                              max_frame_bytes=self.cfg.max_frame_bytes, **tracking))
        return True

    def _take_seat(self, raw: dict[str, Any]) -> bool:
        """Past its hello (or first message): one of the --max-clients seats, or a refusal."""
        if self.admission.seat(self):
            self.pending = False
            return True
        message = f"server is at its limit of {self.cfg.max_clients} clients"
        if raw.get("type") == "frame":  # the frame that asked for the seat still gets its answer
            self._reject(raw, InvalidMessage(message, code="too_many_clients"))
            self.send(error_msg("too_many_clients", message))
        else:
            self.send_error(ProtocolError(message, code="too_many_clients"))
        return False

    def _ping(self, ping: Ping) -> bool:
        """A pong, or when pings come faster than PING_RATE a count in the next `rate_limited` notice."""
        if self._pings.take():
            self.send({"type": "pong", "id": ping.id})
            return True
        self.server.stats.error("rate_limited")
        self._refused += 1
        if self._refused > FLOOD_CLOSE:
            self._notify_refused()
            self.send_error(ProtocolError(f"more than {FLOOD_CLOSE} pings refused within {NOTICE_S:g}s; closing",
                                          code="flood"))
            log.warning("client %s (%s) closed: ping flood", self.peer, self.name)
            return False
        if self._notice is None:
            loop = asyncio.get_running_loop()
            self._notice = loop.call_later(max(0.0, self._last_notice + NOTICE_S - loop.time()),
                                           self._notify_refused)
        return True

    def _notify_refused(self) -> None:
        """One error for every ping refused since the last one (each is counted as `rate_limited`)."""
        if self._notice is not None:
            self._notice.cancel()
            self._notice = None
        n, self._refused = self._refused, 0
        if n:
            self._last_notice = asyncio.get_running_loop().time()
            self.send({**error_msg("rate_limited", f"{n} ping(s) refused: at most {PING_RATE:g} a second, "
                                                   f"in bursts of up to {PING_BURST}"), "refused": n})

    def _open_stream(self, name: str, *, drop: bool) -> None:
        srv = self.server
        self.admission.claim(name, self)  # a connection carrying this name already is replaced first
        if srv.tracker is not None:  # a fresh tracker per stream: a replacement or a reconnect starts anew
            self.tracker = StreamTracker(srv.tracker, srv.names)
        self.stream = srv.scheduler.add_stream(self.key, name, lossless=not drop, owner=self)
        srv.stats.stream_opened(self.key, name, lossless=not drop)
        log.info("stream %s opened by %s (%s)", name, self.peer, "real-time" if drop else "lossless")

    def _remove_stream(self, reason: str = DISCONNECTED) -> None:
        """Forget the stream (once): its waiting frames are dropped with `reason` (counted as discarded
        when the client is gone), never processed for nobody."""
        if self.stream is None or self._stream_removed:
            return
        self._stream_removed = True
        if self.tracker is not None:  # its frames still in lanes are answered with track_id null
            self.tracker.close()
        n = self.server.scheduler.remove_stream(self.key, reason)
        self.server.stats.stream_closed(self.key)
        log.info("stream %s closed (%d waiting frames %s)", self.stream.name, n, reason)

    # ------------------------------------------------------------------ admission (admission.Admission)

    def evict(self) -> None:
        """Too many connections wait to say hello and this one has waited longest."""
        self.send_error(ProtocolError(f"more than {self.cfg.max_pending} connections are waiting to say hello "
                                      f"and this one waited longest; closing", code="evicted"))
        self._close_soon()

    def replace(self) -> None:
        """A newer connection took this stream's name: waiting frames are answered `replaced` now, frames in
        lanes get their results here (and not on /ws, where the name is the newer connection's), then an
        error `stream_replaced` and the close (`_retire`)."""
        if self.replaced or self.stream is None:
            return
        self.replaced = True
        log.warning("stream %s: a newer connection took its name; closing %s", self.stream.name, self.peer)
        self._remove_stream(REPLACED)
        self._retiring = asyncio.create_task(self._retire(), name=f"retire-{self.key}")

    async def _retire(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + REPLACE_GRACE_S
        # What the client sent before it learnt of the replacement is read and answered until it is quiet.
        while (self.jobs or loop.time() - self._last_input < DRAIN_QUIET_S) and loop.time() < until \
                and not self.closed and not self.server.stopping:
            await asyncio.sleep(HALF_CLOSE_POLL_S)
        if self.closed or self.server.stopping:  # gone, or shutdown answers it
            return
        for job in list(self.jobs):  # still in a lane after the grace: dropped now, its result ignored
            self.replies.abandon(job, REPLACED)
        assert self.stream is not None
        self.send_error(ProtocolError(f"a newer connection carries stream '{self.stream.name}' now; closing",
                                      code="stream_replaced"))
        self._close_soon()

    def _close_soon(self) -> None:
        """Flush what was sent and close; a peer that does not take it is cut off after CLOSE_LINGER_S."""
        self.closed = True
        transport = self.writer.transport
        if not transport.is_closing():
            self.writer.close()
        asyncio.get_running_loop().call_later(CLOSE_LINGER_S, transport.abort)

    def cleanup(self) -> None:
        self.closed = True
        self._remove_stream()
        self.admission.release(self, self.name)
        if self._notice is not None:
            self._notice.cancel()
            self._notice = None
        if not self.writer.transport.is_closing():
            self.writer.close()


def _echo_name(name: Any) -> str:
    """The stream name to put in a drop notice: only a valid one is echoed back."""
    try:
        return validate_stream_name(name)
    except InvalidMessage:
        return ""
