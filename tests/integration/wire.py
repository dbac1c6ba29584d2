"""Blocking test sockets that speak (or deliberately break) protocol v1, plus /stats and /metrics readers."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerHandle, asset
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg

EOF = "EOF"  # what `Wire.recv` returns once the server has closed the connection


def bus_jpeg() -> bytes:
    return asset("bus.jpg").read_bytes()


def labels(msg: dict) -> list[str]:
    return [d["label"] for d in msg.get("detections", [])]


def is_bus(msg: dict) -> bool:
    """The bus.jpg answer: a result with the bus and at least three people."""
    names = labels(msg)
    return msg.get("type") == "result" and "bus" in names and names.count("person") >= 3


def frame(name: str, fid: int, image: bytes, **kw: Any) -> dict[str, Any]:
    return frame_msg(name, fid, image, timestamp=time.time(), **kw)


class Wire:
    """One blocking TCP connection with deadlines on every read; `raw` bytes go out untouched."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, port))
        self.decoder = FrameDecoder(limits=CLIENT_LIMITS)
        self.pending: list[Any] = []
        self.eof = False

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode(msg))

    def hello(self, name: str, **kw: Any) -> dict[str, Any]:
        self.send(hello_msg(name, **kw))
        welcome = self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    def recv(self, timeout: float = 10.0) -> Any:
        """Next message, or EOF once the server closed; raises TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.eof:
                return EOF
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message within {timeout}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def recv_until(self, pred: Callable[[Any], bool], timeout: float = 10.0) -> list[Any]:
        """Messages up to and including the first that satisfies `pred` (EOF counts as a message)."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            out.append(msg)
            if pred(msg):
                return out
            if msg == EOF:
                raise AssertionError(f"closed before the expected message; got {out}")

    def rest(self, timeout: float = 10.0) -> list[Any]:
        """Everything until the server closes the connection (which must happen within `timeout`)."""
        return self.recv_until(lambda m: m == EOF, timeout)

    def ping(self, ident: Any = "sync", timeout: float = 10.0) -> list[Any]:
        """Round trip: every reply to earlier messages that the reader answered synchronously arrives
        before the pong, so this returns them (without the pong)."""
        self.send({"type": "ping", "id": ident})
        msgs = self.recv_until(lambda m: m == EOF or (m.get("type") == "pong" and m.get("id") == ident), timeout)
        assert msgs[-1] != EOF, f"connection closed before pong: {msgs}"
        return msgs[:-1]

    def close(self, abort: bool = False) -> None:
        """Close; `abort` sends a RST (SO_LINGER 0) like a crashed camera or a dropped network."""
        if abort:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# ------------------------------------------------------------------ control plane


def stats(server: ServerHandle, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{server.base_url}/stats", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()


def metrics(server: ServerHandle, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """Prometheus samples as {(name, sorted label items): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{server.base_url}/metrics", headers=headers, timeout=10)
    r.raise_for_status()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def error_count(server: ServerHandle, code: str, token: str | None = None) -> int:
    return stats(server, token)["errors_by_code"].get(code, 0)


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def settled(server: ServerHandle, clients: int = 0, token: str | None = None) -> dict[str, Any]:
    """/stats once `clients` remain connected and every received frame has been answered."""
    snap: dict[str, Any] = {}

    def check() -> bool:
        nonlocal snap
        snap = stats(server, token)
        return snap["clients"] == clients and snap["in_flight"] == 0 and snap["queue_size"] == 0

    wait_for(check, 15, f"{clients} client(s) and nothing in flight (last: clients={snap.get('clients')}, "
                        f"in_flight={snap.get('in_flight')})")
    return snap


def rss_mb(server: ServerHandle) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


class GoodCamera(threading.Thread):
    """A well-behaved lossless camera streaming bus.jpg in lock-step in the background; it records
    every message it gets so a test can prove misbehaving peers never reached it."""

    def __init__(self, port: int, name: str = "good-cam") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.name_ = name
        self.messages: list[Any] = []
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._image = bus_jpeg()

    def run(self) -> None:
        try:
            with Wire(self.port) as w:
                w.hello(self.name_, drop=False)
                while not self._halt.is_set():
                    w.send(frame(self.name_, self.sent, self._image))
                    self.sent += 1
                    self.messages.append(w.recv(timeout=30))
        except BaseException as exc:  # reported by check(), in the test's thread
            self.error = exc

    def __enter__(self) -> GoodCamera:
        self.start()
        wait_for(lambda: self.messages or self.error, 30, "the good camera's first result")
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(30)

    def check(self, min_results: int = 1) -> None:
        """Every frame answered with its own bus.jpg result, identical to the first one."""
        assert self.error is None, f"good camera failed: {self.error!r}"
        assert len(self.messages) == self.sent >= min_results
        first = self.messages[0]
        for i, msg in enumerate(self.messages):
            assert msg != EOF and msg["type"] == "result", f"good camera got {msg}"
            assert msg["stream_name"] == self.name_ and msg["frame_id"] == i
            assert msg["detections"] == first["detections"] and is_bus(msg)
