"""Running the user-facing scripts as subprocesses, and reading what they print and write."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from tests.helpers import ROOT, asset


def run_script(script: str, *args: str | Path, cwd: Path, timeout: float = 60,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python <script> args...` from `cwd`, the way a user runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout, check=False,
    )


def start_script(script: str, *args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=clean_env(None),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    # A token in the developer's shell must not leak into tests of token-less behaviour.
    env = {k: v for k, v in os.environ.items() if k != "VISIONSTREAM_TOKEN"}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def summary(stdout: str) -> dict[str, int]:
    """The counts of the client's end-of-run summary."""
    out = {}
    for key in ("frames sent", "results", "dropped", "unanswered"):
        m = re.search(rf"^\s*{key}:\s+(\d+)", stdout, re.M)
        assert m, f"no '{key}' in summary:\n{stdout}"
        out[key.split()[-1]] = int(m.group(1))
    return out


def jsonl(path: Path, *, runs: bool = False) -> list[dict[str, Any]]:
    """A results file's lines; the `{"type": "run"}` line starting each run only with `runs`."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines if runs else [x for x in lines if x.get("type") != "run"]


def labels(record: dict[str, Any]) -> set[str]:
    return {d["label"] for d in record.get("detections", [])}


def pan_frames(n: int = 20, size: int = 320) -> list[np.ndarray]:
    """A slow pan across bus.jpg: real content the COCO model finds buses and people in."""
    img = cv2.imread(str(asset("bus.jpg")))
    h, w = img.shape[:2]
    crop = min(h, w) * 2 // 3  # a square window a third narrower than the photo, moved left to right
    top = min(300, h - crop)  # high enough to keep the people's heads in view
    frames = []
    for i in range(n):
        x = (w - crop) * i // max(1, n - 1)
        frames.append(cv2.resize(img[top:top + crop, x:x + crop], (size, size),
                                 interpolation=cv2.INTER_AREA))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> Path:
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


class LineReader:
    """Collects a subprocess pipe's lines on a thread, so a test can wait for one with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, needle: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if needle in line:
                return True
        return False


class StandInServer:
    """A protocol-v1 stand-in for the server on a thread of its own, on a free loopback port: subclasses
    write `_handle` (one connection); `with` starts it and stops it again."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> StandInServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
