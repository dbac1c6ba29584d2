"""Counters, latency windows and Prometheus metrics: the one place server statistics live."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from visionstream.measure import RateWindow, percentile

LATENCY_WINDOW = 2048  # recent results the percentiles are computed over
FPS_WINDOW_S = 5.0
RECENT_STREAMS = 64  # disconnected streams kept in /stats; bounded so churn cannot grow memory
_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def percentiles(values: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """{'p50': .., 'p95': .., 'p99': ..} in the values' unit, to 3 decimals; None when there are no values."""
    data = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        v = percentile(data, q)
        out[f"p{q:g}"] = None if v is None else round(float(v), 3)
    return out


def _task_count() -> int | None:
    """asyncio tasks alive in the serving loop: a count that keeps rising means a task leak."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop (a snapshot taken outside the server)
        return None


@dataclass
class StreamStats:
    name: str
    lossless: bool = False
    connected: bool = True
    received: int = 0
    processed: int = 0
    dropped: int = 0
    drops: Counter = field(default_factory=Counter)
    last_latency_ms: float | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=256))
    rate: RateWindow = field(default_factory=lambda: RateWindow(FPS_WINDOW_S))
    tracks: Counter = field(default_factory=Counter)  # label -> distinct confirmed track ids (--track)

    @property
    def in_flight(self) -> int:
        """Frames received but not yet answered (result or drop notice)."""
        return self.received - self.processed - self.dropped

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "lossless": self.lossless,
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "in_flight": self.in_flight,
            "drops_by_reason": dict(self.drops),
            "fps": round(self.rate.rate(now), 2),
            "last_latency_ms": self.last_latency_ms,
            "latency_ms": percentiles(self.latencies),
        }


class Stats:
    """Every counter the control plane reports. Mutated from the event loop, except `workers_busy`, which
    lane threads change under the lanes' own lock."""

    def __init__(self, *, model: str, device: str, workers: int, lanes_per_worker: int = 1,
                 clock=time.perf_counter) -> None:
        self.clock = clock
        self.started = clock()
        self.model = model
        self.device = device
        self.workers = workers
        self.lanes_per_worker = lanes_per_worker  # --lanes
        self.lanes = workers * lanes_per_worker  # lane threads: frames that can be in inference at once
        self.ready = False
        self.tracking = "off"  # --track: the tracker every stream gets
        self.total_frames = 0
        self.processed_frames = 0
        self.dropped_frames = 0
        self.last_latency_ms: float | None = None
        self.drops: Counter = Counter()
        self.errors: Counter = Counter()
        self.workers_busy = 0
        self.infer_timeouts = 0  # frames answered `timeout` by the lane watchdog (--infer-timeout)
        self.lanes_replaced = 0  # lanes replaced after a timeout, with a freshly loaded detector
        self.lanes_stuck_fn: Callable[[], int] = lambda: 0  # abandoned lane threads still in the detector
        self.executor = "threads"  # --executor
        self.actors_lost = 0  # Ray actors that died (killed, node lost, or killed for --infer-timeout)
        self.actor_restarts = 0  # Ray actors back after a loss, model reloaded
        self.actors_fn: Callable[[], list[dict[str, Any]]] = lambda: []  # each Ray actor's pid, node, state
        self.queue_size_fn: Callable[[], int] = lambda: 0  # the scheduler's length, read on demand
        # (h, w) inputs the model is compiled for, all at start-up (OpenVINO: the square and camera shapes)
        self.input_shapes_fn: Callable[[], list[tuple[int, int]]] = lambda: []
        self.clients = 0  # TCP connections, pending ones included
        self.pending_clients = 0  # connections that have not yet said hello (or sent a first message)
        self.connections_total = 0
        self.ws_clients = 0
        self.ws_events_dropped = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.timings: dict[str, deque[float]] = {k: deque(maxlen=LATENCY_WINDOW)
                                                 for k in ("queue_ms", "decode_ms", "infer_ms")}
        self.rate = RateWindow(FPS_WINDOW_S)
        self.streams: dict[int, StreamStats] = {}
        self._gone: OrderedDict[int, StreamStats] = OrderedDict()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # first call primes the measurement
        psutil.cpu_percent(None)
        self.registry = CollectorRegistry()
        self._init_metrics()

    def _init_metrics(self) -> None:
        r = self.registry
        self.m_received = PromCounter("visionstream_frames_received", "Frames received", registry=r)
        self.m_processed = PromCounter("visionstream_frames_processed", "Frames answered with a result",
                                       registry=r)
        self.m_dropped = PromCounter("visionstream_frames_dropped", "Frames answered with a drop notice "
                                     "(or discarded for a gone client), by reason", ["reason"], registry=r)
        self.m_errors = PromCounter("visionstream_errors", "Protocol and input errors by code", ["code"],
                                    registry=r)
        self.m_infer_timeouts = PromCounter("visionstream_infer_timeouts", "Frames whose inference outlived "
                                            "--infer-timeout (answered 'timeout', lane replaced)", registry=r)
        self.m_lanes_replaced = PromCounter("visionstream_lanes_replaced", "Lanes replaced after an inference "
                                            "timeout", registry=r)
        self.m_actors_lost = PromCounter("visionstream_actors_lost", "Ray actors lost (died, node lost, or killed "
                                         "after --infer-timeout); their frames in flight are answered "
                                         "'worker_lost'", registry=r)
        self.m_actor_restarts = PromCounter("visionstream_actor_restarts", "Ray actors restarted after a loss",
                                            registry=r)
        Gauge("visionstream_lanes_stuck", "Abandoned lane threads still inside a hung detector",
              registry=r).set_function(lambda: self.lanes_stuck_fn())
        # One series per stream name and label: names are bounded by --max-clients live plus RECENT_STREAMS gone
        # (a name's series goes with it from /stats), labels by the model's classes.
        self.m_tracks = PromCounter("visionstream_tracks", "Distinct confirmed object tracks (--track), by stream "
                                    "and label", ["stream", "label"], registry=r)
        self._track_labels: dict[str, set[str]] = {}  # stream name -> labels with a series
        self.m_connections = PromCounter("visionstream_connections", "TCP connections accepted", registry=r)
        self.m_latency = Histogram("visionstream_latency_seconds", "Server receive to result ready",
                                   buckets=_BUCKETS, registry=r)
        self.m_stage = Histogram("visionstream_stage_seconds", "Time per pipeline stage", ["stage"],
                                 buckets=_BUCKETS, registry=r)
        Gauge("visionstream_queue_size", "Frames waiting for a worker", registry=r).set_function(
            lambda: self.queue_size)
        Gauge("visionstream_in_flight", "Frames received but not yet answered", registry=r).set_function(
            lambda: self.in_flight)
        Gauge("visionstream_workers_busy", "Workers running inference", registry=r).set_function(
            lambda: self.workers_busy)
        Gauge("visionstream_clients", "Connected TCP clients", registry=r).set_function(lambda: self.clients)
        Gauge("visionstream_pending_clients", "TCP connections not yet past their hello", registry=r
              ).set_function(lambda: self.pending_clients)
        Gauge("visionstream_ws_clients", "Connected WebSocket viewers", registry=r).set_function(
            lambda: self.ws_clients)
        Gauge("visionstream_ready", "1 once the model is loaded and frames are accepted",
              registry=r).set_function(lambda: 1 if self.ready else 0)

    # ------------------------------------------------------------------ updates

    @property
    def queue_size(self) -> int:
        return self.queue_size_fn()

    @property
    def in_flight(self) -> int:
        return self.total_frames - self.processed_frames - self.dropped_frames

    def client_connected(self) -> None:
        self.clients += 1
        self.connections_total += 1
        self.m_connections.inc()

    def client_disconnected(self) -> None:
        self.clients -= 1

    def stream_opened(self, key: int, name: str, lossless: bool) -> StreamStats:
        st = StreamStats(name=name, lossless=lossless)
        self.streams[key] = st
        return st

    def stream_closed(self, key: int) -> None:
        st = self.streams.pop(key, None)
        if st is not None and st.received:
            st.connected = False
            self._gone[key] = st
            while len(self._gone) > RECENT_STREAMS:
                _key, old = self._gone.popitem(last=False)
                self._forget_tracks(old.name)

    def _forget_tracks(self, name: str) -> None:
        """A name gone from /stats takes its track series with it (unless another stream carries it)."""
        if any(st.name == name for st in (*self.streams.values(), *self._gone.values())):
            return
        for label in self._track_labels.pop(name, ()):
            self.m_tracks.remove(name, label)

    def tracks_confirmed(self, key: int, labels: list[str] | tuple[str, ...]) -> None:
        st = self._stream(key)
        if st is None:
            return
        for label in labels:
            st.tracks[label] += 1
            self.m_tracks.labels(st.name, label).inc()
            self._track_labels.setdefault(st.name, set()).add(label)

    def _stream(self, key: int) -> StreamStats | None:
        return self.streams.get(key) or self._gone.get(key)

    def frame_received(self, key: int) -> None:
        self.total_frames += 1
        self.m_received.inc()
        st = self._stream(key)
        if st is not None:
            st.received += 1

    def frame_processed(self, key: int, latency_ms: float, timings: dict[str, float]) -> None:
        now = self.clock()
        self.processed_frames += 1
        self.last_latency_ms = latency_ms
        self.latencies.append(latency_ms)
        self.rate.add(now)
        self.m_processed.inc()
        self.m_latency.observe(latency_ms / 1000.0)
        for name, value in timings.items():
            if name not in self.timings:  # transfer_ms: only with --executor ray
                self.timings[name] = deque(maxlen=LATENCY_WINDOW)
            self.timings[name].append(value)
            self.m_stage.labels(name.removesuffix("_ms")).observe(value / 1000.0)
        st = self._stream(key)
        if st is not None:
            st.processed += 1
            st.last_latency_ms = latency_ms
            st.latencies.append(latency_ms)
            st.rate.add(now)

    def frame_dropped(self, key: int, reason: str) -> None:
        self.dropped_frames += 1
        self.drops[reason] += 1
        self.m_dropped.labels(reason).inc()
        st = self._stream(key)
        if st is not None:
            st.dropped += 1
            st.drops[reason] += 1

    def infer_timeout(self) -> None:
        self.infer_timeouts += 1
        self.m_infer_timeouts.inc()

    def lane_replaced(self) -> None:
        self.lanes_replaced += 1
        self.m_lanes_replaced.inc()

    def actor_lost(self) -> None:
        self.actors_lost += 1
        self.m_actors_lost.inc()

    def actor_restarted(self) -> None:
        self.actor_restarts += 1
        self.m_actor_restarts.inc()

    def error(self, code: str, n: int = 1) -> None:
        self.errors[code] += n
        self.m_errors.labels(code).inc(n)

    # ------------------------------------------------------------------ reports

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        mem = psutil.virtual_memory()
        with self._proc.oneshot():
            proc_cpu = self._proc.cpu_percent(None)
            rss = self._proc.memory_info().rss
        streams = {}
        for st in list(self._gone.values()) + list(self.streams.values()):
            streams[st.name] = st.snapshot(now)  # a reconnected (or replaced) name shows its live connection
            if self.tracking != "off":
                streams[st.name]["tracks"] = dict(st.tracks)
        return {
            "status": "ok",
            "model": self.model,
            "device": self.device,
            "ready": self.ready,
            "tracking": self.tracking,
            "uptime_s": round(now - self.started, 1),
            "total_frames": self.total_frames,
            "processed_frames": self.processed_frames,
            "dropped_frames": self.dropped_frames,
            "in_flight": self.in_flight,
            "last_latency_ms": self.last_latency_ms,
            "fps": round(self.rate.rate(now), 2),
            "queue_size": self.queue_size,
            "cpu": psutil.cpu_percent(None),
            "ram": mem.percent,
            "process": {"cpu_percent": proc_cpu, "rss_mb": round(rss / 2**20, 1), "tasks": _task_count()},
            "workers": self.workers,
            "lanes_per_worker": self.lanes_per_worker,
            "lanes": self.lanes,
            "lanes_busy": self.workers_busy,
            "input_shapes": [list(hw) for hw in self.input_shapes_fn()],
            "workers_busy": self.workers_busy,
            "infer_timeouts": self.infer_timeouts,
            "lanes_replaced": self.lanes_replaced,
            "lanes_stuck": self.lanes_stuck_fn(),
            "executor": self.executor,
            "actors_lost": self.actors_lost,
            "actor_restarts": self.actor_restarts,
            "actors": self.actors_fn(),
            "clients": self.clients,
            "pending_clients": self.pending_clients,
            "connections_total": self.connections_total,
            "ws_clients": self.ws_clients,
            "ws_events_dropped": self.ws_events_dropped,
            "latency_ms": {**percentiles(self.latencies),
                           "max": round(max(self.latencies), 3) if self.latencies else None},
            "timings_ms": {k: percentiles(v) for k, v in self.timings.items()},
            "drops_by_reason": dict(self.drops),
            "errors_by_code": dict(self.errors),
            "streams": streams,
        }
