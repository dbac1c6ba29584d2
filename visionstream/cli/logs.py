"""Logging to the console and to a file under --log-dir, set up once by the entry point."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(log_dir: Path, name: str, level: str = "info") -> Path:
    """Console (stderr) + `log_dir/name.log`; returns the file path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    formatter = logging.Formatter(FORMAT)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(path, encoding="utf-8")):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # Third-party chatter stays out of our console unless asked for.
    for noisy in ("uvicorn.access", "ultralytics", "httpx", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return path
