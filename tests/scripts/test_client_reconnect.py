"""client.py against a scripted stand-in server: a connection lost mid-stream is re-established and the
loss is counted; a server that never answers is summarised after the grace period."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import asset
from tests.scripts.scriptutil import StandInServer, jsonl, run_script, summary
from visionstream.wire.protocol import FrameDecoder, encode, welcome_msg


class ScriptedServer(StandInServer):
    """Protocol v1 on a thread: welcomes every hello; on its first connection answers frames until
    `hang_up_after`, swallows two more and then closes; later connections answer everything."""

    def __init__(self, hang_up_after: int | None = None, answer: bool = True) -> None:
        self.hang_up_after = hang_up_after
        self.answer = answer
        self.connections = 0
        self.hellos: list[dict] = []
        super().__init__()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        decoder = FrameDecoder()
        frames = 0
        while data := await reader.read(1 << 16):
            for msg in decoder.feed(data):
                if msg["type"] == "hello":
                    self.hellos.append(msg)
                    writer.write(encode(welcome_msg(model="scripted", names={0: "person"},
                                                    stream_name=msg["stream_name"], drop=msg["drop"])))
                elif msg["type"] == "frame":
                    frames += 1
                    if first and self.hang_up_after is not None and frames > self.hang_up_after:
                        if frames == self.hang_up_after + 2:
                            writer.close()
                            return
                        continue
                    if self.answer:
                        writer.write(encode({
                            "type": "result", "stream_name": msg["stream_name"], "frame_id": msg["frame_id"],
                            "detections": [], "latency_ms": 1.0, "timings": {}, "timestamp": msg["timestamp"],
                        }))
            await writer.drain()
        writer.close()


@pytest.fixture
def flaky() -> Iterator[ScriptedServer]:
    with ScriptedServer(hang_up_after=5) as srv:
        yield srv


def test_lost_connection_is_retried_and_reported(flaky: ScriptedServer, tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "2", "--stream", "flaky", "--fps", "20", "--max-frames", "20",
                      "--width", "64", "--height", "48", "--port", flaky.port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    c = summary(proc.stdout)
    assert c["sent"] == 20 and c["sent"] == c["results"] + c["dropped"] + c["unanswered"]
    assert c["unanswered"] >= 2  # the two frames swallowed before the hang-up, at least
    assert "lost with the connection" in proc.stdout
    assert "lost 1 time(s), reconnected 1 time(s)" in proc.stdout
    assert flaky.connections == 2 and len(flaky.hellos) == 2  # hello again after reconnecting
    assert "connection lost" in proc.stderr and "reconnecting for up to 60s" in proc.stderr
    assert "reconnected after" in proc.stderr
    lines = jsonl(tmp_path / "results" / "flaky.jsonl")
    assert sorted(x["frame_id"] for x in lines) == list(range(20))
    lost = [x for x in lines if x["type"] == "unanswered"]
    assert len(lost) == c["unanswered"] and all(x["reason"] == "connection_lost" for x in lost)


def test_silent_server_counts_unanswered_after_grace(tmp_path: Path) -> None:
    with ScriptedServer(answer=False) as srv:
        proc = run_script("client.py", "--mode", "1", "--folder", ".", "--fps", "50", "--grace", "0.5",
                          "--stream", "silent", "--quiet", "--port", srv.port, cwd=_folder(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout) == {"sent": 2, "results": 0, "dropped": 0, "unanswered": 2}
    assert "2 without a reply after the 0.5s grace period" in proc.stdout
    assert srv.hellos[0]["drop"] is False  # a folder asks for lossless mode


def test_allow_drops_opts_out_of_lossless(tmp_path: Path) -> None:
    with ScriptedServer() as srv:
        proc = run_script("client.py", "--mode", "1", "--folder", ".", "--fps", "50", "--allow-drops",
                          "--stream", "drops", "--quiet", "--port", srv.port, cwd=_folder(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert srv.hellos[0]["drop"] is True


def _folder(tmp_path: Path) -> Path:
    shutil.copy(asset("bus.jpg"), tmp_path / "bus.jpg")
    shutil.copy(asset("zidane.jpg"), tmp_path / "zidane.jpg")
    return tmp_path
