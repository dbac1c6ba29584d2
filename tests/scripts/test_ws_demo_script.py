"""ws_demo_client.py as a user runs it: live events from the real server, reconnects, clean failures."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

from tests.helpers import COCO_MODEL, ServerHandle, free_port, require, running_server
from tests.scripts.scriptutil import LineReader, run_script, start_script


def stream_until_stopped(server: ServerHandle, stream: str, cwd: Path) -> subprocess.Popen[str]:
    """A synthetic client that keeps streaming (up to 60 s) until the test interrupts it."""
    return start_script("client.py", "--mode", "2", "--stream", stream, "--fps", "10", "--duration", "60",
                        "--width", "320", "--height", "240", "--quiet", "--no-save", "--grace", "1",
                        "--port", server.tcp_port, cwd=cwd)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_count_3_prints_three_events_while_a_client_streams(server: ServerHandle, tmp_path: Path) -> None:
    ws = start_script("ws_demo_client.py", "--api-port", server.api_port, "--stream", "wsdemo", "--count", "3",
                      cwd=tmp_path)
    client = None
    try:
        err = LineReader(ws.stderr)
        assert err.wait_for("connected to"), "".join(err.lines)
        client = stream_until_stopped(server, "wsdemo", tmp_path)
        out = ws.stdout.read()  # EOF when the viewer exits after its third event
        ws.wait(30)
    finally:
        stop(ws)
        if client is not None:
            stop(client)
    assert ws.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]  # one JSON object per line
    assert all(e["type"] == "result" and e["stream_name"] == "wsdemo" for e in events)
    assert [e["frame_id"] for e in events] == sorted(e["frame_id"] for e in events)
    assert all("detections" in e and "latency_ms" in e for e in events)


def test_pretty_prints_indented_json(server: ServerHandle, tmp_path: Path) -> None:
    ws = start_script("ws_demo_client.py", "--api-port", server.api_port, "--stream", "wspretty", "--count",
                      "1", "--pretty", cwd=tmp_path)
    client = None
    try:
        assert LineReader(ws.stderr).wait_for("connected to")
        client = stream_until_stopped(server, "wspretty", tmp_path)
        out = ws.stdout.read()
        ws.wait(30)
    finally:
        stop(ws)
        if client is not None:
            stop(client)
    assert ws.returncode == 0
    assert json.loads(out)["stream_name"] == "wspretty" and out.count("\n") > 3


def test_refused_token_is_one_line_and_not_retried(tmp_path: Path) -> None:
    require(COCO_MODEL)
    with running_server(tmp_path, "--token", "sekret") as srv:
        proc = run_script("ws_demo_client.py", "--api-port", srv.api_port, "--token", "wrong", "--quiet",
                          cwd=tmp_path, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "refused" in proc.stderr


def test_no_server_gives_up_after_max_retries(tmp_path: Path) -> None:
    # --connect-for -1: the first connection too is bounded by --max-retries rather than by time.
    proc = run_script("ws_demo_client.py", "--api-port", free_port(), "--max-retries", "2", "--connect-for", "-1",
                      cwd=tmp_path)
    assert proc.returncode == 1
    assert "not reachable" in proc.stderr.splitlines()[-1] and "gave up after 2 retries" in proc.stderr


def run_ws_server(port: int, events: list[dict], stop: threading.Event, ready: threading.Event) -> None:
    """A stand-in /ws endpoint on a fixed port that sends `events`, then stays open until stopped."""

    async def handler(conn: ServerConnection) -> None:
        for event in events:
            await conn.send(json.dumps(event))
        while not stop.is_set():
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port):
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(main())


def test_reconnects_when_the_server_restarts(tmp_path: Path) -> None:
    """A server that goes away and comes back on the same port: the viewer carries on printing."""
    port = free_port()

    def start(events: list[dict]) -> tuple[threading.Thread, threading.Event]:
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=run_ws_server, args=(port, events, stop, ready), daemon=True)
        t.start()
        assert ready.wait(10)
        return t, stop

    first, stop_first = start([{"type": "result", "stream_name": "a", "frame_id": 1}])
    ws = start_script("ws_demo_client.py", "--api-port", port, "--count", "2", cwd=tmp_path)
    try:
        err = LineReader(ws.stderr)
        assert err.wait_for("connected to")
        time.sleep(0.5)
        stop_first.set()  # the "restart": connection closes, port refuses for a moment
        first.join(10)
        assert err.wait_for("retrying"), "".join(err.lines)
        second, stop_second = start([{"type": "result", "stream_name": "a", "frame_id": 2}])
        try:
            out, _ = ws.communicate(timeout=20)
        finally:
            stop_second.set()
            second.join(10)
    finally:
        if ws.poll() is None:
            ws.kill()
            ws.wait()
    assert ws.returncode == 0
    assert [json.loads(line)["frame_id"] for line in out.splitlines()] == [1, 2]


def test_ctrl_c_exits_cleanly(tmp_path: Path) -> None:
    ws = start_script("ws_demo_client.py", "--api-port", free_port(), "--max-retries", "-1", "--connect-for", "-1",
                      cwd=tmp_path)
    try:
        assert LineReader(ws.stderr).wait_for("retrying")
        ws.send_signal(signal.SIGINT)
        ws.wait(10)
    finally:
        if ws.poll() is None:
            ws.kill()
            ws.wait()
    assert ws.returncode == 0
