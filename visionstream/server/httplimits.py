"""Limits of the HTTP listener: a connection cap, a deadline to send a request, a bound on its head."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from visionstream.server.stats import Stats

log = logging.getLogger("visionstream.server.http")

# The request line and headers together. Ours are a few hundred bytes; nginx refuses beyond 32 KiB.
# Counted per read, so the true bound is this plus one read (256 KiB at most).
MAX_HTTP_HEAD_BYTES: Final = 64 * 1024
# Events of one kind logged at most once per this many seconds; the rest are summed in the next line.
BURST_LOG_INTERVAL: Final = 10.0


def _response(status: bytes, message: str) -> bytes:
    body = message.encode() + b"\n"
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class BurstLog:
    """Logs the first event of each kind at once, then one summary line per interval while they go on."""

    def __init__(self, logger: logging.Logger, interval: float = BURST_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._quiet_until: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._flush_at: float | None = None

    def note(self, what: str, first_line: str) -> None:
        """`what` names the kind in summaries ("connections refused"); `first_line` opens its burst."""
        now = self.clock()
        if now >= self._quiet_until.get(what, 0.0) and what not in self._held:
            self.logger.warning("%s (more within %gs are summed in one line)", first_line, self.interval)
            self._quiet_until[what] = now + self.interval
            return
        self._held[what] = self._held.get(what, 0) + 1
        if self._flush_at is None:
            self._flush_at = self._quiet_until[what]
            try:
                asyncio.get_running_loop().call_later(max(0.0, self._flush_at - now), self.flush)
            except RuntimeError:  # no running loop: flushed by the next note after the interval
                self._flush_at = None
                if now >= self._quiet_until[what]:
                    self.flush()

    def flush(self) -> None:
        self._flush_at = None
        if self._held:
            self.logger.warning("listeners, last %gs: %s", self.interval,
                                ", ".join(f"{n} {what}" for what, n in self._held.items()))
            until = self.clock() + self.interval
            for what in self._held:
                self._quiet_until[what] = until
            self._held.clear()


@dataclass(frozen=True)
class HttpLimits:
    max_clients: int  # open sockets on the HTTP port, /ws viewers included
    request_timeout: float  # seconds from connecting (or a request's first byte) to its last byte
    max_head_bytes: int = MAX_HTTP_HEAD_BYTES


class HttpGuard:
    """What every HTTP connection of one listener shares: the limits, the idle connections, the counts."""

    def __init__(self, limits: HttpLimits, stats: Stats, burst: BurstLog | None = None) -> None:
        self.limits = limits
        self.stats = stats
        self.burst = burst or BurstLog(log)
        # Connections waiting for a request head, oldest first: the ones a newcomer may displace.
        self.idle: dict[LimitedHttpProtocol, None] = {}

    def event(self, code: str, what: str, first_line: str) -> None:
        self.stats.error(code)
        self.burst.note(what, first_line)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the listener's limits (`guard` is set by `http_protocol`).

    At the cap a newcomer displaces the oldest connection that has no request in progress (silent,
    half-sent or idle keep-alive), so a flood of idle sockets cannot lock out a probe of /health; when
    every seat is busy serving a request or a /ws viewer, the newcomer gets 503 and is closed.
    """

    guard: HttpGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._in_head = True
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    # -- admission

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        cap = guard.limits.max_clients
        if len(self.connections) >= cap and guard.idle:
            victim = next(iter(guard.idle))
            victim._close("http_evicted", "idle connections displaced",
                          f"HTTP listener at its limit of {cap} connections (--max-http-clients): "
                          f"closing the oldest idle one to admit a newcomer")
        if len(self.connections) >= cap:
            self._refused = True
            guard.event("too_many_http_clients", "connections refused",
                        f"HTTP listener at its limit of {cap} connections (--max-http-clients), all busy: "
                        f"refusing newcomers with 503")
            transport.write(_response(b"503 Service Unavailable",
                                      f"server is at its limit of {cap} HTTP connections"))
            transport.close()
            return
        super().connection_made(transport)
        guard.idle[self] = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        self.guard.idle.pop(self, None)
        super().connection_lost(exc)

    # -- the request's deadline and the size of its head

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.guard.limits.request_timeout, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        timeout = self.guard.limits.request_timeout
        self._close("http_timeout", "requests timed out",
                    f"HTTP client sent no complete request within {timeout:g}s (--http-timeout): closing it",
                    b"408 Request Timeout", f"no complete request within {timeout:g}s")

    def _close(self, code: str, what: str, first_line: str, status: bytes | None = None, message: str = "") -> None:
        self.guard.idle.pop(self, None)
        self.connections.discard(self)  # its seat is free now, not when the loop reports the close
        self.guard.event(code, what, first_line)
        if self.transport.is_closing():
            return
        # An answer only where no response is under way, i.e. while waiting for a request's head.
        if status is not None and self._in_head and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_response(status, message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        limit = self.guard.limits.max_head_bytes
        if self._in_head and self._head_bytes > limit and not self.transport.is_closing():
            self._close("http_header_too_large", "request heads too large",
                        f"HTTP request head beyond {limit} bytes: answering 431 and closing",
                        b"431 Request Header Fields Too Large", f"request head beyond {limit} bytes")

    # -- parser callbacks: where a request starts, where its head ends, where it ends

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self.guard.idle.pop(self, None)  # a request is being served: no longer a candidate to displace
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self._in_head:
            self.guard.idle[self] = None  # keep-alive: uvicorn's keep-alive timeout (5 s) closes it

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        self.guard.idle.pop(self, None)
        super().handle_websocket_upgrade()


def http_protocol(guard: HttpGuard) -> type[LimitedHttpProtocol]:
    """A protocol class bound to `guard`, for uvicorn.Config(http=...)."""

    class Bound(LimitedHttpProtocol):
        pass

    Bound.guard = guard
    return Bound
