"""`python -m bench.attack_flood`: a camera's latency and /health while clients flood the event loop (issue 12)."""

from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from visionstream.loadtest.loadgen import asset_path
from visionstream.loadtest.serverproc import COCO_MODEL, start_server
from visionstream.measure import percentile
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg

BURST_MESSAGES = 100_000  # empty messages (a 4-byte length of 0), each answered `malformed`
FLOOD_S = 5.0
FLOODERS = 2


class Reader(threading.Thread):
    """Drains one socket, counting what comes back (an attacker that does read its replies)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.counts: dict[str, int] = {}
        self.last = 0.0
        self.refused = 0  # as told by `rate_limited` notices

    def run(self) -> None:
        dec = FrameDecoder(limits=CLIENT_LIMITS)
        try:
            while data := self.sock.recv(1 << 16):
                for msg in dec.feed(data):
                    if isinstance(msg, dict):
                        key = msg.get("code") or msg.get("type") or "?"
                        self.counts[key] = self.counts.get(key, 0) + 1
                        self.refused += int(msg.get("refused", 0) or 0)
                self.last = time.monotonic()
        except OSError:
            pass


class Camera(threading.Thread):
    """A lock-step camera: send bus.jpg, wait for its answer, again; records (send time, round trip ms)."""

    def __init__(self, port: int, image: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.image = port, image
        self.rtts: list[tuple[float, float]] = []
        self.infer: list[tuple[float, float]] = []  # the server's own infer_ms for each
        self.waited: list[tuple[float, float]] = []  # round trip - the server's latency_ms: waiting for the loop
        self.halt = threading.Event()

    def run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dec = FrameDecoder(limits=CLIENT_LIMITS)
        sock.sendall(encode(hello_msg("good-cam")))
        pending: list[Any] = []

        def recv() -> dict[str, Any]:
            while not pending:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("camera connection closed")
                pending.extend(dec.feed(data))
            return pending.pop(0)

        recv()  # welcome
        fid = 0
        while not self.halt.is_set():
            t0 = time.monotonic()
            sock.sendall(encode(frame_msg("good-cam", fid, self.image, timestamp=time.time())))
            while (reply := recv()).get("frame_id") != fid:
                pass
            self.rtts.append((t0, (time.monotonic() - t0) * 1000.0))
            self.infer.append((t0, float(reply.get("timings", {}).get("infer_ms", 0.0))))
            self.waited.append((t0, self.rtts[-1][1] - float(reply.get("latency_ms", 0.0))))
            fid += 1
            time.sleep(0.01)  # a 50-70 fps camera, not a saturating one
        sock.close()


class Health(threading.Thread):
    """GET /health every 20 ms; records (time, latency ms)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/health"
        self.times: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.halt.is_set():
                t0 = time.monotonic()
                try:
                    client.get(self.url)
                except httpx.HTTPError:
                    continue
                self.times.append((t0, (time.monotonic() - t0) * 1000.0))
                time.sleep(0.02)


def window(samples: list[tuple[float, float]], t0: float, t1: float) -> str:
    vals = sorted(v for t, v in samples if t0 <= t <= t1)
    if not vals:
        return "n=0"
    return (f"n={len(vals)} p50={percentile(vals, 50):.1f} p99={percentile(vals, 99):.1f} "
            f"max={vals[-1]:.1f} ms")


def burst(port: int) -> tuple[dict[str, int], float]:
    """One connection sends BURST_MESSAGES empty messages in one go; returns its replies and how long
    until the last one came."""
    sock = socket.create_connection(("127.0.0.1", port))
    reader = Reader(sock)
    reader.start()
    t0 = time.monotonic()
    sock.sendall(b"\0\0\0\0" * BURST_MESSAGES)
    while True:  # until the replies stop coming
        time.sleep(0.2)
        if (reader.counts and time.monotonic() - reader.last > 0.5) or time.monotonic() - t0 > 30:
            break
    sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv; a close alone would leave the socket open
    sock.close()
    reader.join(2)
    return reader.counts, reader.last - t0


def flood(port: int, seconds: float) -> tuple[int, int, dict[str, int], int]:
    """FLOODERS threads send pings as fast as they can for `seconds`, reconnecting whenever the server
    closes them. Returns (pings sent, connections used, replies by code/type, refused as told)."""
    batch = encode({"type": "ping", "id": 1}) * 1000
    end = time.monotonic() + seconds
    totals = {"sent": 0, "conns": 0}
    counts: dict[str, int] = {}
    refused = [0]
    lock = threading.Lock()

    def one() -> None:
        while time.monotonic() < end:
            sock = socket.create_connection(("127.0.0.1", port))
            reader = Reader(sock)
            reader.start()
            sent = 0
            try:
                while time.monotonic() < end:
                    sock.sendall(batch)
                    sent += 1000
            except OSError:
                pass
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            reader.join(2)
            with lock:
                totals["sent"] += sent
                totals["conns"] += 1
                refused[0] += reader.refused
                for k, v in reader.counts.items():
                    counts[k] = counts.get(k, 0) + v

    threads = [threading.Thread(target=one, daemon=True) for _ in range(FLOODERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return totals["sent"], totals["conns"], counts, refused[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attack_flood", description=__doc__)
    p.add_argument("--server", type=Path, default=None, help="server.py to attack (default: this checkout's)")
    p.add_argument("--model", default=str(COCO_MODEL))
    p.add_argument("--imgsz", type=int, default=320)
    args = p.parse_args(argv)
    image = asset_path("bus.jpg").read_bytes()
    with tempfile.TemporaryDirectory() as tmp, \
            start_server(Path(tmp), model=args.model, imgsz=args.imgsz, script=args.server) as srv:
        cam, health = Camera(srv.tcp_port, image), Health(srv.base_url)
        cam.start()
        health.start()
        time.sleep(3.0)
        t_base = time.monotonic()
        time.sleep(3.0)
        t_burst = time.monotonic()
        counts, took = burst(srv.tcp_port)
        t_burst_end = time.monotonic()
        time.sleep(1.0)
        t_flood = time.monotonic()
        sent, conns, fcounts, refused = flood(srv.tcp_port, FLOOD_S)
        t_flood_end = time.monotonic()
        time.sleep(0.5)
        cam.halt.set()
        health.halt.set()
        cam.join(10)
        health.join(10)
        errors = httpx.get(f"{srv.base_url}/stats", timeout=10).json()["errors_by_code"]
    print(f"server: {args.server or 'this checkout'}")
    phases = [("baseline, 3 s", t_base, t_burst),
              (f"burst of {BURST_MESSAGES} empty messages (replies {counts}, the last after {took:.2f} s)",
               t_burst, t_burst_end),
              (f"ping flood, {FLOODERS} connections, {FLOOD_S:g} s ({sent} pings written over {conns} connection(s); "
               f"replies {fcounts}; refusals told {refused})", t_flood, t_flood_end)]
    for title, a, b in phases:
        print(title)
        print(f"  camera round trip   {window(cam.rtts, a, b)}")
        print(f"  of which loop wait  {window(cam.waited, a, b)}")
        print(f"  camera infer_ms     {window(cam.infer, a, b)}")
        print(f"  /health             {window(health.times, a, b)}")
    print(f"server errors_by_code: {errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
