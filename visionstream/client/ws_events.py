"""WebSocket event watcher: follow the server's /ws result broadcast, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from visionstream.client.tls import describe_tls_error, speaks_tls
from visionstream.wire.errors import WatchError

log = logging.getLogger("visionstream.ws")

# Close codes a server uses to say "you may not watch": retrying would only be refused again.
AUTH_CLOSE_CODES = frozenset({1008, 4001, 4003, 4401, 4403})
AUTH_HTTP_STATUSES = frozenset({401, 403})
# A connection that stayed open this long (seconds) counts as having worked, even without events.
HEALTHY_AFTER = 5.0


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
) -> int:
    """Call on_event for each event until `count` events; returns how many were delivered.

    Reconnects after a lost or failed connection; `max_retries` consecutive failures (a negative value
    means no limit) raise WatchError, as does an auth refusal, a malformed URL or a TLS mismatch
    (`tls` is the client context for a wss:// URL).
    """
    loop = asyncio.get_running_loop()
    delivered = 0
    failures = 0
    connections = 0
    delays = backoff()
    shown = url.split("?", 1)[0]
    while count is None or delivered < count:
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
            if connections == 0 and url.startswith("ws:") and isinstance(exc, InvalidHandshake):
                parts = urlsplit(url)
                if parts.hostname and parts.port and await speaks_tls(parts.hostname, parts.port):
                    raise WatchError(f"{_where(url)} speaks TLS: add --tls (and --tls-ca CA.pem for a private CA)"
                                     ) from None
        failures += 1
        if failures == 1:
            delays = backoff()  # a fresh outage starts again from the short delay
        if 0 <= max_retries < failures:
            raise WatchError(f"{shown} not reachable: {reason} (gave up after {max_retries} retries)")
        delay = next(delays)
        log.warning("%s: %s; retrying in %.1fs (%d of %s)", shown, reason, delay, failures,
                    "unlimited" if max_retries < 0 else max_retries)
        await sleep(delay)
    return delivered


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
