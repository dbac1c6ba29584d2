"""Result fan-out to WebSocket viewers: stream filters, bounded queues, no work without viewers."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from visionstream.server import broadcast
from visionstream.server.broadcast import Broadcaster, Subscriber
from visionstream.server.stats import Stats


@pytest.fixture
def stats() -> Stats:
    return Stats(model="m", device="cpu", workers=1, clock=lambda: 0.0)


def event(stream: str, n: int) -> dict[str, Any]:
    return {"type": "result", "stream_name": stream, "frame_id": n, "detections": [{"label": "person"}]}


def drain(sub: Subscriber) -> list[dict[str, Any]]:
    out = []
    while not sub.queue.empty():
        out.append(json.loads(sub.queue.get_nowait()))
    return out


def test_subscriber_filter_by_stream(stats: Stats) -> None:
    b = Broadcaster(stats, queue_size=16)
    everything = b.subscribe()
    cam1 = b.subscribe("cam1")
    cam2 = b.subscribe("cam2")
    for n, name in enumerate(["cam1", "cam2", "cam1", "cam3"]):
        b.publish(event(name, n))
    assert [e["frame_id"] for e in drain(everything)] == [0, 1, 2, 3]
    assert [e["frame_id"] for e in drain(cam1)] == [0, 2]
    assert [e["frame_id"] for e in drain(cam2)] == [1]
    assert stats.ws_events_dropped == 0  # filtered-out events are not losses


def test_published_text_is_compact_json_of_the_event(stats: Stats) -> None:
    b = Broadcaster(stats)
    sub = b.subscribe()
    ev = event("cam", 7)
    b.publish(ev)
    text = sub.queue.get_nowait()
    assert json.loads(text) == ev
    assert ", " not in text and ": " not in text


def test_event_without_a_stream_name_reaches_only_unfiltered_viewers(stats: Stats) -> None:
    b = Broadcaster(stats)
    all_ = b.subscribe()
    cam = b.subscribe("cam")
    b.publish({"type": "notice"})
    assert drain(all_) == [{"type": "notice"}]
    assert drain(cam) == []


def test_slow_subscriber_loses_the_oldest_events_and_they_are_counted(stats: Stats) -> None:
    b = Broadcaster(stats, queue_size=3)
    slow = b.subscribe()
    fast = b.subscribe()
    fast_seen = []
    for n in range(10):
        b.publish(event("cam", n))
        fast_seen += drain(fast)  # this viewer keeps up
    assert [e["frame_id"] for e in fast_seen] == list(range(10))
    assert slow.queue.qsize() == 3
    assert [e["frame_id"] for e in drain(slow)] == [7, 8, 9]  # newest kept, oldest lost
    assert slow.lost == 7
    assert fast.lost == 0
    assert stats.ws_events_dropped == 7
    assert stats.snapshot()["ws_events_dropped"] == 7


def test_slow_filtered_subscriber_only_counts_its_own_stream(stats: Stats) -> None:
    b = Broadcaster(stats, queue_size=2)
    sub = b.subscribe("cam1")
    for n in range(6):
        b.publish(event("cam1" if n % 2 else "cam2", n))  # three cam1 events: 1, 3, 5
    assert [e["frame_id"] for e in drain(sub)] == [3, 5]
    assert sub.lost == 1
    assert stats.ws_events_dropped == 1


def test_subscriber_push_return_value() -> None:
    sub = Subscriber(None, maxsize=1)
    assert sub.push("cam", "a") is True
    assert sub.push("cam", "b") is False  # "a" had to go
    assert sub.queue.get_nowait() == "b"
    filtered = Subscriber("cam1", maxsize=1)
    assert filtered.push("cam2", "x") is True
    assert filtered.queue.empty()


def test_subscribe_and_unsubscribe_track_ws_clients(stats: Stats) -> None:
    b = Broadcaster(stats)
    s1 = b.subscribe()
    s2 = b.subscribe("cam")
    assert stats.ws_clients == 2
    b.unsubscribe(s1)
    assert stats.ws_clients == 1
    b.unsubscribe(s1)  # twice is harmless
    assert stats.ws_clients == 1
    b.publish(event("cam", 1))
    assert s1.queue.empty()
    assert not s2.queue.empty()
    b.unsubscribe(s2)
    assert stats.ws_clients == 0


def test_no_json_work_without_subscribers(stats: Stats, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_dumps(obj: Any, **kwargs: Any) -> str:
        calls.append(obj)
        return json.dumps(obj, **kwargs)

    monkeypatch.setattr(broadcast, "json", SimpleNamespace(dumps=counting_dumps))
    b = Broadcaster(stats)
    for n in range(100):
        b.publish(event("cam", n))
    assert calls == []
    sub = b.subscribe()
    b.unsubscribe(sub)
    b.publish(event("cam", 0))
    assert calls == []
    # With viewers, each event is serialised once, however many viewers there are.
    subs = [b.subscribe() for _ in range(5)]
    b.publish(event("cam", 1))
    assert len(calls) == 1
    assert all(s.queue.qsize() == 1 for s in subs)
