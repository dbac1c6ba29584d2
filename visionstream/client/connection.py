"""Shared asyncio client connection: connect with retries, hello/welcome, send frames, read replies."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Final

from visionstream.client.tls import describe_tls_error, speaks_tls
from visionstream.wire.errors import ClientError, HelloRefused, ServerUnreachable, WrongPort
from visionstream.wire.protocol import (
    CLIENT_LIMITS,
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    encode,
    frame_msg,
    hello_msg,
)

log = logging.getLogger("visionstream.client")

# What an HTTP server's answer starts with; read as a length prefix it would be 1213486160 bytes.
HTTP_ANSWER: Final = b"HTTP/"
# The welcome's model name when the server runs without a real model.
PLACEHOLDER_MODEL: Final = "placeholder"
# Addresses already warned about placeholder mode in this process (reconnects and many streams warn once).
_placeholder_warned: set[str] = set()


class Connection:
    """One TCP connection to the server speaking protocol v1.

    `send_frame` never waits on results; `recv` yields decoded server messages in order.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, host: str = "",
                 port: int = 0) -> None:
        self.reader = reader
        self.writer = writer
        self.host, self.port = host, port
        self.tls = writer.get_extra_info("ssl_object") is not None
        self._received = False  # any byte from the server yet (a silent close may mean it wants TLS)
        self._head: bytes | None = b""  # the first bytes, until they tell an HTTP answer apart (then None)
        self._decoder = FrameDecoder(max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, limits=CLIENT_LIMITS)
        self._pending: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> Connection:
        """Connect (over TLS with `tls`), retrying with exponential backoff; raises ClientError after the
        last try, or at once when the TLS handshake fails (trying again would fail the same way)."""
        last: Exception | None = None
        for attempt in range(retries + 1):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None,
                                            ssl_handshake_timeout=timeout if tls else None), timeout)
                return cls(reader, writer, host=host, port=port)
            except ssl.SSLError as exc:
                if not isinstance(exc, ssl.SSLEOFError):  # closed mid-handshake (a busy server): try again
                    raise ClientError(describe_tls_error(exc, f"{host}:{port}", ca=_has_private_ca(tls))) from None
                last = exc
                if attempt < retries:
                    await asyncio.sleep(backoff * 2**attempt)
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
                if attempt < retries:
                    await asyncio.sleep(backoff * 2**attempt)
        why = str(last) or type(last).__name__
        if tls is not None and isinstance(last, (ssl.SSLEOFError, ConnectionResetError)):
            why += ": closed during the TLS handshake (the server may be at its limit of handshakes in progress)"
        raise ServerUnreachable(f"server {host}:{port} not reachable after {retries + 1} attempts ({why})",
                                address=f"{host}:{port}", reason=why)

    async def hello(self, stream_name: str, *, token: str | None = None, drop: bool = True,
                    timeout: float = 10.0) -> dict[str, Any]:
        """Send hello and wait for welcome; raises ClientError on an error reply (e.g. auth)."""
        try:
            await self.send(hello_msg(stream_name, token=token, drop=drop))
            msg = await asyncio.wait_for(self.recv(), timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"no welcome from the server within {timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self._explain_silent_close()
            why = f"{exc or type(exc).__name__}"
            raise ServerUnreachable(f"connection lost during hello ({why})", address=self.address,
                                    reason=why) from exc
        if msg is None:
            await self._explain_silent_close()
            raise ServerUnreachable("server closed the connection during hello", address=self.address,
                                    reason="closed during hello")
        if msg.get("type") == "error":
            code = str(msg.get("code"))
            raise HelloRefused(f"server refused hello: {code}: {msg.get('message')}", code=code)
        if msg.get("type") != "welcome":
            raise ClientError(f"expected welcome, got {msg.get('type')!r}")
        self.welcome = msg
        warn_if_placeholder(msg, self.address)
        return msg

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _explain_silent_close(self) -> None:
        """A TLS server closes a plaintext connection without a word: ask the port whether it speaks TLS."""
        if not self.tls and not self._received and self.port and await speaks_tls(self.host, self.port):
            raise ClientError(f"{self.host}:{self.port} speaks TLS: add --tls (and --tls-ca CA.pem for a "
                              f"private CA)")

    async def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(encode(msg))
        await self.writer.drain()

    async def send_frame(
        self,
        stream_name: str,
        frame_id: int,
        image: bytes,
        *,
        encoding: str | None = None,
        shape: tuple[int, int, int] | None = None,
        timestamp: float | None = None,
    ) -> float:
        """Send one frame; returns the wall-clock timestamp put in it."""
        ts = time.time() if timestamp is None else timestamp
        await self.send(frame_msg(stream_name, frame_id, image, timestamp=ts, encoding=encoding, shape=shape))
        return ts

    async def recv(self) -> dict[str, Any] | None:
        """Next server message, or None when the server closed the connection."""
        while not self._pending:
            data = await self.reader.read(1 << 16)
            if not data:
                return None
            self._received = True
            if self._head is not None:  # still looking at the first bytes: an HTTP server's answer?
                self._head += data
                if self._head.startswith(HTTP_ANSWER):
                    raise WrongPort(f"{self.address} answered HTTP: that is the server's API port; frames go "
                                    f"to its --tcp-port (default 9000)", address=self.address, protocol="http")
                if HTTP_ANSWER.startswith(self._head):
                    continue  # too few bytes to tell yet; the decoder sees them once they can be told apart
                data, self._head = self._head, None
            for item in self._decoder.feed(data):
                if isinstance(item, Exception):
                    raise ClientError(f"server sent an undecodable message: {item}")
                self._pending.append(item)
        return self._pending.pop(0)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass


async def connect(
    host: str,
    port: int,
    stream_name: str,
    *,
    token: str | None = None,
    drop: bool = True,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> Connection:
    """Open a connection (with retries) and complete hello/welcome; closes it again on failure."""
    conn = await Connection.open(host, port, retries=retries, backoff=backoff, timeout=timeout, tls=tls)
    try:
        await conn.hello(stream_name, token=token, drop=drop, timeout=max(timeout, 10.0))
    except BaseException:
        await conn.close()
        raise
    return conn


def warn_if_placeholder(welcome: dict[str, Any], address: str) -> None:
    """One warning line per server when its welcome says it runs placeholder mode (no real model)."""
    if welcome.get("model") != PLACEHOLDER_MODEL and welcome.get("placeholder") is not True:
        return
    if address in _placeholder_warned:
        return
    _placeholder_warned.add(address)
    log.warning("the server at %s runs in PLACEHOLDER MODE: every result is one fake centred box labelled "
                "'placeholder', not a model's detections (start the server with --model PATH)", address)


def _has_private_ca(ctx: ssl.SSLContext | None) -> bool:
    """Whether verification used a CA file the user gave (a different hint then)."""
    return bool(getattr(ctx, "private_ca", False))
