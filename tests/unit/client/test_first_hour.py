"""Issue 13's client pieces without the scripts: URL masking, the pacing catch-up after a gap, an HTTP
answer on the frame port split across reads, and ResultLog's overwrite."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from visionstream.client.connection import Connection
from visionstream.client.pacing import PacingSchedule, retry_delays
from visionstream.client.sources import is_url, mask_url
from visionstream.client.streamer import ResultLog
from visionstream.wire.errors import WrongPort
from visionstream.wire.protocol import encode


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:hunter2@10.0.0.5:554/stream1", "rtsp://***@10.0.0.5:554/stream1"),
    ("http://cam.local/video.mjpg?token=abc&size=640", "http://cam.local/video.mjpg?token=***&size=640"),
    ("https://x/y.mp4", "https://x/y.mp4"),
])
def test_mask_url_hides_credentials(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_is_url_only_for_stream_schemes() -> None:
    assert is_url("rtsp://cam/1") and is_url("HTTP://x/v.avi") and is_url("rtmp://x/live")
    assert not is_url("video.mp4") and not is_url("C:/videos/a.mp4") and not is_url("file:///tmp/a.mp4")


def test_catch_up_skips_the_slots_of_a_gap_apart_from_pacing_slips() -> None:
    sched = PacingSchedule(10.0, 0.0)
    assert sched.advance(0.01) == pytest.approx(0.1)
    due, skipped = sched.catch_up(6.05)  # six seconds without a server
    assert skipped == 59 and due == pytest.approx(6.0) and sched.skipped == 0
    assert sched.catch_up(6.06) == (pytest.approx(6.0), 0)  # nothing more to skip


def test_retry_delays_double_to_the_cap_with_jitter() -> None:
    it = retry_delays(0.25, 2.0, 0.25)
    delays = [next(it) for _ in range(8)]
    for got, nominal in zip(delays, [0.25, 0.5, 1, 2, 2, 2, 2, 2], strict=True):
        assert nominal * 0.75 <= got <= nominal * 1.25


def recv_from(*chunks: bytes) -> Any:
    async def main() -> Any:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        conn = Connection(reader, _NullWriter(), host="127.0.0.1", port=8000)  # type: ignore[arg-type]
        return await conn.recv()

    return asyncio.run(main())


class _NullWriter:
    def get_extra_info(self, name: str) -> None:
        return None


def test_an_http_answer_is_recognised_however_it_is_split() -> None:
    for chunks in ([b"HTTP/1.1 400 Bad Request\r\n"], [b"HT", b"TP", b"/1.1 400"]):
        with pytest.raises(WrongPort, match=re.escape("127.0.0.1:8000 answered HTTP: that is the server's API port")):
            recv_from(*chunks)
    msg = encode({"type": "pong", "id": 1})
    assert recv_from(msg[:2], msg[2:]) == {"type": "pong", "id": 1}  # a real reply, split early, still decodes


def test_result_log_appends_by_default_and_overwrites_on_request(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    for overwrite, expected in ((False, 1), (False, 2), (True, 1)):
        with ResultLog(path, overwrite=overwrite) as log:
            log.write({"type": "run"})
        assert len(path.read_text().splitlines()) == expected
