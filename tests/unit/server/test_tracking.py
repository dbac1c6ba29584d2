"""The per-stream tracker wrapper: the frame gap fed to ultralytics' trackers, frame order, counting, settings."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from visionstream.server.config import ServerConfig
from visionstream.server.tracking import StreamTracker, Tracking, load_tracker_settings
from visionstream.wire.errors import ConfigError

NAMES = {0: "person", 1: "car"}


@pytest.fixture(scope="module", params=["bytetrack", "botsort"])
def settings(request):
    return load_tracker_settings(request.param)


def box(x: float, y: float = 50.0, w: float = 100.0, h: float = 200.0, cls: int = 0, conf: float = 0.8) -> dict:
    return {"label": NAMES[cls], "cls": cls, "conf": conf, "bbox": [x, y, x + w, y + h]}


def one_id_share(ids: list) -> float:
    best = max(Counter(i for i in ids if i is not None).values(), default=0)
    return best / len(ids)


def fast_walker(settings, seed: int, *, feed_gap: bool, v: float = 25.0, frames: int = 400) -> float:
    """A 100 px wide object moving 25 px a frame, served at irregular gaps (1-4 frames) as under overload."""
    rng = random.Random(seed)
    tracker = StreamTracker(settings, NAMES)
    fid, served, ids = 0, 0, []
    while fid < frames:
        dets = [box(10 + v * fid)]
        tracker.step(fid if feed_gap else served, None, dets, received=float(served))
        ids.append(dets[0]["track_id"])
        served += 1
        fid += rng.choice([1, 2, 2, 3, 4])
    return one_id_share(ids)


def test_the_frame_gap_keeps_fast_objects_on_one_id(settings) -> None:
    """Fed the gap, the tracker keeps the walker's id; fed consecutive ids (the gap ignored, every update one
    step), its velocity is wrong on every irregular gap and the id breaks."""
    fed = [fast_walker(settings, seed, feed_gap=True) for seed in range(12)]
    blind = [fast_walker(settings, seed, feed_gap=False) for seed in range(12)]
    assert sum(fed) / len(fed) >= 0.95, fed
    assert sum(blind) / len(blind) < 0.8, blind


def test_a_long_gap_is_bounded_and_lost_tracks_age_in_frames(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    dets = [box(10)]
    tracker.step(0, None, dets, 0.0)
    tid = dets[0]["track_id"]
    tracker.step(1, None, [], 1.0)  # unseen: lost
    again = [box(10)]
    t0 = time.perf_counter()
    tracker.step(10**12, None, again, 2.0)  # a gap of 10^12 frames costs track_buffer + 1 predictions at most
    assert time.perf_counter() - t0 < 1.0
    assert again[0]["track_id"] != tid  # older than track_buffer frames: gone, a new track


def test_a_gap_within_track_buffer_refinds_the_lost_track(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    dets = [box(10)]
    tracker.step(0, None, dets, 0.0)
    tracker.step(1, None, [], 1.0)
    again = [box(10)]
    tracker.step(settings.track_buffer - 1, None, again, 2.0)
    assert again[0]["track_id"] == dets[0]["track_id"]


def test_an_older_frame_never_rewinds_the_tracker(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    for i in range(3):
        tracker.step(i, None, [box(10 + i)], float(i))
    late = [box(500)]
    assert tracker.step(1, None, late, 1.5) == []  # received before the last one tracked
    assert late[0]["track_id"] is None and tracker.skipped == 1
    nxt = [box(13)]
    tracker.step(3, None, nxt, 3.0)
    assert nxt[0]["track_id"] == 1


def test_a_frame_waits_for_the_earlier_frames_taken_by_other_lanes(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    tracker.taken(1, 1.0)
    tracker.taken(2, 2.0)
    order: list[int] = []

    def later() -> None:
        second = [box(11)]
        tracker.step(1, None, second, 2.0, key=2)
        order.append(second[0]["track_id"])

    t = threading.Thread(target=later)
    t.start()
    time.sleep(0.1)
    assert order == []  # frame 2 finished first, but waits for frame 1
    first = [box(10)]
    tracker.step(0, None, first, 1.0, key=1)
    t.join(2)
    assert order == [1] and tracker.steps == 2 and tracker.skipped == 0  # stepped after frame 1: not skipped


def test_a_failed_earlier_frame_releases_the_later_ones(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    tracker.taken(1, 1.0)
    tracker.taken(2, 2.0)
    threading.Timer(0.05, tracker.forget, (1,)).start()
    t0 = time.perf_counter()
    dets = [box(10)]
    tracker.step(1, None, dets, 2.0, key=2)
    assert time.perf_counter() - t0 < 0.5 and dets[0]["track_id"] == 1


def test_closed_tracker_answers_null(settings) -> None:
    tracker = StreamTracker(settings, NAMES)
    tracker.close()
    dets = [box(10)]
    assert tracker.step(0, None, dets, 0.0) == [] and dets[0]["track_id"] is None


def test_new_confirmed_tracks_are_each_counted_once(settings) -> None:
    """Objects come and go at random; the labels returned equal the distinct confirmed ids seen, by label."""
    rng = random.Random(3)
    tracker = StreamTracker(settings, NAMES)
    counted: Counter = Counter()
    seen: dict[int, str] = {}
    alive = {}
    for fid in range(300):
        if rng.random() < 0.08:
            alive[fid] = (rng.uniform(0, 3000), rng.randint(0, 1))
        for k in [k for k in alive if rng.random() < 0.03]:
            del alive[k]
        dets = [box(x + 2 * (fid - k), cls=c) for k, (x, c) in alive.items() if rng.random() < 0.9]
        counted.update(tracker.step(fid, None, dets, float(fid)))
        for d in dets:
            if d["track_id"] is not None:
                seen.setdefault(d["track_id"], d["label"])
    assert counted == Counter(seen.values()) and sum(counted.values()) >= 5


def test_settings_off_and_overrides(tmp_path: Path) -> None:
    assert load_tracker_settings("off") is None
    assert load_tracker_settings("botsort").args["gmc_method"] == "none"  # the server's default: fixed cameras
    cfg = tmp_path / "t.yaml"
    cfg.write_text("tracker_type: botsort\ntrack_buffer: 90\ngmc_method: sparseOptFlow\n")
    s = load_tracker_settings("botsort", cfg)
    assert s is not None and s.track_buffer == 90 and s.gmc


@pytest.mark.parametrize("text, words", [
    ("track_bufer: 90\n", "unknown"),
    ("tracker_type: botsort\n", "tracker_type"),
    ("- a\n", "mapping"),
    ("track_buffer: [1\n", "cannot read"),
])
def test_bad_tracker_configs_are_one_line_errors(tmp_path: Path, text: str, words: str) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_tracker_settings("bytetrack", cfg)


def test_reid_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("with_reid: true\n")
    with pytest.raises(ConfigError, match="with_reid"):
        load_tracker_settings("botsort", cfg)


def test_a_missing_lap_is_a_start_up_error_not_an_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lap" else real(name, *a))
    with pytest.raises(ConfigError, match="'lap'"):
        load_tracker_settings("bytetrack")


def test_config_flags() -> None:
    from visionstream.server.config import parse_config

    assert parse_config([], {}).track is Tracking.OFF
    assert parse_config(["--track", "botsort"], {}).track is Tracking.BOTSORT
    with pytest.raises(ConfigError, match="--tracker-config needs --track"):
        ServerConfig(tracker_config=Path("x.yaml")).validate()


def test_stats_count_tracks_per_stream_and_drop_a_gone_names_series() -> None:
    from visionstream.server.stats import RECENT_STREAMS, Stats

    stats = Stats(model="m", device="cpu", workers=1)
    stats.tracking = "bytetrack"
    stats.stream_opened(1, "cam", lossless=False)
    stats.frame_received(1)
    stats.tracks_confirmed(1, ["person", "person", "car"])
    assert stats.snapshot()["streams"]["cam"]["tracks"] == {"person": 2, "car": 1}
    assert stats.m_tracks.labels("cam", "person")._value.get() == 2
    stats.stream_closed(1)
    for key in range(2, RECENT_STREAMS + 3):  # enough churn to push "cam" out of /stats
        stats.stream_opened(key, f"other{key}", lossless=False)
        stats.frame_received(key)
        stats.stream_closed(key)
    assert "cam" not in stats.snapshot()["streams"]
    assert not any(s.labels.get("stream") == "cam" for m in stats.registry.collect() for s in m.samples)
