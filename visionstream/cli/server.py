"""The server command (server.py, visionstream-server): flags to a config, logging, the event loop, exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading

from visionstream.server.config import Executor, parse_config
from visionstream.wire.errors import ConfigError, VisionStreamError


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as exc:  # one readable line, like argparse's own errors; no traceback
        print(f"server.py: error: {exc}", file=sys.stderr)
        return 2
    from visionstream.cli.common import setup_logging

    setup_logging("server", log_dir=config.log_dir, level=config.log_level, service=True)
    log = logging.getLogger("visionstream.server")
    # uvicorn's "Started/Finished server process" say less than our own lines (and around a failed
    # start look like a server running); its warnings and errors still show.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        from visionstream.server.inference.device import check_device
        from visionstream.server.server import InferenceServer

        if config.executor is Executor.THREADS:  # Ray actors check the device on their own nodes
            check_device(config.device)

        async def serve() -> None:
            await InferenceServer(config).run()

        try:
            import uvloop

            uvloop.run(serve())
        except ImportError:
            asyncio.run(serve())
    except VisionStreamError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. address already in use
        log.error("cannot start: %s", exc)
        return 2
    logging.shutdown()
    # A worker stuck inside a native inference call cannot be interrupted; don't let it hold the exit.
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
