"""Streamer logic without sockets: summary maths, JSONL lines, reply matching and reconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import visionstream.client.streamer as streamer_mod
from visionstream.client.connection import ClientError
from visionstream.client.sources import FrameSource, SourceFrame, SyntheticSource
from visionstream.client.streamer import (
    ClientStreamStats,
    ResultLog,
    StreamConfig,
    Streamer,
)

# --------------------------------------------------------------------------- summary maths


def test_stats_balance_and_format() -> None:
    stats = ClientStreamStats(stream="s", source="synthetic", sent=10, results=6, lost=1, no_reply=1, grace_s=5)
    stats.drops.update({"superseded": 1, "stale": 1})
    stats.e2e_ms.extend([10, 20, 30, 40, 50, 60])
    assert stats.dropped == 2 and stats.unanswered == 2 and stats.balanced
    text = stats.format()
    assert "frames sent:   10" in text and "results:       6" in text
    assert "dropped:       2 (stale: 1, superseded: 1)" in text
    assert "unanswered:    2 (1 lost with the connection; 1 without a reply" in text
    assert "p50 35.0" in text
    d = stats.to_dict()
    assert d["e2e_ms"]["p50"] == pytest.approx(35.0) and d["drops"] == {"superseded": 1, "stale": 1}
    stats.results = 7
    assert not stats.balanced and "do not add up" in stats.format()


# --------------------------------------------------------------------------- results file


def test_result_log_flushes_each_line_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "results" / "s.jsonl"
    log = ResultLog(path)
    assert not path.exists()  # nothing written yet, no empty file
    log.write({"frame_id": 0, "image": b"abc"})
    log.write({"frame_id": 1})
    # Readable before close: a crash must not lose lines already answered.
    lines = path.read_text().splitlines()
    assert [json.loads(line)["frame_id"] for line in lines] == [0, 1]
    assert json.loads(lines[0])["image"] == "<3 bytes>"
    log.close()
    with pytest.raises(ValueError):
        log.write({"frame_id": 2})
    with ResultLog(path) as again:
        again.write({"frame_id": 2})
    assert len(path.read_text().splitlines()) == 3


# --------------------------------------------------------------------------- streamer with a scripted server


class FakeConn:
    """Stands in for visionstream.client.connection.Connection; the test's `server` callback decides the replies."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.frames: list[int] = []
        self.closed = False
        self.welcome = {"type": "welcome", "model": "fake", "drop": server.drop}

    async def send_frame(self, stream: str, frame_id: int, image: bytes, **kw: Any) -> float:
        if self.closed:
            raise ConnectionResetError("connection reset")
        self.frames.append(frame_id)
        self.server.on_frame(self, frame_id)
        return kw["timestamp"]

    async def recv(self) -> dict[str, Any] | None:
        return await self.inbox.get()

    def reply(self, msg: dict[str, Any]) -> None:
        self.inbox.put_nowait(msg)

    def hang_up(self) -> None:
        self.closed = True
        self.inbox.put_nowait(None)

    async def close(self) -> None:
        if not self.closed:
            self.hang_up()


class FakeServer:
    def __init__(self, on_frame: Callable[[FakeConn, int], None], *, refuse_after: int | None = None) -> None:
        self.on_frame = on_frame
        self.conns: list[FakeConn] = []
        self.refuse_after = refuse_after
        self.drop = True

    async def connect(self, host: str, port: int, stream: str, **kw: Any) -> FakeConn:
        if self.refuse_after is not None and len(self.conns) >= self.refuse_after:
            raise ClientError(f"server {host}:{port} not reachable after 4 attempts")
        self.drop = kw["drop"]
        conn = FakeConn(self)
        self.conns.append(conn)
        return conn


def result(frame_id: int, **extra: Any) -> dict[str, Any]:
    return {"type": "result", "stream_name": "s", "frame_id": frame_id, "latency_ms": 5.0,
            "detections": [{"label": "person", "cls": 0, "conf": 0.9, "bbox": [0, 0, 1, 1]}], **extra}


class CountingSource(FrameSource):
    kind = "folder"
    finite = True

    def __init__(self, n: int) -> None:
        self.n = n
        self.i = 0

    def read(self) -> SourceFrame | None:
        if self.i >= self.n:
            return None
        self.i += 1
        return SourceFrame(np.zeros((8, 8, 3), np.uint8), {"source": f"img{self.i - 1}.jpg"})


def run_streamer(monkeypatch: pytest.MonkeyPatch, server: FakeServer, source: FrameSource,
                 results: ResultLog | None = None, **cfg: Any) -> tuple[Streamer, ClientStreamStats]:
    monkeypatch.setattr(streamer_mod, "connect", server.connect)
    config = StreamConfig(host="h", port=1, stream="s", **{"fps": 500.0, "grace": 0.3, **cfg})
    streamer = Streamer(config, source, results=results)
    return streamer, asyncio.run(streamer.run())


