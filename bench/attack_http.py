"""HTTP listener attacks of issue 12 against a real server.py: `python -m bench.attack_http [--server PATH]`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from visionstream.loadtest.serverproc import COCO_MODEL, start_server
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg

FDS = 1024


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FDS, FDS))


def _bus() -> bytes:
    spec = importlib.util.find_spec("ultralytics")
    assert spec and spec.origin
    return (Path(spec.origin).parent / "assets" / "bus.jpg").read_bytes()


def _still_open(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(1 << 16)
            n += 0 if not data or data.startswith(b"HTTP/1.1 4") else 1
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def _health(port: int) -> str:
    try:
        return str(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _camera(port: int, image: bytes) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(encode(hello_msg("attack-cam", drop=False)))
            s.sendall(encode(frame_msg("attack-cam", 0, image, timestamp=time.time())))
            dec, got = FrameDecoder(limits=CLIENT_LIMITS), []
            while len(got) < 2:
                data = s.recv(1 << 16)
                if not data:
                    return f"EOF after {[m.get('type') for m in got]}"
                got.extend(m for m in dec.feed(data) if isinstance(m, dict))
            return got[1].get("type", "?")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attack_http", description=__doc__)
    p.add_argument("--server", type=Path, default=None, help="server.py to attack (default: this checkout's)")
    p.add_argument("--model", default=str(COCO_MODEL))
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # the attacker needs more than FDS
    image = _bus()
    with tempfile.TemporaryDirectory() as tmp, \
            start_server(Path(tmp), model=args.model, imgsz=320, workers=1, script=args.server,
                         preexec_fn=_limit_fds) as srv:
        proc = psutil.Process(srv.proc.pid)
        api = srv.api_port
        print(f"server {args.server or 'this checkout'}, RLIMIT_NOFILE {FDS}, fds at rest {_fds(proc.pid)}")

        # 1. One endless header: 64 MiB of it.
        rss0 = proc.memory_info().rss / 2**20
        sent = 0
        with socket.create_connection(("127.0.0.1", api)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
            chunk = b"a" * 65536
            with contextlib.suppress(OSError):
                while sent < 64 << 20:
                    s.sendall(chunk)
                    sent += len(chunk)
            s.settimeout(2)
            try:
                answer = s.recv(64).split(b"\r\n")[0].decode(errors="replace") or "EOF"
            except OSError as exc:
                answer = type(exc).__name__
        print(f"endless header: {sent >> 10} KiB sent before the server closed, answer {answer!r}, "
              f"RSS {rss0:.0f} -> {proc.memory_info().rss / 2**20:.0f} MB")

        # 2. 300 half-sent requests.
        half = []
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", api), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            half.append(s)
        time.sleep(1)
        at1 = _still_open(half)
        time.sleep(11)
        print(f"300 half-sent requests: {at1} open after 1 s, {_still_open(half)} after 12 s; /health "
              f"{_health(api)}")
        for s in half:
            s.close()
        time.sleep(0.5)

        # 3. 1,100 idle sockets.
        idle, failed = [], 0
        started = time.monotonic()
        for _ in range(1100):
            try:
                idle.append(socket.create_connection(("127.0.0.1", api), timeout=5))
            except OSError:
                failed += 1
        took = time.monotonic() - started
        time.sleep(0.5)
        print(f"1,100 idle sockets ({failed} failed to connect, {took:.1f} s): {_still_open(idle)} open, "
              f"server fds {_fds(proc.pid)}, /health {_health(api)}, camera {_camera(srv.tcp_port, image)}")
        for s in idle:
            s.close()
        time.sleep(0.5)
        print(f"after the flood: /health {_health(api)}, camera {_camera(srv.tcp_port, image)}, "
              f"fds {_fds(proc.pid)}")
        log = srv.log()
        print(f"server log: {sum('WARNING' in line for line in log.splitlines())} warning line(s), "
              f"'Too many open files' {log.count('Too many open files')} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
