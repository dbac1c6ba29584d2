"""WebSocket watcher helpers: URL building, backoff, event formatting and the stream filter."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from visionstream.client import ws_events
from visionstream.client.ws_events import WatchError, backoff_delays, build_url, format_event, wanted, watch


def test_build_url_quotes_query_values() -> None:
    assert build_url("127.0.0.1", 8000) == "ws://127.0.0.1:8000/ws"
    assert build_url("h", 1, stream="cam 1", token="a&b") == "ws://h:1/ws?stream=cam+1&token=a%26b"
    assert build_url("::1", 8000) == "ws://[::1]:8000/ws"


def test_backoff_doubles_up_to_the_cap() -> None:
    assert list(itertools.islice(backoff_delays(0.5, 2, 3), 5)) == [0.5, 1.0, 2.0, 3, 3]


def test_format_event_one_line_or_pretty() -> None:
    raw = '{"type": "result",\n "frame_id": 3}'
    assert format_event(raw) == '{"type":"result","frame_id":3}'
    assert format_event(raw.encode()) == '{"type":"result","frame_id":3}'
    assert json.loads(format_event(raw, pretty=True)) == {"type": "result", "frame_id": 3}
    assert "\n" in format_event(raw, pretty=True)
    assert format_event("not json") == "not json"


def test_stream_filter_keeps_unnamed_and_matching_events() -> None:
    assert wanted('{"stream_name": "a"}', "a")
    assert not wanted('{"stream_name": "b"}', "a")
    assert wanted('{"type": "hello"}', "a") and wanted("[1]", "a") and wanted("junk", "a")
    assert wanted('{"stream_name": "b"}', None)


class Refused:
    """Stands in for websockets' connect: every attempt fails as a closed port would."""

    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self, url: str, **kw: object) -> Refused:
        self.attempts += 1
        return self

    async def __aenter__(self) -> None:
        raise ConnectionRefusedError(111, "Connect call failed")

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_watch_gives_up_after_max_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = Refused()
    monkeypatch.setattr(ws_events, "connect", refused)
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    with pytest.raises(WatchError, match="gave up after 2 retries"):
        asyncio.run(watch("ws://127.0.0.1:1/ws", print, max_retries=2, sleep=fake_sleep, connect_for=-1))
    assert refused.attempts == 3 and slept == [0.5, 1.0]


def test_watch_rejects_a_bad_url() -> None:
    with pytest.raises(WatchError, match="bad WebSocket URL"):
        asyncio.run(watch("http://x/ws", print))
