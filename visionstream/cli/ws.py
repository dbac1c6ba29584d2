"""Print the server's live detection events from its WebSocket (/ws), one JSON object per line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from visionstream.cli.common import HelpFormatter, add_tls_flags, resolve_token, setup_logging, tls_context
from visionstream.client.ws_events import FIRST_CONNECT_FOR, WatchError, build_url, format_event, watch
from visionstream.wire.errors import ClientError
from visionstream.wire.protocol import TOKEN_ENV

log = logging.getLogger("visionstream.ws")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ws_demo_client.py",
        description="Connect to ws://HOST:API_PORT/ws and print every detection event as JSON.\n"
                    "Reconnects with backoff if the server restarts; Ctrl-C exits. A first connection\n"
                    "that cannot be made within --connect-for seconds fails with one line.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="server host")
    p.add_argument("--api-port", "--port", dest="api_port", type=int, default=8000,
                   help="server HTTP/WebSocket (API) port")
    p.add_argument("--token", default=None, help=f"auth token (default: ${TOKEN_ENV} if set, else none)")
    add_tls_flags(p, "the server's /ws (wss://)")
    p.add_argument("--stream", default=None, help="only events of this stream (default: all streams)")
    p.add_argument("--count", type=int, default=None, help="exit after this many events (default: never)")
    p.add_argument("--pretty", action="store_true", help="indented multi-line JSON instead of one line")
    p.add_argument("--connect-for", type=float, default=FIRST_CONNECT_FOR, metavar="SECONDS",
                   help="until a first connection works, keep trying for this long, then say what is wrong "
                        "(nothing listening, the frame port, TLS) in one line; -1 = apply --max-retries instead")
    p.add_argument("--max-retries", type=int, default=10,
                   help="after a connection has worked: consecutive failed reconnects before giving up; "
                        "-1 = keep trying forever")
    p.add_argument("--quiet", action="store_true", help="no connection status messages on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    setup_logging("ws_demo_client", log_dir=None, quiet=args.quiet)
    try:
        tls = tls_context(args)
    except ClientError as exc:
        parser.error(str(exc))
    url = build_url(args.host, args.api_port, stream=args.stream, token=resolve_token(args.token),
                    secure=tls is not None)

    def emit(raw: str | bytes) -> None:
        print(format_event(raw, pretty=args.pretty), flush=True)

    if not args.quiet:
        log.info("watching %s", url.split("?", 1)[0] + (f" (stream {args.stream})" if args.stream else ""))
    try:
        asyncio.run(watch(url, emit, stream=args.stream, count=args.count, max_retries=args.max_retries, tls=tls,
                          connect_for=args.connect_for))
    except WatchError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a viewer is meant to stop
    except BrokenPipeError:
        # Piped into `head`: the reader left, which is no error; stop Python flushing into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
