"""WebSocket event watcher: follow the server's /ws result broadcast, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI

from visionstream.client.tls import describe_tls_error, speaks_tls
from visionstream.wire.errors import WatchError
from visionstream.wire.protocol import FrameDecoder, encode

log = logging.getLogger("visionstream.ws")

# Close codes a server uses to say "you may not watch": retrying would only be refused again.
AUTH_CLOSE_CODES = frozenset({1008, 4001, 4003, 4401, 4403})
AUTH_HTTP_STATUSES = frozenset({401, 403})
# A connection that stayed open this long (seconds) counts as having worked, even without events.
HEALTHY_AFTER = 5.0
# Before any connection has worked, a refused or failing port is retried for this long at most (a server
# still starting), then the viewer says what is wrong instead of retrying --max-retries times.
FIRST_CONNECT_FOR: Final = 3.0
# How long asking a port whether it speaks the frame protocol may take.
PROBE_TIMEOUT: Final = 2.0


def build_url(host: str, port: int, *, stream: str | None = None, token: str | None = None,
              path: str = "/ws", secure: bool = False) -> str:
    query = {k: v for k, v in (("stream", stream), ("token", token)) if v}
    # Bare IPv6 addresses need brackets inside a URL.
    netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
    scheme = "wss" if secure else "ws"
    return f"{scheme}://{netloc}:{port}{path}" + (f"?{urlencode(query)}" if query else "")


def backoff_delays(base: float = 0.5, factor: float = 2.0, cap: float = 5.0) -> Iterator[float]:
    """base, base*factor, ... capped at `cap`, forever."""
    delay = base
    while True:
        yield min(delay, cap)
        delay *= factor


def format_event(raw: str | bytes, *, pretty: bool = False) -> str:
    """One event for printing: compact one-line JSON by default, indented with pretty."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text)
    except ValueError:
        return text  # not JSON: show it as the server sent it rather than hide it
    if pretty:
        return json.dumps(obj, indent=2, ensure_ascii=False)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def wanted(raw: str | bytes, stream: str | None) -> bool:
    """Client-side stream filter, in case the server broadcasts every stream regardless of ?stream=."""
    if not stream:
        return True
    try:
        obj = json.loads(raw)
    except ValueError:
        return True
    name = obj.get("stream_name") if isinstance(obj, dict) else None
    return name is None or name == stream


async def watch(
    url: str,
    on_event: Callable[[str | bytes], None],
    *,
    stream: str | None = None,
    count: int | None = None,
    max_retries: int = 10,
    backoff: Callable[[], Iterator[float]] = backoff_delays,
    open_timeout: float = 5.0,
    sleep: Callable[[float], Any] = asyncio.sleep,
    tls: ssl.SSLContext | None = None,
    connect_for: float = FIRST_CONNECT_FOR,
) -> int:
    """Call on_event for each event until `count` events; returns how many were delivered.

    Until a first connection works, failures are retried for `connect_for` seconds at most (a negative
    value: like later ones), and a port that answers in the frame protocol fails at once. After that it
    reconnects after a lost or failed connection; `max_retries` consecutive failures (a negative value
    means no limit) raise WatchError, as does an auth refusal, a malformed URL or a TLS mismatch
    (`tls` is the client context for a wss:// URL).
    """
    loop = asyncio.get_running_loop()
    first_deadline = loop.time() + connect_for
    delivered = 0
    failures = 0
    connections = 0
    delays = backoff()
    shown = url.split("?", 1)[0]
    while count is None or delivered < count:
        refused = False
        try:
            options: dict[str, Any] = {"ssl": tls} if tls is not None and url.startswith("wss:") else {}
            async with connect(url, open_timeout=open_timeout, max_size=2**24, **options) as ws:
                log.info("%s to %s", "reconnected" if connections else "connected", shown)
                connections += 1
                opened = loop.time()
                async for raw in ws:
                    # A connection that works resets the retry budget; one that is accepted and then
                    # closed at once keeps counting, so a server that refuses that way is not retried forever.
                    failures = 0
                    if not wanted(raw, stream):
                        continue
                    on_event(raw)
                    delivered += 1
                    if count is not None and delivered >= count:
                        return delivered
                if loop.time() - opened >= HEALTHY_AFTER:
                    failures = 0
                reason = f"closed by the server (code {ws.close_code})"
                if ws.close_code in AUTH_CLOSE_CODES:
                    raise WatchError(f"{shown} refused the connection: {ws.close_reason or ws.close_code}")
        except InvalidURI as exc:
            raise WatchError(f"bad WebSocket URL {url}: {exc}") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in AUTH_HTTP_STATUSES:
                raise WatchError(f"{shown} refused the connection (HTTP {status}: check --token)") from None
            reason = f"HTTP {status}"
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if exc.rcvd is not None and code in AUTH_CLOSE_CODES:
                raise WatchError(f"{shown} refused the connection: {exc.rcvd.reason or code}") from None
            reason = f"connection lost (code {code})"
        except ssl.SSLError as exc:  # the same certificate or protocol would fail the same way again
            raise WatchError(describe_tls_error(exc, _where(url), ca=bool(getattr(tls, "private_ca", False)))
                             ) from None
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            parts = urlsplit(url)
            first = connections == 0 and bool(parts.hostname and parts.port)
            if (first and isinstance(exc, InvalidMessage)
                    and await speaks_frame_protocol(str(parts.hostname), int(parts.port or 0), tls)):
                raise WatchError(f"{_where(url)} does not speak HTTP: it is the server's frame port "
                                 f"(--tcp-port); the viewer connects to its --api-port (default 8000)") from None
            if (first and url.startswith("ws:") and isinstance(exc, InvalidHandshake)
                    and await speaks_tls(str(parts.hostname), int(parts.port or 0))):
                raise WatchError(f"{_where(url)} speaks TLS: add --tls (and --tls-ca CA.pem for a private CA)"
                                 ) from None
            refused = isinstance(exc, ConnectionRefusedError)
        failures += 1
        if failures == 1:
            delays = backoff()  # a fresh outage starts again from the short delay
        delay = next(delays)
        if connections == 0 and connect_for >= 0:  # never connected yet: a time bound, then one line
            if loop.time() + delay > first_deadline:
                if refused:
                    raise WatchError(f"nothing listens on {_where(url)} (connection refused): is the server "
                                     f"running, and is this its --api-port (default 8000)?")
                raise WatchError(f"{shown} not reachable: {reason} (no connection within {connect_for:g}s)")
            log.info("%s: %s; retrying in %.1fs (for up to %gs until a first connection)", shown, reason, delay,
                     connect_for)
        else:
            if 0 <= max_retries < failures:
                raise WatchError(f"{shown} not reachable: {reason} (gave up after {max_retries} retries)")
            log.warning("%s: %s; retrying in %.1fs (%d of %s)", shown, reason, delay, failures,
                        "unlimited" if max_retries < 0 else max_retries)
        await sleep(delay)
    return delivered


async def speaks_frame_protocol(host: str, port: int, tls: ssl.SSLContext | None = None,
                                timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the port answers a ping in visionstream's length-prefixed msgpack (the frame port)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None), timeout)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    try:
        writer.write(encode({"type": "ping", "id": 0}))
        decoder = FrameDecoder()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(reader.read(1 << 16), left)
            if not data:
                return False
            for item in decoder.feed(data):
                return isinstance(item, dict) and "type" in item
        return False
    except (OSError, asyncio.TimeoutError, ValueError, Exception):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
