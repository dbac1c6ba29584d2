"""One TCP client: read and validate messages, hand frames to the scheduler, write replies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .api import token_ok
from .errors import InvalidMessage, ProtocolError
from .protocol import (
    FrameDecoder,
    Hello,
    Ping,
    dropped_msg,
    encode,
    error_msg,
    parse_client_message,
    welcome_msg,
)
from .scheduler import Job, StreamQueue

if TYPE_CHECKING:
    from .app import InferenceServer

log = logging.getLogger("visionstream.ingest")
READ_CHUNK = 1 << 18


class ClientConnection:
    """Owns one socket. Replies are written straight to the transport; a client whose unread
    replies pass `send_buffer` bytes is disconnected instead of buffering without limit."""

    def __init__(self, server: InferenceServer, key: int, reader: asyncio.StreamReader,
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
        """Hard close (no flush); the read loop notices and cleans up."""
        self.closed = True
        self.writer.transport.abort()

    @property
    def name(self) -> str | None:
        return self.stream.name if self.stream else None

    # ------------------------------------------------------------------ input

    async def run(self) -> None:
        decoder = FrameDecoder(self.cfg.max_frame_bytes)
        loop = asyncio.get_running_loop()
        # A complete message resets the deadline; trickling bytes of one message do not (slowloris).
        deadline = loop.time() + self.cfg.read_timeout
        try:
            while not self.closed:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
                except TimeoutError:
                    what = "sent half a message" if decoder.pending_bytes else "sent nothing"
                    self.send_error(ProtocolError(
                        f"connection {what} for {self.cfg.read_timeout:g}s; closing", code="timeout"))
                    break
                if not data:
                    break
                try:
                    items = decoder.feed(data)
                except ProtocolError as exc:  # fatal framing error: stream position is lost
                    self.send_error(exc)
                    break
                for item in items:
                    if isinstance(item, ProtocolError):
                        self.send_error(item)
                        continue
                    if not await self._handle(item):
                        return
                    if self.closed:
                        return
                if items:
                    deadline = loop.time() + self.cfg.read_timeout
        except (ConnectionError, OSError):
            pass

    async def _handle(self, raw: dict[str, Any]) -> bool:
        """Handle one message; False closes the connection."""
        try:
            msg = parse_client_message(raw)
        except InvalidMessage as exc:
            self._reject(raw, exc)
            return True
        if isinstance(msg, Hello):
            return self._hello(msg)
        if isinstance(msg, Ping):
            self.send({"type": "pong", "id": msg.id})
            return True
        # a Frame
        if not self.authed:
            self.send_error(ProtocolError("this server needs a hello with a valid token before frames",
                                          code="auth_required"))
            return False
        if self.stream is None:
            self._open_stream(msg.stream_name, drop=True)
        elif msg.stream_name != self.stream.name:
            self._reject(raw, InvalidMessage(
                f"this connection carries stream '{self.stream.name}', not '{msg.stream_name}'",
                code="stream_mismatch"))
            return True
        sq = self.stream
        srv = self.server
        srv.stats.frame_received(self.key)
        srv.scheduler.offer(Job(sq, msg, time.perf_counter()))
        if sq.lossless and not srv.scheduler.has_space(sq):
            await srv.scheduler.wait_space(sq)  # stop reading this socket: backpressure
        return True

    def _reject(self, raw: dict[str, Any], exc: InvalidMessage) -> None:
        """A frame that cannot be used still gets its answer: a drop notice saying why."""
        fid = raw.get("frame_id")
        if raw.get("type") == "frame" and isinstance(fid, int) and not isinstance(fid, bool):
            srv = self.server
            srv.stats.frame_received(self.key)
            srv.stats.frame_dropped(self.key, "invalid")
            srv.stats.error(exc.code)
            name = raw.get("stream_name")
            self.send({**dropped_msg(name if isinstance(name, str) else "", fid, "invalid"),
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

    def cleanup(self) -> None:
        """Forget the stream: waiting frames are counted as discarded, never processed for nobody."""
        self.closed = True
        srv = self.server
        if self.stream is not None:
            n = srv.scheduler.remove_stream(self.key)
            srv.stats.stream_closed(self.key)
            log.info("stream %s closed (%d waiting frames discarded)", self.stream.name, n)
        if not self.writer.transport.is_closing():
            self.writer.close()
