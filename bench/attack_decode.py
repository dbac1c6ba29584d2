"""`python -m bench.attack_decode [--server PATH]`: decode bombs against a real server, beside a camera.

Starts `server.py` (this checkout's, or PATH: another checkout's, for "before") with the COCO model
and default flags, streams bus.jpg in lock-step from one camera throughout, and sends, one case at a
time: the issue's 8192x8192 PNG of zeros (one at a time, then two at once on two connections), then
the worst images that still pass the default --max-pixels (4096x4096 PNGs of zeros: 8-bit, 16-bit,
with alpha; a progressive 4:2:0 JPEG of 4096x4096 and a 4:4:4 one at 1.5x cost). Prints, per case:
the answer, the server's CPU seconds, its peak RSS growth over the RSS just before, and the camera's
round trips meanwhile.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

from visionstream.loadtest.loadgen import asset_path
from visionstream.loadtest.serverproc import COCO_MODEL, start_server
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg


class Conn:
    """One blocking connection: hello, then frames and their answers."""

    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.decoder = FrameDecoder(limits=CLIENT_LIMITS)
        self.pending: list[Any] = []
        self.name = name
        self.sock.sendall(encode(hello_msg(name, drop=False)))
        assert self.recv()["type"] == "welcome"

    def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def send(self, fid: int, image: bytes) -> None:
        self.sock.sendall(encode(frame_msg(self.name, fid, image, timestamp=time.time())))

    def close(self) -> None:
        self.sock.close()


class Camera(threading.Thread):
    """bus.jpg in lock-step; records each round trip (ms) with the time it ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.conn = Conn(port, "good-cam")
        self.image = asset_path("bus.jpg").read_bytes()
        self.trips: list[tuple[float, float]] = []
        self.bad: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        fid = 0
        while not self.halt.is_set():
            t0 = time.perf_counter()
            self.conn.send(fid, self.image)
            reply = self.conn.recv()
            if reply.get("type") != "result":
                self.bad.append(reply)
            self.trips.append((time.perf_counter(), (time.perf_counter() - t0) * 1000))
            fid += 1

    def between(self, t0: float, t1: float) -> list[float]:
        return [ms for end, ms in self.trips if t0 <= end <= t1]


class PeakRss(threading.Thread):
    """The process's highest RSS (MiB) while running, sampled every 5 ms."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.peak = 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.005)


def encoded(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def cases() -> list[tuple[str, bytes, int]]:
    """(name, image, copies sent at once on separate connections)."""
    bomb = encoded(".png", np.zeros((8192, 8192, 3), np.uint8))
    s = 4096
    prog = (cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_SAMPLING_FACTOR)
    return [
        ("png 8192x8192 zeros", bomb, 1),
        ("png 8192x8192 zeros, two at once", bomb, 2),
        ("png 4096x4096 zeros", encoded(".png", np.zeros((s, s, 3), np.uint8)), 1),
        ("png 4096x4096 zeros, two at once", encoded(".png", np.zeros((s, s, 3), np.uint8)), 2),
        ("png 4096x4096 zeros 16-bit", encoded(".png", np.zeros((s, s, 3), np.uint16)), 1),
        ("png 4096x4096 zeros RGBA", encoded(".png", np.zeros((s, s, 4), np.uint8)), 1),
        ("png 4096x4096 zeros 16-bit RGBA", encoded(".png", np.zeros((s, s, 4), np.uint16)), 1),
        ("jpeg 4096x4096 progressive 4:2:0",
         encoded(".jpg", np.zeros((s, s, 3), np.uint8), *prog, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420), 1),
        ("jpeg 3344x3344 progressive 4:4:4",
         encoded(".jpg", np.zeros((3344, 3344, 3), np.uint8), *prog, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), 1),
    ]


def attack(port: int, proc: psutil.Process, cam: Camera, name: str, image: bytes, copies: int) -> str:
    conns = [Conn(port, f"bomber-{i}") for i in range(copies)]
    time.sleep(0.3)  # let the camera's round trips settle between cases
    rss0 = proc.memory_info().rss / 2**20
    cpu0 = sum(proc.cpu_times()[:2])
    peak = PeakRss(proc)
    peak.start()
    t0 = time.perf_counter()
    for c in conns:
        c.send(1, image)
    answers = [c.recv() for c in conns]
    t1 = time.perf_counter()
    time.sleep(0.05)
    peak.halt.set()
    peak.join()
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    for c in conns:
        c.close()
    kinds = ", ".join(a["type"] if a["type"] == "result" else f"{a['reason']}/{a.get('code', '-')}" for a in answers)
    trips = sorted(cam.between(t0, t1 + 0.05)) or [float("nan")]
    return (f"{name:36s} {len(image) / 1e3:6.0f} KB  {kinds:32s} answered in {t1 - t0:5.2f} s  "
            f"server CPU {cpu:5.2f} s  peak RSS +{peak.peak - rss0:5.0f} MiB  "
            f"camera: {len(trips)} results, median {trips[len(trips) // 2]:.0f} ms, max {trips[-1]:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", type=Path, default=None, help="server.py to attack (default: this checkout's)")
    p.add_argument("--model", default=str(COCO_MODEL), help="weights for the server")
    p.add_argument("--server-args", nargs="*", default=[], help="extra server.py arguments")
    args = p.parse_args()
    todo = cases()
    with tempfile.TemporaryDirectory() as tmp, start_server(Path(tmp), model=args.model, imgsz=640,
                                                           extra=args.server_args, script=args.server) as srv:
        proc = psutil.Process(srv.proc.pid)
        print(f"server {args.server or 'this checkout'}, pid {srv.proc.pid}, RSS at start "
              f"{proc.memory_info().rss / 2**20:.0f} MiB")
        cam = Camera(srv.tcp_port)
        cam.start()
        time.sleep(2.0)
        quiet = sorted(ms for _, ms in cam.trips[-20:])
        print(f"camera alone: median {quiet[len(quiet) // 2]:.0f} ms, max {quiet[-1]:.0f} ms")
        for name, image, copies in todo:
            print(attack(srv.tcp_port, proc, cam, name, image, copies), flush=True)
        cam.halt.set()
        cam.join(30)
        print(f"camera: {len(cam.trips)} frames, {len(cam.bad)} not answered with a result"
              f"{'' if not cam.bad else f' (first: {cam.bad[0]})'}; server RSS at the end "
              f"{proc.memory_info().rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
