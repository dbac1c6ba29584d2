"""Server-side TLS: one stdlib SSLContext for both listeners that counts failed handshakes itself."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from visionstream.wire.errors import ConfigError

# A peer that opens a connection and never finishes its handshake holds a descriptor until then.
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# Handshakes in progress on both ports together. The listeners see a connection only once its
# handshake is done, so this is the only count of those sockets; beyond it a handshake is refused at
# once (the peer sees the connection closed and may retry) instead of holding a descriptor.
MAX_TLS_HANDSHAKES: Final = 128


class _CountingSSLObject(ssl.SSLObject):
    """Reports a handshake that fails (plaintext peer, wrong version, bad alert) to its context, and
    frees its seat among the handshakes in progress when it ends either way.

    asyncio and uvloop both drive TLS through `SSLContext.wrap_bio`, and both close a failed
    handshake silently; this is the one place the failure can be seen and counted.
    """

    _refused = False
    _reported = False
    _seated = False
    _timer: asyncio.TimerHandle | None = None

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._seated:
            self._seated = False
            ctx = self.context
            if isinstance(ctx, ServerTLSContext):
                ctx.handshaking -= 1

    def do_handshake(self) -> None:
        ctx = self.context
        if self._refused:
            if not self._reported and isinstance(ctx, ServerTLSContext) and ctx.on_handshake_refused is not None:
                ctx.on_handshake_refused()
            self._reported = True
            raise ssl.SSLError(f"more than {MAX_TLS_HANDSHAKES} TLS handshakes in progress")
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._release()
            on_failure = getattr(ctx, "on_handshake_failure", None)
            if on_failure is not None:
                on_failure(exc)
            raise
        self._release()


class ServerTLSContext(ssl.SSLContext):
    """TLS 1.2+ server context that counts its handshakes in progress and refuses beyond the cap;
    `on_handshake_failure(exc)` and `on_handshake_refused()` are called on the event loop."""

    sslobject_class = _CountingSSLObject
    on_handshake_failure: Callable[[ssl.SSLError], Any] | None = None
    on_handshake_refused: Callable[[], Any] | None = None
    max_handshakes: int = MAX_TLS_HANDSHAKES
    handshaking = 0

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(obj, _CountingSSLObject) and server_side:
            if self.handshaking >= self.max_handshakes:
                obj._refused = True  # its first do_handshake, right after this, fails and closes it
            else:
                self.handshaking += 1
                obj._seated = True
                # A handshake that ends without a word (peer reset) is over by the deadline at the latest.
                with contextlib.suppress(RuntimeError):
                    obj._timer = asyncio.get_running_loop().call_later(TLS_HANDSHAKE_TIMEOUT + 1.0, obj._release)
        return obj


def server_context(cert: Path, key: Path) -> ServerTLSContext:
    """Load the certificate chain and key; ConfigError (one line) when they cannot be used."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    ctx = ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: not a usable certificate and key "
                          f"({exc.reason or exc})") from None
    return ctx


def handshake_failure_reason(exc: ssl.SSLError) -> str:
    """A short reason for the log: OpenSSL's own name for it when it has one."""
    return str(exc.reason or exc).lower().replace("_", " ")
