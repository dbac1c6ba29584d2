"""Server-side TLS: one stdlib SSLContext for both listeners that counts failed handshakes itself."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from visionstream.wire.errors import ConfigError

# A peer that opens a connection and never finishes its handshake holds a descriptor until then, and
# is counted against no cap while it does (the listeners see it only once the handshake completes).
TLS_HANDSHAKE_TIMEOUT: Final = 10.0


class _CountingSSLObject(ssl.SSLObject):
    """Reports a handshake that fails (plaintext peer, wrong version, bad alert) to its context.

    asyncio and uvloop both drive TLS through `SSLContext.wrap_bio`, and both close a failed
    handshake silently; this is the one place the failure can be seen and counted.
    """

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            on_failure = getattr(self.context, "on_handshake_failure", None)
            if on_failure is not None:
                on_failure(exc)
            raise


class ServerTLSContext(ssl.SSLContext):
    """TLS 1.2+ server context; `on_handshake_failure(exc)` is called on the event loop per failure."""

    sslobject_class = _CountingSSLObject
    on_handshake_failure: Callable[[ssl.SSLError], Any] | None = None


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
