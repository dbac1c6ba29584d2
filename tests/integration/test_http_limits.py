"""The HTTP listener's limits against the real server: idle floods, half-sent requests, header bombs, descriptors."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.helpers import COCO_MODEL, ROOT, require, running_server
from tests.integration.wire import EOF, Wire, bus_jpeg, error_count, frame, is_bus, rss_mb, stats, wait_for

resource = pytest.importorskip("resource", reason="descriptor limits are POSIX")

HTTP_TIMEOUT = 1.0
MAX_HTTP = 6
MAX_WS = 2


def _limit_fds(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


@contextlib.contextmanager
def _own_fds(n: int) -> Iterator[None]:
    """This test process needs more descriptors than the server it attacks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"the test needs {n} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _health(port: int, timeout: float = 5.0) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).status_code


def _closed(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing `sock` within `timeout`, or None if it stayed open."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return got
            got += data
    except ConnectionResetError:
        return got
    except TimeoutError:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("http-limits"), "--http-timeout", str(HTTP_TIMEOUT),
                        "--max-http-clients", str(MAX_HTTP), "--max-ws-clients", str(MAX_WS)) as handle:
        yield handle


def test_half_sent_and_silent_http_requests_are_closed_after_the_timeout(server):
    before = error_count(server, "http_timeout")
    socks = [socket.create_connection(("127.0.0.1", server.api_port)) for _ in range(4)]
    socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # head never finished
    socks[1].sendall(b"GET /hea")
    # socks[2], socks[3]: connected, silent
    started = time.monotonic()
    answers = [_closed(s, 5 * HTTP_TIMEOUT + 5) for s in socks]
    elapsed = time.monotonic() - started
    for s in socks:
        s.close()
    assert all(a is not None for a in answers), f"still open after {elapsed:.1f}s: {answers}"
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers  # type: ignore[union-attr]
    assert elapsed < 5 * HTTP_TIMEOUT + 5
    assert error_count(server, "http_timeout") - before == 4
    assert _health(server.api_port) == 200  # a prompt client is unaffected by the deadline


def test_an_endless_header_is_refused_early_and_costs_no_memory(server):
    rss0 = rss_mb(server)
    before = error_count(server, "http_header_too_large")
    with socket.create_connection(("127.0.0.1", server.api_port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
        sent = 0
        chunk = b"a" * 65536
        with contextlib.suppress(OSError):  # the server closes mid-send: reset or broken pipe
            while sent < 32 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        answer = _closed(s, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431"), answer
    assert sent < 32 << 20, "the server read 32 MiB of one header without closing"
    assert error_count(server, "http_header_too_large") - before == 1
    assert rss_mb(server) - rss0 < 20


def test_at_the_cap_a_newcomer_displaces_an_idle_connection_not_a_viewer(server):
    """MAX_HTTP seats: two /ws viewers and idle sockets fill them; /health still gets in, the viewers stay."""
    with ws_connect(f"ws://127.0.0.1:{server.api_port}/ws", open_timeout=10) as v1, \
            ws_connect(f"ws://127.0.0.1:{server.api_port}/ws", open_timeout=10) as v2:
        idle = [socket.create_connection(("127.0.0.1", server.api_port)) for _ in range(MAX_HTTP * 3)]
        try:
            assert _health(server.api_port) == 200
            closed = sum(_closed(s, 0.5) is not None for s in idle)
            assert closed >= MAX_HTTP * 3 - (MAX_HTTP - 2) + 1, closed  # the oldest went; at most 4 seats left
            with Wire(server.tcp_port) as cam:
                cam.hello("http-cap-cam", drop=False)
                cam.send(frame("http-cap-cam", 0, bus_jpeg()))
                assert is_bus(cam.recv(timeout=30))
            for viewer in (v1, v2):
                event = json.loads(viewer.recv(timeout=10))
                assert event.get("stream_name") == "http-cap-cam"
        finally:
            for s in idle:
                s.close()
    assert error_count(server, "http_evicted") >= MAX_HTTP * 3 - (MAX_HTTP - 2)


def test_at_the_cap_with_every_seat_busy_the_newcomer_gets_503(server):
    before = error_count(server, "too_many_http_clients")
    busy = []
    try:
        for _ in range(MAX_HTTP):  # each: a complete head whose body never comes (answered, still busy)
            s = socket.create_connection(("127.0.0.1", server.api_port))
            s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            busy.append(s)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.api_port)) as s:
            answer = _closed(s, 5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        assert b"limit of 6 HTTP connections" in answer
    finally:
        for s in busy:
            s.close()
    wait_for(lambda: _health(server.api_port) == 200, 5, "/health once the busy seats are gone")
    assert error_count(server, "too_many_http_clients") - before == 1


def test_idle_http_flood_under_1024_descriptors_leaves_health_and_cameras_served(tmp_path):
    """The issue's attack: 1,100 idle HTTP sockets against a server limited to 1024 descriptors."""
    require(COCO_MODEL)
    with _own_fds(4096), running_server(tmp_path, preexec_fn=_limit_fds(1024, 1024)) as srv:
        flood: list[socket.socket] = []
        try:
            for _ in range(1100):
                flood.append(socket.create_connection(("127.0.0.1", srv.api_port), timeout=10))
            assert _health(srv.api_port) == 200
            with Wire(srv.tcp_port) as cam:
                cam.hello("fd-cam", drop=False)
                cam.send(frame("fd-cam", 0, bus_jpeg()))
                msg = cam.recv(timeout=30)
                assert msg != EOF and is_bus(msg), msg
            open_fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
            assert open_fds < 1024 - 64, open_fds
        finally:
            for s in flood:
                s.close()
        assert stats(srv)["errors_by_code"].get("http_evicted", 0) >= 1100 - 256
        log = srv.log()
        assert "Too many open files" not in log
        assert log.count("closing the oldest idle one") == 1, "one line per burst, not one per socket"


def test_caps_that_cannot_fit_the_descriptors_refuse_to_start_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "server.py"), "--tcp-port", "0", "--api-port", "0",
           "--max-http-clients", "2000", "--log-dir", str(tmp_path / "logs"), "--placeholder"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          preexec_fn=_limit_fds(1024, 1024))
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1, out
    assert "may need 2512 open files" in errors[0] and "only 1024" in errors[0], errors[0]
    assert "--max-http-clients 2000" in errors[0]
    assert "Traceback" not in out
    assert time.monotonic() - started < 30  # refused before any model is looked for


def test_the_soft_descriptor_limit_is_raised_to_the_hard_limit():
    code = ("from visionstream.server.descriptors import raise_nofile_limit; import resource; "
            "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard limit {hard} < 2048")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         preexec_fn=_limit_fds(1024, 2048)).stdout
    assert out.strip() == "(1024, 2048) (2048, 2048)", out
