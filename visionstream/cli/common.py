"""Shared plumbing of the command-line entry points: help text, logging to console and file, signals, token lookup."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from visionstream.wire.protocol import TOKEN_ENV

T = TypeVar("T")

SERVICE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"  # the server's console and file
CLIENT_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party chatter kept out of a service's log unless its level asks for it.
NOISY_LOGGERS = ("uvicorn.access", "ultralytics", "httpx", "asyncio")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to each flag's help unless the help already explains its default.

    Unlike ArgumentDefaultsHelpFormatter it skips flags whose default is "off" (None, False, ''),
    which would only print "(default: None)" after text that already says what happens. Text with
    line breaks (example epilogs) is kept line by line; a one-paragraph description is wrapped.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        says_default = "(default" in text or "default:" in text
        off = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        # A switch (store_true/store_false) is off unless given: its stored default (True for a
        # store_false flag such as --no-rect) is not what the user sees.
        off = off or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if says_default or off:
            return text
        return text + " (default: %(default)s)"


class _ConsoleFormatter(logging.Formatter):
    """Plain messages for progress, "error: ..." / "warning: ..." prefixes for problems."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg = f"{msg} ({record.exc_info[1]})"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def setup_logging(
    name: str, *, log_dir: str | Path | None, level: str = "info", quiet: bool = False, service: bool = False
) -> Path | None:
    """Console (stderr) plus, when possible, log_dir/<name>.log; returns the log file path or None.

    A command-line client (the default) logs visionstream's own messages, plain on the console
    ("error: ..." for problems, nothing else with `quiet`), and streams on without a log file it
    cannot write. A `service` (the server) logs the whole process, third-party libraries from
    WARNING up, with a timestamp on every console line too; a log file it cannot write is an OSError.
    """
    logger = logging.getLogger() if service else logging.getLogger("visionstream")
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console_format: logging.Formatter
    if service:
        console_format = file_format = logging.Formatter(SERVICE_FORMAT)
        handler_level = logging.NOTSET  # the loggers' own levels decide
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logger.level))
    else:
        logger.propagate = False
        console_format, file_format = _ConsoleFormatter(), logging.Formatter(CLIENT_FILE_FORMAT)
        handler_level = logger.level
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else handler_level)
    console.setFormatter(console_format)
    logger.addHandler(console)
    if not log_dir:
        return None
    path = Path(log_dir) / f"{name}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        if service:
            raise
        # A read-only working directory must not stop a client from streaming.
        logger.warning("not writing %s: %s", path, exc)
        return None
    handler.setLevel(handler_level)
    handler.setFormatter(file_format)
    logger.addHandler(handler)
    return path


def add_tls_flags(group: argparse._ActionsContainer, what: str = "the server") -> None:
    """--tls and --tls-ca, the same in every client."""
    group.add_argument("--tls", action="store_true",
                       help=f"connect to {what} over TLS, verifying its certificate against the system's "
                            f"trust store (a server started with --tls-cert)")
    group.add_argument("--tls-ca", default=None, metavar="PEM",
                       help="trust only this CA (or self-signed) certificate when verifying the server's; "
                            "implies --tls")


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context the flags ask for (None: plaintext); ClientError for an unreadable --tls-ca."""
    from visionstream.client.tls import client_context

    return client_context(args.tls, args.tls_ca)


def exit_code(log: logging.Logger, *failures: object) -> int:
    """A command's exit code after its summary: the first failure that is set is logged (one line) and
    gives 1; none gives 0."""
    for failure in failures:
        if failure:
            log.error("%s", failure)
            return 1
    return 0


def resolve_token(flag_value: str | None) -> str | None:
    """--token wins; otherwise $VISIONSTREAM_TOKEN; empty means no token."""
    token = flag_value if flag_value is not None else os.environ.get(TOKEN_ENV)
    return token or None


@contextlib.contextmanager
def signal_handlers(handlers: dict[int, Callable[[], None]]) -> Iterator[None]:
    """Route signals to callbacks on the running loop; a no-op where the loop cannot (Windows)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig, callback in handlers.items():
        try:
            loop.add_signal_handler(sig, callback)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def with_stop_signals(awaitable: Awaitable[T], on_int: Callable[[], None],
                            on_term: Callable[[], None] | None = None) -> T:
    """Await `awaitable` while SIGINT calls `on_int` (and SIGTERM `on_term`, default the same)."""
    with signal_handlers({signal.SIGINT: on_int, signal.SIGTERM: on_term or on_int}):
        return await awaitable
