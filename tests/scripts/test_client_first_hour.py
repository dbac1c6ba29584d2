"""Issue 13, the client side of a new user's first hour, run as a user runs the scripts: the placeholder
warning, URL sources (a file over HTTP, a live MJPEG stream that drops), reconnecting across a server
restart, a wrong port in one line, and results files whose runs are told apart."""

from __future__ import annotations

import asyncio
import functools
import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from tests.helpers import COCO_MODEL, ServerHandle, free_port, require, running_server
from tests.scripts.scriptutil import (
    LineReader,
    StandInServer,
    jsonl,
    pan_frames,
    run_script,
    start_script,
    summary,
    write_video,
)
from visionstream.wire.protocol import FrameDecoder, encode, welcome_msg


def one_line_failure(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    return lines[0]


def rest_of(err: LineReader) -> str:
    """Everything the process wrote to the reader's pipe, once it has exited."""
    err.wait_for("\0never printed\0", timeout=10)  # returns at EOF, having collected every line
    return "".join(err.lines)


def runs(path: Path) -> list[dict]:
    return [x for x in jsonl(path, runs=True) if x["type"] == "run"]


# --------------------------------------------------------------------------- item 1: placeholder warning


class WelcomingServer(StandInServer):
    """Protocol v1 on a thread: welcomes with `model` and answers every frame with no detections."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while data := await reader.read(1 << 16):
            for msg in decoder.feed(data):
                if msg["type"] == "hello":
                    writer.write(encode(welcome_msg(model=self.model, names={0: "placeholder"},
                                                    stream_name=msg["stream_name"], drop=msg["drop"])))
                elif msg["type"] == "frame":
                    writer.write(encode({"type": "result", "stream_name": msg["stream_name"],
                                         "frame_id": msg["frame_id"], "detections": [], "latency_ms": 1.0,
                                         "timings": {}, "timestamp": msg["timestamp"]}))
            await writer.drain()
        writer.close()


@pytest.mark.parametrize("model", ["placeholder", "yolov8n_int8_openvino_model"])
def test_placeholder_server_gets_one_warning_line(tmp_path: Path, model: str) -> None:
    with WelcomingServer(model) as srv:
        proc = run_script("client.py", "--mode", "2", "--max-frames", "3", "--fps", "20", "--width", "64",
                          "--height", "48", "--port", srv.port, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "PLACEHOLDER MODE" in line]
    if model == "placeholder":
        assert len(warnings) == 1 and warnings[0].startswith("warning: ")
        assert f"127.0.0.1:{srv.port}" in warnings[0] and "--model" in warnings[0]
    else:
        assert warnings == []
    assert summary(proc.stdout)["results"] == 3


# --------------------------------------------------------------------------- item 5: the wrong port


def test_client_at_the_api_port_says_which_port_is_which(server: ServerHandle, tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "2", "--duration", "1", "--port", server.api_port, cwd=tmp_path,
                      timeout=30)
    line = one_line_failure(proc, f"127.0.0.1:{server.api_port} answered HTTP: that is the server's API port; "
                                  f"frames go to its --tcp-port (default 9000)")
    assert "Traceback" not in proc.stderr and "FrameTooLarge" not in line
    assert proc.returncode == 1


def test_ws_viewer_at_the_frame_port_says_it_is_the_frame_port(server: ServerHandle, tmp_path: Path) -> None:
    proc = run_script("ws_demo_client.py", "--api-port", server.tcp_port, "--quiet", cwd=tmp_path, timeout=30)
    one_line_failure(proc, f"127.0.0.1:{server.tcp_port} does not speak HTTP: it is the server's frame port")
    assert "--api-port (default 8000)" in proc.stderr and proc.returncode == 1


def test_ws_viewer_at_a_closed_port_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    proc = run_script("ws_demo_client.py", "--api-port", port, "--quiet", cwd=tmp_path, timeout=30)
    took = time.monotonic() - started
    one_line_failure(proc, f"nothing listens on 127.0.0.1:{port} (connection refused)")
    # The documented bound is --connect-for (3 s) plus start-up; the old policy took 37.7 s.
    assert took < 20, took


# --------------------------------------------------------------------------- item 6: runs told apart


def test_each_run_starts_with_a_run_line_and_overwrite_starts_afresh(server: ServerHandle,
                                                                     tmp_path: Path) -> None:
    args = ("client.py", "--mode", "2", "--stream", "runs", "--max-frames", "3", "--fps", "10", "--width", "160",
            "--height", "120", "--quiet", "--port", server.tcp_port)
    for _ in range(2):
        proc = run_script(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    path = tmp_path / "results" / "runs.jsonl"
    lines = jsonl(path, runs=True)
    heads = [i for i, x in enumerate(lines) if x["type"] == "run"]
    text = path.read_text()
    assert heads == [0, 4] and len(lines) == 8, text  # each run: its line, then its three frames
    for head in (lines[0], lines[4]):
        assert head["stream_name"] == "runs" and head["server"] == f"127.0.0.1:{server.tcp_port}", text
        assert head["model"] == "yolov8n_int8_openvino_model" and head["source"].startswith("synthetic"), text
        assert head["started"].endswith("+00:00") and "T" in head["started"], text
    assert lines[0]["started"] < lines[4]["started"]
    assert [x["frame_id"] for x in jsonl(path)] == [0, 1, 2, 0, 1, 2]  # the frame readers skip run lines
    proc = run_script(*args, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(runs(path)) == 1 and len(jsonl(path)) == 3


# --------------------------------------------------------------------------- item 3: URL sources


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """python's http.server serving `tmp_path/www` on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_video_over_http_streams_every_frame(server: ServerHandle, http_dir: tuple[Path, int],
                                             tmp_path: Path) -> None:
    root, port = http_dir
    # MJPG AVI: python's http.server ignores Range requests, which an MP4 with its index at the end needs.
    write_video(root / "pan.avi", pan_frames(20))
    url = f"http://127.0.0.1:{port}/pan.avi"
    proc = run_script("client.py", "--source", url, "--fps", "20", "--port", server.tcp_port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    c = summary(proc.stdout)
    assert c == {"sent": 20, "results": 20, "dropped": 0, "unanswered": 0}  # a file: lossless by default
    lines = jsonl(tmp_path / "results" / "pan.jsonl")  # the stream is named after the URL's file
    assert sorted(x["frame_index"] for x in lines) == list(range(20))
    assert runs(tmp_path / "results" / "pan.jsonl")[0]["source"] == f"video {url}"


def test_credentials_in_a_url_are_masked(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the URL fails to open, and the line must not show the password
    url = f"http://alice:s3cret@127.0.0.1:{port}/cam.mjpg?token=t0ken&size=640"
    proc = run_script("client.py", "--source", url, cwd=tmp_path, timeout=60)
    line = one_line_failure(proc, "Failed to open video source http://***@127.0.0.1")
    assert "s3cret" not in proc.stderr + proc.stdout and "alice" not in line and "t0ken" not in line
    assert "size=640" in line
    assert "s3cret" not in (tmp_path / "logs" / "client.log").read_text()


class MjpegServer:
    """A live MJPEG-over-HTTP camera (multipart/x-mixed-replace) on a fixed port, that can be stopped
    (every connection cut, the port refusing) and started again."""

    def __init__(self, port: int, fps: float = 20) -> None:
        self.port = port
        self.period = 1 / fps
        self.jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in pan_frames(10, 160)]
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(8)
        sock.settimeout(0.1)
        self._sock = sock
        t = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._threads.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _accept(self, sock: socket.socket) -> None:
        conns: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            conns.append(t)
        for t in conns:
            t.join(10)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(65536)  # the request
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                i = 0
                while not self._stop.is_set():
                    jpg = self.jpegs[i % len(self.jpegs)]
                    conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
                    i += 1
                    time.sleep(self.period)
            except OSError:
                pass


def test_live_mjpeg_source_that_drops_is_reopened_and_counted(server: ServerHandle, tmp_path: Path) -> None:
    cam = MjpegServer(free_port())
    cam.start()
    client = start_script("client.py", "--source", f"http://127.0.0.1:{cam.port}/video.mjpg", "--stream", "live",
                          "--fps", "10", "--duration", "9", "--port", server.tcp_port, cwd=tmp_path)
    try:
        err = LineReader(client.stderr)
        assert err.wait_for("streaming live", 30), "".join(err.lines)
        time.sleep(2)
        cam.stop()  # the camera goes away: connection cut, port refusing
        time.sleep(2)
        cam.start()
        out = client.stdout.read()  # not communicate(): the LineReader owns stderr
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        cam.stop()
    log = rest_of(err)
    assert client.returncode == 0, log
    assert "live source http://127.0.0.1" in log and "dropped; reopening for up to 60s" in log, log
    assert "live source reopened after" in log, log + out
    c = summary(out)
    assert c["sent"] == c["results"] + c["dropped"] + c["unanswered"] and c["results"] > 20
    assert "source:        dropped and reopened 1 time(s);" in out, out
    skipped = int(out.split("dropped and reopened 1 time(s); ")[1].split()[0])
    assert skipped >= 10  # about 2 s at 10 fps passed without frames


# --------------------------------------------------------------------------- item 4: reconnects


def test_client_rides_out_a_server_restart(tmp_path: Path) -> None:
    require(COCO_MODEL)
    tcp_port = free_port()
    with running_server(tmp_path / "first", "--tcp-port", str(tcp_port)) as first:
        client = start_script("client.py", "--mode", "2", "--stream", "ride", "--fps", "10", "--duration", "20",
                              "--width", "160", "--height", "120", "--port", tcp_port, cwd=tmp_path)
        err = LineReader(client.stderr)
        assert err.wait_for("streaming synthetic", 30), "".join(err.lines)
        time.sleep(2)
        first.proc.terminate()
        first.proc.wait(15)
    try:
        assert err.wait_for("reconnecting for up to 60s", 15), "".join(err.lines)
        time.sleep(6)  # the outage: nothing listens on the port
        with running_server(tmp_path / "second", "--tcp-port", str(tcp_port)):
            assert err.wait_for("reconnected after", 60), "".join(err.lines)
            out = client.stdout.read()  # not communicate(): the LineReader owns stderr
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    log = rest_of(err)
    assert client.returncode == 0, log + out
    line = next(x for x in err.lines if "reconnected after" in x)
    outage = float(line.split("reconnected after ")[1].split()[0])
    assert outage >= 6, log
    c = summary(out)
    assert c["sent"] == c["results"] + c["dropped"] + c["unanswered"], out
    assert "lost 1 time(s), reconnected 1 time(s)" in out, log + out
    skipped = int(out.split("outage:        ")[1].split()[0])
    assert skipped >= 50, out  # 10 fps for 6 s and more, counted apart from pacing slips
    assert c["results"] > 0
