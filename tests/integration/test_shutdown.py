"""SIGTERM under load: stop accepting, answer every received frame, close clients, exit 0 within 5 s, logs flushed."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import pytest

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import bus_jpeg, frame
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, hello_msg

LOAD_S = 1.5
EXIT_LIMIT_S = 5.0


@dataclass
class Cam:
    """One camera under load: when each frame reached the kernel, and what answered it."""

    name: str
    lossless: bool
    fps: float  # 0: as fast as the server lets it
    sent_at: dict[int, float] = field(default_factory=dict)
    answers: dict[int, str] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    shutdown_notice: bool = False
    unexpected: list[dict] = field(default_factory=list)

    async def run(self, port: int, image: bytes, shutdown_seen: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # drain() then returns only once every byte is in the kernel: "sent" means sent.
        writer.transport.set_write_buffer_limits(high=0)
        writer.write(encode(hello_msg(self.name, drop=not self.lossless)))
        await writer.drain()
        reading = asyncio.create_task(self._read(reader, shutdown_seen))
        fid = 0
        try:
            while not reading.done():
                writer.write(encode(frame(self.name, fid, image)))
                await writer.drain()
                self.sent_at[fid] = time.monotonic()
                fid += 1
                await asyncio.sleep(1 / self.fps if self.fps else 0)
        except (ConnectionError, OSError):
            pass
        await reading
        writer.close()

    async def _read(self, reader: asyncio.StreamReader, shutdown_seen: asyncio.Event) -> None:
        decoder = FrameDecoder(limits=CLIENT_LIMITS)
        while True:
            try:
                data = await reader.read(1 << 16)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            for msg in decoder.feed(data):
                kind = msg.get("type")
                if kind in ("result", "dropped"):
                    fid = msg["frame_id"]
                    if fid in self.answers:
                        self.duplicates.append(fid)
                    self.answers[fid] = msg.get("reason", "result")
                    if msg.get("reason") == "shutdown":
                        shutdown_seen.set()
                elif kind == "error" and msg["code"] == "shutdown":
                    self.shutdown_notice = True
                elif kind != "welcome":
                    self.unexpected.append(msg)


async def probe_until_exit(port: int, proc, welcomed: list[dict]) -> int:
    """Once shutdown is under way, keep trying to join: nobody may be welcomed any more."""
    tries = 0
    while proc.poll() is None:
        tries += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.02)
            continue
        try:
            writer.write(encode(hello_msg(f"late-{tries}")))
            data = await asyncio.wait_for(reader.read(1 << 16), 1)
            for msg in FrameDecoder(limits=CLIENT_LIMITS).feed(data) if data else []:
                if msg.get("type") == "welcome":
                    welcomed.append(msg)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
        await asyncio.sleep(0.02)
    return tries


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_answers_every_sent_frame(tmp_path, workers):
    require(COCO_MODEL)
    cams = [Cam("rt-0", False, 50), Cam("rt-1", False, 50), Cam("rt-2", False, 50),
            Cam("lossless-0", True, 0), Cam("lossless-1", True, 0)]
    with running_server(tmp_path, "--shutdown-grace", "3", workers=workers) as srv:

        async def scenario() -> tuple[float, float, list[dict], int]:
            image = bus_jpeg()
            shutdown_seen = asyncio.Event()
            runs = [asyncio.create_task(c.run(srv.tcp_port, image, shutdown_seen)) for c in cams]
            await asyncio.sleep(LOAD_S)
            t_sig = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            welcomed: list[dict] = []
            await asyncio.wait_for(shutdown_seen.wait(), EXIT_LIMIT_S)
            prober = asyncio.create_task(probe_until_exit(srv.tcp_port, srv.proc, welcomed))
            await asyncio.wait_for(asyncio.to_thread(srv.proc.wait), EXIT_LIMIT_S + 5)
            exited = time.monotonic() - t_sig
            await asyncio.wait_for(asyncio.gather(*runs), 10)
            return t_sig, exited, welcomed, await prober

        t_sig, exited, welcomed, probes = asyncio.run(scenario())
        log_file = (tmp_path / "logs" / "server.log").read_text()

    assert srv.proc.returncode == 0
    assert exited < EXIT_LIMIT_S, f"took {exited:.2f}s to exit"
    assert "stopped in" in log_file.splitlines()[-1], log_file[-500:]
    assert probes > 0 and welcomed == [], "a client was admitted during shutdown"
    totals = {"sent_before": 0, "result": 0, "shutdown": 0}
    for cam in cams:
        before = {fid for fid, t in cam.sent_at.items() if t < t_sig}
        missing = sorted(before - cam.answers.keys())
        assert not missing, f"{cam.name}: frames sent before SIGTERM never answered: {missing[:20]}"
        assert not cam.duplicates and not cam.unexpected, (cam.name, cam.duplicates, cam.unexpected)
        assert cam.answers.keys() <= cam.sent_at.keys()
        assert cam.shutdown_notice, f"{cam.name} was closed without the shutdown notice"
        totals["sent_before"] += len(before)
        totals["result"] += sum(a == "result" for a in cam.answers.values())
        totals["shutdown"] += sum(a == "shutdown" for a in cam.answers.values())
    print(f"\nworkers={workers}: exit {exited:.2f}s after SIGTERM; {totals}")
    assert totals["result"] > 0 and totals["shutdown"] > 0  # it really was under load
