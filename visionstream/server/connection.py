"""One TCP client: read and validate messages, hand frames to the scheduler, write replies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from visionstream.server.auth import token_ok
from visionstream.server.scheduler import Job, StreamQueue
from visionstream.server.state import ServerState
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


class ClientConnection:
    """Owns one socket. Replies are written straight to the transport; a client whose unread
    replies pass `send_buffer` bytes is disconnected instead of buffering without limit."""

    def __init__(self, server: ServerState, key: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.cfg = server.config
        self.key = key
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.stream: StreamQueue | None = None
        self.authed = server.config.token is None
        self.closed = False
        self._stream_removed = False
        self._decoder = FrameDecoder(self.cfg.max_frame_bytes)
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
        # A complete message resets the deadline; trickling bytes of one message do not (slowloris).
        deadline = loop.time() + self.cfg.read_timeout
        try:
            while not self.closed:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
                except asyncio.TimeoutError:
                    what = "sent half a message" if self._decoder.pending_bytes else "sent nothing"
                    self.send_error(ProtocolError(
                        f"connection {what} for {self.cfg.read_timeout:g}s; closing", code="timeout"))
                    return
                if not data:
                    await self._answer_before_close(loop.time() + self.cfg.read_timeout)
                    return
                got = self._feed(data)
                if not await self._handle_backlog():
                    return
                if self.server.stopping:  # see server.InferenceServer._shutdown: a cancel may have been lost
                    return
                if got:  # after handling: waiting out backpressure is not the client being idle
                    deadline = loop.time() + self.cfg.read_timeout
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
            if not await self._handle_backlog():
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
                self._feed(data)
                if not await self._handle_backlog():
                    return
        except (ConnectionError, OSError):
            pass

    def _feed(self, data: bytes) -> int:
        """Decode bytes into the backlog; returns how many messages they completed."""
        try:
            items = self._decoder.feed(data)
        except ProtocolError as exc:  # e.g. frame_too_large: refused before its payload is read
            self._fatal = exc
            return 0
        self._backlog.extend(items)
        self._fatal = self._decoder.failed  # a bad header after these messages: answered after them
        return len(items)

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
            return self._hello(msg)
        if not self.authed:
            self.send_error(ProtocolError("this server needs a hello with a valid token first",
                                          code="auth_required"))
            log.warning("client %s refused: %s before hello", self.peer, raw.get("type"))
            return False
        if isinstance(msg, Ping):
            self.send({"type": "pong", "id": msg.id})
            return True
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
        srv.scheduler.offer(Job(sq, msg, time.perf_counter()))
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

    def _hello(self, hello: Hello) -> bool:
        if self.stream is not None:
            self.send_error(InvalidMessage("hello must be the first message", code="unexpected_hello"))
            return True
        if not token_ok(self.cfg.token, hello.token):
            self.send_error(ProtocolError("missing or wrong token", code="auth_failed"))
            log.warning("client %s refused: wrong token", self.peer)
            return False
        self.authed = True
        name = hello.stream_name or f"conn-{self.key}"
        self._open_stream(name, drop=hello.drop)
        srv = self.server
        self.send(welcome_msg(model=srv.stats.model, names=srv.names, stream_name=name, drop=hello.drop,
                              server="visionstream", imgsz=srv.imgsz, device=srv.config.device,
                              max_frame_bytes=self.cfg.max_frame_bytes))
        return True

    def _open_stream(self, name: str, *, drop: bool) -> None:
        srv = self.server
        self.stream = srv.scheduler.add_stream(self.key, name, lossless=not drop, owner=self)
        srv.stats.stream_opened(self.key, name, lossless=not drop)
        log.info("stream %s opened by %s (%s)", name, self.peer, "real-time" if drop else "lossless")

    def _remove_stream(self) -> None:
        """Forget the stream (once): waiting frames are counted as discarded, never processed for nobody."""
        if self.stream is None or self._stream_removed:
            return
        self._stream_removed = True
        n = self.server.scheduler.remove_stream(self.key)
        self.server.stats.stream_closed(self.key)
        log.info("stream %s closed (%d waiting frames discarded)", self.stream.name, n)

    def cleanup(self) -> None:
        self.closed = True
        self._remove_stream()
        if not self.writer.transport.is_closing():
            self.writer.close()


def _echo_name(name: Any) -> str:
    """The stream name to put in a drop notice: only a valid one is echoed back."""
    try:
        return validate_stream_name(name)
    except InvalidMessage:
        return ""