def test_every_frame_answered_and_logged_with_its_source(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    server = FakeServer(lambda conn, fid: conn.reply(result(fid)))
    log = ResultLog(tmp_path / "s.jsonl")
    _, stats = run_streamer(monkeypatch, server, CountingSource(5), results=log, lossless=True)
    log.close()
    assert server.drop is False  # lossless asked for in hello
    assert (stats.sent, stats.results, stats.unanswered, stats.dropped) == (5, 5, 0, 0)
    assert stats.balanced and stats.detections == 5 and len(stats.e2e_ms) == 5
    head, *lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert head["type"] == "run" and head["stream_name"] == "s" and head["model"] == "fake"
    assert head["server"] == "h:1" and head["source"] == "folder" and head["mode"] == "lossless"
    assert [(x["frame_id"], x["source"]) for x in lines] == [(i, f"img{i}.jpg") for i in range(5)]
    assert all(x["e2e_ms"] >= 0 and x["latency_ms"] == 5.0 for x in lines)


def test_drops_errors_and_silence_are_all_accounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def on_frame(conn: FakeConn, fid: int) -> None:
        if fid == 1:
            conn.reply({"type": "dropped", "stream_name": "s", "frame_id": fid, "reason": "superseded"})
        elif fid == 2:
            conn.reply({"type": "error", "code": "bad_field", "message": "x", "frame_id": fid})
        elif fid == 3:
            pass  # never answered
        else:
            conn.reply(result(fid))

    log = ResultLog(tmp_path / "s.jsonl")
    _, stats = run_streamer(monkeypatch, FakeServer(on_frame), CountingSource(5), results=log, grace=0.2)
    log.close()
    assert stats.results == 2 and dict(stats.drops) == {"superseded": 1, "error:bad_field": 1}
    assert stats.no_reply == 1 and stats.lost == 0 and stats.balanced
    kinds = {x["frame_id"]: x for x in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())
             if x["type"] != "run"}
    assert kinds[3]["type"] == "unanswered" and kinds[3]["reason"] == "no_reply"
    assert kinds[3]["source"] == "img3.jpg" and kinds[3]["e2e_ms"] is None
    assert len(kinds) == 5


def test_lost_connection_is_reconnected_and_the_loss_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_frame(conn: FakeConn, fid: int) -> None:
        # First connection: answers frame 0, swallows 1 and 2, then hangs up.
        if conn is server.conns[0]:
            if fid == 0:
                conn.reply(result(fid))
            elif fid == 2:
                conn.hang_up()
        else:
            conn.reply(result(fid))

    server = FakeServer(on_frame)
    _, stats = run_streamer(monkeypatch, server, CountingSource(8))
    assert len(server.conns) == 2 and stats.disconnects == 1 and stats.reconnects == 1
    assert stats.lost == 2 and stats.results == 6 and stats.sent == 8 and stats.balanced
    assert server.conns[1].frames == [3, 4, 5, 6, 7]  # ids keep counting on the new connection
    assert stats.failure is None


def test_reconnect_failure_stops_the_stream_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_frame(conn: FakeConn, fid: int) -> None:
        conn.reply(result(fid))
        if fid == 1:
            conn.hang_up()

    server = FakeServer(on_frame, refuse_after=1)
    _, stats = run_streamer(monkeypatch, server, CountingSource(10))
    assert stats.sent == 2 and stats.results <= 2 and stats.balanced
    assert stats.failure is not None and "reconnecting failed" in stats.failure


def test_reconnect_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_frame(conn: FakeConn, fid: int) -> None:
        conn.reply(result(fid))
        conn.hang_up()  # every connection dies after one frame

    server = FakeServer(on_frame)
    _, stats = run_streamer(monkeypatch, server, CountingSource(10), reconnects=2)
    assert len(server.conns) == 3 and stats.sent == 3 and stats.balanced
    assert stats.failure is not None and "budget (2)" in stats.failure


def test_first_connection_failure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ClientError, match="not reachable"):
        run_streamer(monkeypatch, FakeServer(lambda c, f: None, refuse_after=0), CountingSource(1))


def test_duration_and_fps_bound_an_endless_source(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(lambda conn, fid: conn.reply(result(fid)))
    _, stats = run_streamer(monkeypatch, server, SyntheticSource(8, 8), fps=50.0, duration=0.2)
    # Slots at 0, 20, ..., 180 ms: ten frames, give or take one for scheduling jitter on a busy box.
    assert 8 <= stats.sent <= 10 and stats.balanced and stats.results == stats.sent


def test_stop_ends_an_endless_source_and_waits_for_outstanding(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> ClientStreamStats:
        def on_frame(conn: FakeConn, fid: int) -> None:
            asyncio.get_running_loop().call_later(0.05, conn.reply, result(fid))
            if fid == 3:
                streamer.interrupt()

        server = FakeServer(on_frame)
        monkeypatch.setattr(streamer_mod, "connect", server.connect)
        streamer = Streamer(StreamConfig(host="h", port=1, stream="s", fps=100.0), SyntheticSource(8, 8))
        return await streamer.run()

    stats = asyncio.run(scenario())
    assert stats.interrupted and stats.sent == 4 and stats.results == 4 and stats.balanced


def test_hooks_see_each_frame_and_its_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, Any]] = []
    server = FakeServer(lambda conn, fid: conn.reply(result(fid)))
    monkeypatch.setattr(streamer_mod, "connect", server.connect)
    streamer = Streamer(
        StreamConfig(host="h", port=1, stream="s", fps=500.0), CountingSource(2),
        on_sent=lambda fid, frame: seen.append(("sent", fid, frame.meta["source"])),
        on_reply=lambda msg, pending, e2e: seen.append((msg["type"], msg["frame_id"], pending.meta["source"])),
    )
    asyncio.run(streamer.run())
    assert seen == [("sent", 0, "img0.jpg"), ("result", 0, "img0.jpg"),
                    ("sent", 1, "img1.jpg"), ("result", 1, "img1.jpg")]


def test_oversized_raw_frame_is_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer(lambda conn, fid: conn.reply(result(fid)))
    with pytest.raises(ClientError, match="message limit"):
        run_streamer(monkeypatch, server, SyntheticSource(2600, 2200), encoding="raw")
