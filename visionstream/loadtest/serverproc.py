"""Where the shared models are; start the server as a subprocess on free ports and stop it again (no pytest)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from visionstream.wire.errors import ServerStartError

# The folder holding the visionstream package: a source checkout, or site-packages once installed.
ROOT = Path(__file__).resolve().parents[2]
IN_CHECKOUT = (ROOT / "pyproject.toml").is_file()
# One variable locates the shared weights; by default ../shared/models beside a checkout (the tests'
# convention), ./models in the working folder for an installed package.
MODELS_DIR = Path(os.environ.get("VISIONSTREAM_MODELS",
                                 ROOT.parent / "shared" / "models" if IN_CHECKOUT else "models")).resolve()
COCO_MODEL = MODELS_DIR / "yolov8n_int8_openvino_model"


@dataclass
class ServerProcess:
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

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@contextlib.contextmanager
def start_server(
    workdir: Path,
    *,
    model: str,
    imgsz: int,
    workers: int | None = None,
    extra: Sequence[str] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    script: Path | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> Iterator[ServerProcess]:
    """Run the server (`python -m visionstream.cli.server` of this package, or the file `script`) until the
    block exits; raises ServerStartError if it does not come up."""
    workdir = workdir.resolve()  # the child runs in it: a relative path would point below itself
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.monotonic_ns()
    ready = workdir / f"ready-{stamp}.json"
    log_path = workdir / f"server-{stamp}.log"
    # -m rather than ROOT/server.py: an installed package has no server.py beside it.
    entry = [str(script)] if script else ["-m", "visionstream.cli.server"]
    cmd = [sys.executable, *entry, "--host", "127.0.0.1", "--tcp-port", "0",
           "--api-port", "0", "--model", model, "--imgsz", str(imgsz),
           "--log-dir", str(workdir / "logs"), "--ready-file", str(ready)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    cmd += list(extra)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if IN_CHECKOUT:  # the child runs in `workdir`, and must import this checkout, not another copy
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=full_env,
                                preexec_fn=preexec_fn)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise ServerStartError(f"server exited with code {proc.returncode}:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready after {timeout:.0f}s:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        # The ready file may be seen before its writer finished it.
        for _ in range(100):
            try:
                info = json.loads(ready.read_text())
                break
            except ValueError:
                time.sleep(0.02)
        else:
            raise ServerStartError(f"unreadable ready file {ready}")
        yield ServerProcess(proc, info["tcp_port"], info["api_port"], log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
