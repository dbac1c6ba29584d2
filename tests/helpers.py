"""Shared test helpers: locating models and assets, starting the real server on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One variable locates the shared weights; ../shared/models beside the checkout by default.
MODELS_DIR = Path(os.environ.get("VISIONSTREAM_MODELS", ROOT.parent / "shared" / "models")).resolve()
COCO_MODEL = MODELS_DIR / "yolov8n_int8_openvino_model"
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


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    tcp_port: int
    api_port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    *args: str,
    model: str | Path | None = None,
    imgsz: int = 320,
    workers: int = 1,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> Iterator[ServerHandle]:
    """Start `server.py` as a subprocess on OS-chosen ports; always stops it on exit."""
    if model is None:
        model = require(COCO_MODEL)
    ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable, str(ROOT / "server.py"),
        "--host", "127.0.0.1", "--tcp-port", "0", "--api-port", "0",
        "--model", str(model), "--imgsz", str(imgsz), "--workers", str(workers),
        "--log-dir", str(tmp_path / "logs"), "--ready-file", str(ready), *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=full_env)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        yield ServerHandle(proc, info["tcp_port"], info["api_port"], log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
