"""The dashboard's newest-frame store and history sampler: references not copies, encode once, bounded memory."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest

from visionstream.server import latest as latest_module
from visionstream.server.history import History
from visionstream.server.latest import GONE_AFTER_S, LatestFrames
from visionstream.server.stats import RECENT_STREAMS, Stats, StreamStats
from visionstream.wire.protocol import Frame


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def image() -> np.ndarray:
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, 32:] = (0, 0, 255)  # right half red: survives a JPEG round trip recognisably
    return img


def jpeg_frame(name: str = "cam", fid: int = 0) -> Frame:
    return Frame(name, fid, 0.0, cv2.imencode(".jpg", image())[1].tobytes(), None, None)


def test_record_keeps_the_sent_bytes_themselves_and_serves_them_as_sent() -> None:
    store = LatestFrames()
    frame = jpeg_frame()
    store.record(frame, StreamStats("cam"), [{"label": "bus"}], (64, 48))
    entry = store.get("cam")
    assert entry is not None and entry.frame is frame
    assert asyncio.run(store.jpeg(entry)) is frame.image  # no copy, no re-encoding
    store.record(jpeg_frame(fid=1), StreamStats("cam"), [], (64, 48))
    assert len(store) == 1 and store.get("cam").frame.frame_id == 1  # type: ignore[union-attr]
    assert store.get("other") is None


@pytest.mark.parametrize("kind", ["raw", "png"])
def test_raw_and_png_frames_are_encoded_once_however_many_ask(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img = image()
    frame = (Frame("cam", 0, 0.0, img.tobytes(), "raw", img.shape) if kind == "raw"  # type: ignore[arg-type]
             else Frame("cam", 0, 0.0, cv2.imencode(".png", img)[1].tobytes(), None, None))
    calls = []
    real = latest_module.encode_jpeg
    monkeypatch.setattr(latest_module, "encode_jpeg", lambda f: calls.append(f) or real(f))
    store = LatestFrames()
    store.record(frame, StreamStats("cam"), [], (64, 48))
    entry = store.get("cam")
    assert entry is not None and entry.jpeg is None  # recording encodes nothing

    async def many() -> list[bytes]:
        return await asyncio.gather(*(store.jpeg(entry) for _ in range(5)))

    outs = asyncio.run(many())
    assert len(calls) == 1 and all(o is outs[0] for o in outs)
    assert asyncio.run(store.jpeg(entry)) is outs[0] and len(calls) == 1
    decoded = cv2.imdecode(np.frombuffer(outs[0], np.uint8), cv2.IMREAD_COLOR)
    assert outs[0].startswith(b"\xff\xd8\xff") and decoded.shape == img.shape
    assert decoded[24, 48, 2] > 200 and decoded[24, 8, 2] < 50  # the same picture


def test_a_stream_that_left_keeps_its_frame_for_the_grey_out_period_then_loses_it() -> None:
    clock = Clock()
    store = LatestFrames(clock=clock)
    live, gone = StreamStats("live"), StreamStats("gone")
    store.record(jpeg_frame("live"), live, [], (64, 48))
    store.record(jpeg_frame("gone"), gone, [], (64, 48))
    gone.connected = False
    clock.now += 1.0
    assert set(store.entries()) == {"live", "gone"}  # noticed gone now: the period starts here
    clock.now += GONE_AFTER_S - 0.5
    assert store.get("gone") is not None
    clock.now += 1.0
    assert store.get("gone") is None and set(store.entries()) == {"live"}
    clock.now += 10 * GONE_AFTER_S
    assert store.get("live") is not None  # a live stream's frame stays however old


def test_recording_prunes_without_any_reader_and_gone_frames_are_capped() -> None:
    clock = Clock()
    store = LatestFrames(clock=clock)
    for i in range(RECENT_STREAMS + 10):
        st = StreamStats(f"cam{i}")
        store.record(jpeg_frame(f"cam{i}"), st, [], (64, 48))
        st.connected = False
        clock.now += 0.01
    store.prune()
    assert len(store) == RECENT_STREAMS  # the oldest gone went first
    assert store.get("cam0") is None and store.get(f"cam{RECENT_STREAMS + 9}") is not None
    clock.now += GONE_AFTER_S + 2
    store.record(jpeg_frame("new"), StreamStats("new"), [], (64, 48))  # only the writer runs: still bounded
    assert len(store) == 1


def test_history_samples_rates_from_counter_deltas_and_keeps_a_bounded_window() -> None:
    clock = Clock()
    stats = Stats(model="m", device="cpu", workers=1, lanes_per_worker=2)
    history = History(stats, every=2.0, samples=3, clock=clock)
    assert history.sample() is None  # the first only primes the deltas
    key = 1
    stats.stream_opened(key, "cam", lossless=False)
    for _ in range(10):
        stats.frame_received(key)
        stats.frame_processed(key, 20.0, {"queue_ms": 1.0, "decode_ms": 2.0, "infer_ms": 17.0})
    for _ in range(4):
        stats.frame_received(key)
        stats.frame_dropped(key, "superseded")
    clock.now += 2.0
    sample = history.sample()
    assert sample is not None
    assert sample["fps"] == 5.0 and sample["drops_per_s"] == 2.0 and sample["p50_ms"] == 20.0
    assert sample["lanes"] == 2 and sample["streams"] == 1 and sample["queue"] == 0
    assert sample["cpu"] is None or 0.0 <= sample["cpu"] <= 100.0
    for _ in range(5):
        clock.now += 2.0
        history.sample()
    out = history.to_dict()
    assert len(out["samples"]) == 3 and out["span_s"] == 6.0 and out["samples"][-1]["fps"] == 0.0


def test_a_sampled_viewer_gets_each_streams_newest_result_at_most_once_per_interval() -> None:
    from visionstream.server.broadcast import Broadcaster

    async def scenario() -> tuple[list[str], list[str], int]:
        b = Broadcaster(Stats(model="m", device="cpu", workers=1), queue_size=64)
        sampled = b.subscribe(every=0.2)
        everything = b.subscribe()
        for n in range(5):  # a burst: the first goes at once, the last is held and sent when its turn comes
            b.publish({"type": "result", "stream_name": "a", "frame_id": n})
            b.publish({"type": "result", "stream_name": "b", "frame_id": 100 + n})
        first = [sampled.queue.get_nowait() for _ in range(sampled.queue.qsize())]
        await asyncio.sleep(0.3)
        later = [sampled.queue.get_nowait() for _ in range(sampled.queue.qsize())]
        b.publish({"type": "result", "stream_name": "a", "frame_id": 9})  # held: its turn has not come
        b.unsubscribe(sampled)  # cancels what it held
        await asyncio.sleep(0.3)
        assert sampled.queue.empty()
        return first, later, everything.queue.qsize()

    first, later, all_events = asyncio.run(scenario())
    ids = lambda texts: sorted(json.loads(t)["frame_id"] for t in texts)  # noqa: E731
    assert ids(first) == [0, 100] and ids(later) == [4, 104]
    assert all_events == 11  # an unsampled viewer still gets every result
