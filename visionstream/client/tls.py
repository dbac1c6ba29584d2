"""Client-side TLS: the context behind --tls / --tls-ca, and one clear line for each way TLS goes wrong."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Final

from visionstream.wire.errors import ClientError

# How long the diagnosis of a silent close may spend asking the port for a TLS handshake.
PROBE_TIMEOUT: Final = 2.0
# OpenSSL's reasons when the other side answered a ClientHello with something that is not TLS.
_NOT_TLS_REASONS: Final = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                                     "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"})


class ClientTLSContext(ssl.SSLContext):
    """A verifying client context that remembers whether its trust came from --tls-ca."""

    private_ca = False


def client_context(tls: bool = False, ca: str | Path | None = None) -> ClientTLSContext | None:
    """None for plaintext; else a verifying context: the system's trust store, or only `ca` (implies TLS)."""
    if ca is None and not tls:
        return None
    ctx = ClientTLSContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is None:
        ctx.load_default_certs()
        return ctx
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ClientError(f"--tls-ca {ca}: not a readable PEM certificate ({reason})") from None
    ctx.private_ca = True
    return ctx


def describe_tls_error(exc: ssl.SSLError, where: str, ca: bool = False) -> str:
    """The line the user sees for a failed handshake with `where` (host:port)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = "is --tls-ca the CA that signed it?" if ca else "pass --tls-ca CA.pem for a private or self-signed CA"
        return f"TLS: the certificate of {where} failed verification ({exc.verify_message}): {hint}"
    if exc.reason in _NOT_TLS_REASONS:
        return f"TLS: {where} does not speak TLS (it answered in plaintext): drop --tls, or check the port"
    return f"TLS handshake with {where} failed: {exc.reason or exc}"


async def speaks_tls(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a TLS handshake (certificate unchecked: this only asks which protocol the port speaks)
    gets a TLS answer; used to explain a plaintext connection the server closed without a word."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=probe), timeout)
    except ssl.SSLError as exc:
        return exc.reason not in _NOT_TLS_REASONS  # a TLS alert is still TLS
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True
