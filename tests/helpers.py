"""Shared test helpers: locating models and assets, starting the real server on free ports."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from visionstream.loadtest.serverproc import COCO_MODEL, MODELS_DIR, ServerProcess, start_server
from visionstream.loadtest.serverproc import ROOT as ROOT  # the tests' checkout root, re-exported

FALL_MODEL = MODELS_DIR / "yolov8s-fall.pt"


def require(path: Path) -> Path:
    """Skip (with the reason) when a shared model is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: set VISIONSTREAM_MODELS to the folder holding the shared models")
    return path


def asset(name: str) -> Path:
    """A real photo shipped inside the ultralytics package (bus.jpg, zidane.jpg)."""
    import importlib.util

    # Locate the package without importing it: `import ultralytics` pulls in torch (seconds).
    spec = importlib.util.find_spec("ultralytics")
    path = Path(spec.origin).parent / "assets" / name if spec and spec.origin else Path("/nonexistent")
    if not path.exists():
        pytest.skip(f"ultralytics asset {name} missing")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tests start the server exactly as the bench does: one implementation of "run server.py".
ServerHandle = ServerProcess


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    *args: str,
    model: str | Path | None = None,
    imgsz: int = 320,
    workers: int = 1,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> Iterator[ServerProcess]:
    """Start `server.py` as a subprocess on OS-chosen ports; always stops it on exit."""
    if model is None:
        model = require(COCO_MODEL)
    with start_server(tmp_path, model=str(model), imgsz=imgsz, workers=workers, extra=args,
                      timeout=timeout, env=env, preexec_fn=preexec_fn) as handle:
        yield handle
