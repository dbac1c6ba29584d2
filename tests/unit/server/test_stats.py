"""Server statistics: percentiles, counters, per-stream bookkeeping and Prometheus output."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from visionstream.server.stats import LATENCY_WINDOW, RECENT_STREAMS, Stats, percentiles


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_stats(clock: FakeClock | None = None) -> Stats:
    return Stats(model="yolov8n.pt", device="cpu", workers=2, clock=clock or FakeClock())


# --------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("empty", [[], (), iter([]), (x for x in [])])
def test_percentiles_of_nothing_are_none(empty: object) -> None:
    assert percentiles(empty) == {"p50": None, "p95": None, "p99": None}


def test_percentiles_known_values() -> None:
    # numpy's default (linear) interpolation: p50 of 1..4 is 2.5, p95 is 1 + 0.95 * 3, p99 is 1 + 0.99 * 3.
    assert percentiles([4, 1, 3, 2]) == {"p50": 2.5, "p95": 3.85, "p99": 3.97}
    assert percentiles(range(1, 101)) == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}


def test_percentiles_custom_quantiles_and_rounding() -> None:
    out = percentiles([1 / 3, 2 / 3], qs=(0, 50, 99.9, 100))
    assert list(out) == ["p0", "p50", "p99.9", "p100"]
    assert out["p0"] == 0.333
    assert out["p50"] == 0.5
    assert out["p100"] == 0.667
    assert all(isinstance(v, float) for v in out.values())


def test_percentiles_accepts_a_generator() -> None:
    assert percentiles(float(v) for v in range(11))["p50"] == 5.0


# --------------------------------------------------------------------------- counters


def test_totals_add_up_globally_and_per_stream() -> None:
    clock = FakeClock()
    s = make_stats(clock)
    s.stream_opened(1, "cam1", lossless=False)
    s.stream_opened(2, "cam2", lossless=True)
    for _ in range(5):
        s.frame_received(1)
    for _ in range(3):
        s.frame_received(2)
    s.frame_processed(1, 10.0, {"queue_ms": 1.0, "decode_ms": 2.0, "infer_ms": 7.0})
    s.frame_processed(1, 30.0, {"queue_ms": 3.0, "decode_ms": 2.0, "infer_ms": 20.0})
    s.frame_processed(2, 20.0, {})
    s.frame_dropped(1, "superseded")
    s.frame_dropped(1, "stale")
    s.frame_dropped(2, "queue_full")
    s.error("invalid_message")
    s.error("invalid_message")

    snap = s.snapshot()
    assert (snap["total_frames"], snap["processed_frames"], snap["dropped_frames"], snap["in_flight"]) == (8, 3, 3, 2)
    assert snap["total_frames"] == snap["processed_frames"] + snap["dropped_frames"] + snap["in_flight"]
    assert snap["drops_by_reason"] == {"superseded": 1, "stale": 1, "queue_full": 1}
    assert snap["errors_by_code"] == {"invalid_message": 2}
    assert snap["last_latency_ms"] == 20.0
    assert snap["latency_ms"] == {"p50": 20.0, "p95": 29.0, "p99": 29.8, "max": 30.0}
    assert snap["timings_ms"]["infer_ms"]["p50"] == 13.5
    assert snap["timings_ms"]["queue_ms"]["p50"] == 2.0
    assert snap["fps"] == pytest.approx(3 / 5)

    cam1, cam2 = snap["streams"]["cam1"], snap["streams"]["cam2"]
    assert cam1 == {
        "connected": True, "lossless": False, "received": 5, "processed": 2, "dropped": 2, "in_flight": 1,
        "drops_by_reason": {"superseded": 1, "stale": 1}, "fps": 0.4, "last_latency_ms": 30.0,
        "latency_ms": {"p50": 20.0, "p95": 29.0, "p99": 29.8},
    }
    assert cam2["lossless"] is True
    assert (cam2["received"], cam2["processed"], cam2["dropped"], cam2["in_flight"]) == (3, 1, 1, 1)
    for st in (cam1, cam2):
        assert st["received"] == st["processed"] + st["dropped"] + st["in_flight"]


def test_snapshot_with_no_traffic_has_no_numbers_to_invent() -> None:
    clock = FakeClock(50.0)
    s = make_stats(clock)
    clock.now = 62.34
    snap = s.snapshot()
    assert snap["status"] == "ok"
    assert (snap["model"], snap["device"], snap["workers"], snap["ready"]) == ("yolov8n.pt", "cpu", 2, False)
    assert snap["uptime_s"] == 12.3
    assert snap["latency_ms"] == {"p50": None, "p95": None, "p99": None, "max": None}
    assert snap["last_latency_ms"] is None
    assert snap["fps"] == 0.0
    assert snap["streams"] == {}
    assert snap["in_flight"] == 0


def test_queue_size_and_connection_counters() -> None:
    s = make_stats()
    s.queue_size_fn = lambda: 7
    s.client_connected()
    s.client_connected()
    s.client_disconnected()
    snap = s.snapshot()
    assert snap["queue_size"] == 7
    assert snap["clients"] == 1
    assert snap["connections_total"] == 2


def test_latency_window_is_bounded() -> None:
    s = make_stats()
    for i in range(LATENCY_WINDOW + 500):
        s.frame_processed(0, float(i), {"infer_ms": 1.0})
    assert len(s.latencies) == LATENCY_WINDOW
    assert len(s.timings["infer_ms"]) == LATENCY_WINDOW
    assert s.snapshot()["latency_ms"]["max"] == LATENCY_WINDOW + 499


# --------------------------------------------------------------------------- stream lifecycle


def test_closed_stream_is_kept_as_disconnected_and_still_counts_late_results() -> None:
    s = make_stats()
    s.stream_opened(1, "cam", lossless=False)
    s.frame_received(1)
    s.frame_received(1)
    s.stream_closed(1)
    s.frame_processed(1, 5.0, {})  # a result finishing after the client left
    s.frame_dropped(1, "disconnected")
    cam = s.snapshot()["streams"]["cam"]
    assert cam["connected"] is False
    assert (cam["received"], cam["processed"], cam["dropped"], cam["in_flight"]) == (2, 1, 1, 0)


def test_stream_without_frames_is_forgotten_on_close() -> None:
    s = make_stats()
    s.stream_opened(1, "idle", lossless=False)
    s.stream_closed(1)
    s.stream_closed(99)  # unknown key: harmless
    assert s.snapshot()["streams"] == {}


def test_reconnected_name_shows_the_live_connection() -> None:
    s = make_stats()
    s.stream_opened(1, "cam", lossless=False)
    s.frame_received(1)
    s.stream_closed(1)
    s.stream_opened(2, "cam", lossless=True)
    cam = s.snapshot()["streams"]["cam"]
    assert cam["connected"] is True
    assert cam["lossless"] is True
    assert cam["received"] == 0


def test_stream_churn_cannot_grow_memory() -> None:
    s = make_stats()
    n = RECENT_STREAMS * 20
    for key in range(n):
        s.stream_opened(key, f"cam{key}", lossless=False)
        s.frame_received(key)
        s.frame_received(key)  # this one is still with a worker when the client leaves
        s.frame_processed(key, 1.0, {})
        s.stream_closed(key)
    assert not s.streams
    assert len(s._gone) == RECENT_STREAMS
    streams = s.snapshot()["streams"]
    assert set(streams) == {f"cam{k}" for k in range(n - RECENT_STREAMS, n)}  # the most recent ones
    assert s.in_flight == n
    # The late outcome of a long-gone stream's frame still counts globally and does not resurrect it.
    s.frame_dropped(0, "disconnected")
    assert s.dropped_frames == 1
    assert s.in_flight == n - 1
    assert "cam0" not in s.snapshot()["streams"]
    assert len(s._gone) == RECENT_STREAMS


# --------------------------------------------------------------------------- Prometheus


def metrics(s: Stats) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """{family name: {(sample name, sorted labels): value}} from the text exposition."""
    text = generate_latest(s.registry).decode()
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {(sm.name, tuple(sorted(sm.labels.items()))): sm.value for sm in fam.samples}
    return out


def test_prometheus_exposition_parses_and_has_the_right_values() -> None:
    s = make_stats()
    s.ready = True
    s.queue_size_fn = lambda: 4
    s.workers_busy = 1
    s.client_connected()
    s.stream_opened(1, "cam", lossless=False)
    for _ in range(6):
        s.frame_received(1)
    s.frame_processed(1, 8.0, {"queue_ms": 1.0, "decode_ms": 2.0, "infer_ms": 5.0})
    s.frame_processed(1, 40.0, {"queue_ms": 3.0, "decode_ms": 2.0, "infer_ms": 30.0})
    s.frame_dropped(1, "superseded")
    s.frame_dropped(1, "superseded")
    s.frame_dropped(1, "stale")
    s.error("bad_field")
    s.ws_clients = 3

    m = metrics(s)
    assert m["visionstream_frames_received"][("visionstream_frames_received_total", ())] == 6
    assert m["visionstream_frames_processed"][("visionstream_frames_processed_total", ())] == 2
    dropped = m["visionstream_frames_dropped"]
    assert dropped[("visionstream_frames_dropped_total", (("reason", "superseded"),))] == 2
    assert dropped[("visionstream_frames_dropped_total", (("reason", "stale"),))] == 1
    assert m["visionstream_errors"][("visionstream_errors_total", (("code", "bad_field"),))] == 1
    assert m["visionstream_connections"][("visionstream_connections_total", ())] == 1

    lat = m["visionstream_latency_seconds"]
    assert lat[("visionstream_latency_seconds_count", ())] == 2
    assert lat[("visionstream_latency_seconds_sum", ())] == pytest.approx(0.048)
    assert lat[("visionstream_latency_seconds_bucket", (("le", "0.005"),))] == 0
    assert lat[("visionstream_latency_seconds_bucket", (("le", "0.01"),))] == 1
    assert lat[("visionstream_latency_seconds_bucket", (("le", "0.05"),))] == 2
    assert lat[("visionstream_latency_seconds_bucket", (("le", "+Inf"),))] == 2

    stage = m["visionstream_stage_seconds"]
    for name, total in (("queue", 0.004), ("decode", 0.004), ("infer", 0.035)):
        assert stage[("visionstream_stage_seconds_count", (("stage", name),))] == 2
        assert stage[("visionstream_stage_seconds_sum", (("stage", name),))] == pytest.approx(total)

    gauges = {
        "visionstream_queue_size": 4,
        "visionstream_in_flight": 1,
        "visionstream_workers_busy": 1,
        "visionstream_clients": 1,
        "visionstream_ws_clients": 3,
        "visionstream_ready": 1,
    }
    for name, value in gauges.items():
        assert m[name][(name, ())] == value, name


def test_prometheus_gauges_are_read_live() -> None:
    s = make_stats()
    size = [0]
    s.queue_size_fn = lambda: size[0]
    assert metrics(s)["visionstream_queue_size"][("visionstream_queue_size", ())] == 0
    assert metrics(s)["visionstream_ready"][("visionstream_ready", ())] == 0
    size[0] = 9
    s.ready = True
    assert metrics(s)["visionstream_queue_size"][("visionstream_queue_size", ())] == 9
    assert metrics(s)["visionstream_ready"][("visionstream_ready", ())] == 1


def test_each_stats_instance_has_its_own_registry() -> None:
    a, b = make_stats(), make_stats()  # would raise "Duplicated timeseries" on a shared registry
    a.frame_received(0)
    assert metrics(a)["visionstream_frames_received"][("visionstream_frames_received_total", ())] == 1
    assert metrics(b)["visionstream_frames_received"][("visionstream_frames_received_total", ())] == 0
    assert not math.isnan(metrics(b)["visionstream_in_flight"][("visionstream_in_flight", ())])
