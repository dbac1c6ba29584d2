"""The server: TCP listener, scheduler, inference workers and the control plane in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

from visionstream.server.broadcast import Broadcaster
from visionstream.server.config import ServerConfig
from visionstream.server.connection import ClientConnection
from visionstream.server.http import create_app
from visionstream.server.inference.detector import (
    Detector,
    DetectorSpec,
    InFlight,
    PlaceholderDetector,
    load_detector,
    resolve_model,
)
from visionstream.server.inference.imaging import DecodeError, decode_frame
from visionstream.server.scheduler import DISCONNECTED, SHUTDOWN, Job, Scheduler
from visionstream.server.state import ServerState
from visionstream.server.stats import Stats
from visionstream.wire.errors import ModelLoadError
from visionstream.wire.protocol import dropped_msg, encode, error_msg

log = logging.getLogger("visionstream.server")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the InferenceServer owns signals, so uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _infer(detector: Detector, frame: Any, target: tuple[int, int] | None, inflight: InFlight
           ) -> tuple[list[dict[str, Any]], float, float, float, tuple[int, int]]:
    """Worker-thread body: decode, detect, map boxes to the sent image.

    Returns (detections, start, decoded, detected (perf_counter), (width, height) of the sent image).
    """
    with inflight:
        t0 = time.perf_counter()
        image, (sx, sy) = decode_frame(frame, target)
        t1 = time.perf_counter()
        detections = detector.detect(image)
        t2 = time.perf_counter()
    h, w = image.shape[:2]
    width, height = round(w * sx), round(h * sy)
    if sx != 1.0 or sy != 1.0:  # decoded at reduced size: back to the sent image's pixels
        for d in detections:
            x1, y1, x2, y2 = d["bbox"]
            d["bbox"] = [round(min(x1 * sx, width), 1), round(min(y1 * sy, height), 1),
                         round(min(x2 * sx, width), 1), round(min(y2 * sy, height), 1)]
    return detections, t0, t1, t2, (width, height)


def _lower_priority(nice: int) -> None:
    """Executor initializer: this lane thread (and the OpenVINO threads it starts, which inherit it)
    yields the CPU to the event loop, so reading frames and writing replies do not queue behind
    inference. Linux only: elsewhere setpriority would renice the whole process."""
    if nice and sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _log_tasks() -> None:
    """Log every asyncio task with where it is suspended (SIGUSR1): for a server that seems stuck."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=6, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue().rstrip())


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof():
        writer.write_eof()
    while await reader.read(1 << 16):
        pass


class _Lane:
    """What one lane thread holds: the frame it is working on (read by the loop at shutdown)."""

    job: Job | None = None


class InferenceServer:
    """Owns every component, the shutdown sequence and the signal handlers."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = Stats(model="loading", device=config.device, workers=config.workers,
                           lanes_per_worker=config.lanes)
        self.broadcaster = Broadcaster(self.stats, config.ws_queue)
        self.scheduler = Scheduler(
            on_drop=self._on_drop,
            dispatch=self._dispatch,
            queue_depth=config.queue_depth,
            lossless_depth=config.lossless_depth,
            max_queue=config.max_queue,
            max_age_ms=config.max_age_ms,
        )
        self.stats.queue_size_fn = lambda: len(self.scheduler)
        # What connections see of the server (the model's names and input size once it is loaded).
        self.state = ServerState(config, self.stats, self.scheduler, imgsz=[config.imgsz, config.imgsz])
        self.connections: dict[int, ClientConnection] = {}
        self.tcp_port: int | None = None
        self.api_port: int | None = None
        self._keys = itertools.count(1)
        self._readers: dict[int, asyncio.Task] = {}
        self._stop_event = asyncio.Event()
        self._executors: list[ThreadPoolExecutor] = []
        self._workers: list[asyncio.Task] = []
        self._decode_target: tuple[int, int] | None = None
        self._inflight = InFlight(busy=self.scheduler.busy)
        self._busy_lock = threading.Lock()  # lane threads count themselves in stats.workers_busy
        self._abandoned: set[Job] = set()  # frames answered at shutdown while their lane still ran
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def _dispatch(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the event loop, from any thread: lane results, and what a lane's take
        causes in the scheduler (drop notices)."""
        if self._loop is None or self._loop_thread == threading.get_ident():
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                self._loop.call_soon_threadsafe(fn, *args)

    def request_shutdown(self) -> None:
        if not self._stop_event.is_set():
            log.info("shutdown requested")
            self._stop_event.set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for sig in ("SIGINT", "SIGTERM"):
            with contextlib.suppress(NotImplementedError, AttributeError):  # Windows
                loop.add_signal_handler(getattr(__import__("signal"), sig), self.request_shutdown)
        with contextlib.suppress(NotImplementedError, AttributeError):  # kill -USR1: what is everyone waiting for?
            loop.add_signal_handler(__import__("signal").SIGUSR1, _log_tasks)
        # Bind both ports first: a port in use fails before minutes of model loading.
        api_sock = _bind(cfg.host, cfg.api_port)
        tcp_sock = _bind(cfg.host, cfg.tcp_port)
        self.api_port, self.tcp_port = api_sock.getsockname()[1], tcp_sock.getsockname()[1]
        if cfg.exposed and not cfg.token:
            log.warning("listening on %s without --token: anyone who can reach this address can stream "
                        "frames and read results", cfg.host)
        app = create_app(self.stats, self.broadcaster, cfg.token, cfg.max_ws_clients)
        self._uvicorn = _EmbeddedUvicorn(uvicorn.Config(app, log_config=None, lifespan="off",
                                                        access_log=False, ws="websockets-sansio"))
        uv_task = asyncio.create_task(self._uvicorn.serve(sockets=[api_sock]), name="uvicorn")
        log.info("control plane on http://%s:%d (health answers while models load)", cfg.host, self.api_port)

        await self._start_workers()
        tcp = await asyncio.start_server(self._on_client, sock=tcp_sock, limit=1 << 20)
        self.stats.ready = True
        log.info("ready: frames on tcp://%s:%d, model %s on %s, %d lane(s) (%d worker(s) x %d lane(s) each), "
                 "imgsz %s", cfg.host, self.tcp_port, self.stats.model, cfg.device, self.stats.lanes, cfg.workers,
                 cfg.lanes, self.state.imgsz)
        self._write_ready_file()
        try:
            await self._stop_event.wait()
        finally:
            await self._shutdown(tcp, uv_task)

    async def _start_workers(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        resolved = await asyncio.to_thread(resolve_model, cfg.model, cfg.download_timeout)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
        spec = DetectorSpec(cfg.model, cfg.device, cfg.imgsz, cfg.conf, cfg.iou, cfg.max_det, threads, cfg.workers,
                            cfg.rect, self._inflight)
        # One thread per lane, forever: ultralytics models are not thread-safe, so each lane builds
        # and uses its own model (or OpenVINO infer request) on its own thread.
        lanes = cfg.workers * cfg.lanes
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"worker-{i}", initializer=_lower_priority,
                                              initargs=(cfg.worker_nice,))
                           for i in range(lanes)]
        try:
            detectors = await asyncio.gather(
                *(loop.run_in_executor(ex, load_detector, spec, resolved) for ex in self._executors))
        except ModelLoadError as exc:
            log.warning("%s", exc)
            resolved = None
            detectors = [PlaceholderDetector() for _ in self._executors]
        if resolved is None:
            log.warning("PLACEHOLDER MODE: no model could be loaded from %r; every frame gets one dummy box "
                        "labelled 'placeholder'. Pass --model with a local .pt, .onnx, .yaml or OpenVINO folder.",
                        cfg.model)
        first = detectors[0]
        self.stats.model = first.model_name
        self.state.names = dict(first.names)
        imgsz = self.state.imgsz = list(getattr(first, "imgsz", (cfg.imgsz, cfg.imgsz)))
        self.stats.input_shapes_fn = lambda: getattr(first, "input_shapes", [tuple(imgsz)])
        # Large JPEGs may decode at a reduced size that still covers the model input.
        self._decode_target = (imgsz[0], imgsz[1]) if cfg.fast_decode and resolved is not None else None
        self.stats.lanes = self.scheduler.lanes = len(self._executors)
        self._workers = [asyncio.create_task(self._worker(d, ex), name=f"worker-{i}")
                         for i, (d, ex) in enumerate(zip(detectors, self._executors))]

    def _write_ready_file(self) -> None:
        if self.config.ready_file is None:
            return
        path = Path(self.config.ready_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"tcp_port": self.tcp_port, "api_port": self.api_port, "pid": os.getpid()}))
        tmp.replace(path)  # atomic: readers never see half a file

    async def _shutdown(self, tcp: asyncio.Server, uv_task: asyncio.Task) -> None:
        """Stop accepting, answer every received frame (result or drop notice), flush, close."""
        cfg = self.config
        started = time.monotonic()
        self.state.stopping = True
        self.stats.ready = False
        tcp.close()
        # Cancel the readers, and again whatever still runs: on Python < 3.12 a cancel that lands just
        # as asyncio.wait_for's inner read completes is swallowed, and that reader would keep the
        # shutdown waiting for as long as its client kept sending (seen: 1 run in ~6 under load).
        pending = set(self._readers.values())
        for _ in range(50):
            for task in pending:
                task.cancel()
            if not pending:
                break
            _done, pending = await asyncio.wait(pending, timeout=0.05)
        dropped = self.scheduler.close(SHUTDOWN)
        # Frames clients sent before the signal but not yet read still get an answer (a 'shutdown'
        # drop notice), while in-flight inference finishes.
        until = asyncio.get_running_loop().time() + min(1.0, cfg.shutdown_grace)
        drains = asyncio.gather(*(c.drain(until) for c in list(self.connections.values())),
                                return_exceptions=True)
        _done, pending = await asyncio.wait(self._workers, timeout=cfg.shutdown_grace) if self._workers else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await drains
        conns = list(self.connections.values())
        for conn in conns:
            conn.send(error_msg("shutdown", "server is shutting down"))
            # drain() otherwise returns below the low-water mark, leaving the last replies unsent.
            with contextlib.suppress(Exception):
                conn.writer.transport.set_write_buffer_limits(high=0)
        # One deadline for all: flushing one by one would let N stalled clients cost N seconds.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(c.writer.drain() for c in conns), return_exceptions=True), 1.0)
        # Lingering close: closing a socket with unread input sends RST, and the peer's kernel may
        # then discard our last replies before its application reads them. Send FIN, swallow what
        # the client still sends until it closes too (or a short deadline), then close.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(_linger(c.reader, c.writer) for c in conns),
                                                  return_exceptions=True), 0.5)
        for conn in conns:
            conn.cleanup()
        self.connections.clear()
        self._uvicorn.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(uv_task, 3.0)
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)
        log.info("stopped in %.2fs: %d waiting frame(s) dropped as shutdown, %d inference(s) abandoned; "
                 "totals: %d received, %d processed, %d dropped", time.monotonic() - started, dropped,
                 len(pending), self.stats.total_frames, self.stats.processed_frames, self.stats.dropped_frames)

    # ------------------------------------------------------------------ clients

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state.stopping:
            writer.close()
            return
        if len(self.connections) >= self.config.max_clients:
            self.stats.error("too_many_clients")
            writer.write(encode(error_msg("too_many_clients",
                                          f"server is at its limit of {self.config.max_clients} clients")))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            return
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = next(self._keys)
        conn = ClientConnection(self.state, key, reader, writer)
        self.connections[key] = conn
        self._readers[key] = asyncio.current_task()  # type: ignore[assignment]
        self.stats.client_connected()
        try:
            await conn.run()
        except asyncio.CancelledError:
            if not self.state.stopping:
                raise
        finally:
            self._readers.pop(key, None)
            if not self.state.stopping:  # on shutdown, _shutdown answers and closes every connection
                self.connections.pop(key, None)
                conn.cleanup()
            self.stats.client_disconnected()

    # ------------------------------------------------------------------ inference

    async def _worker(self, detector: Detector, executor: ThreadPoolExecutor) -> None:
        """One lane: its thread runs `_lane` until the scheduler closes. Supervisor: a bug outside the
        per-frame guard restarts the lane instead of silently losing it (which would stall every
        stream once all are gone)."""
        loop = asyncio.get_running_loop()
        lane = _Lane()
        while True:
            try:
                await loop.run_in_executor(executor, self._lane, detector, lane)
                return
            except asyncio.CancelledError:
                job = lane.job  # abandoned at shutdown: the frame still gets its answer, and only one
                if job is not None:
                    self._abandoned.add(job)
                    self._on_drop(job, SHUTDOWN)
                raise
            except Exception:
                self.stats.error("worker_crash")
                log.exception("worker loop crashed; restarting it")

    def _lane(self, detector: Detector, lane: _Lane) -> None:
        """Lane thread: take the next frame straight from the scheduler (no round trip through the
        event loop between two frames), decode and detect it, and post its answer to the loop."""
        post = self._dispatch
        while (job := self.scheduler.wait_take()) is not None:
            lane.job = job
            with self._busy_lock:
                self.stats.workers_busy += 1
            released = False  # the scheduler has this frame back (its stream's lane share is free)
            try:
                detections, t0, t1, t2, size = _infer(detector, job.frame, self._decode_target, self._inflight)
                self.scheduler.done(job, t2 - t0)
                released = True
            except DecodeError as exc:
                post(self._failed, job, "decode_error", str(exc))
            except Exception as exc:  # one bad frame (or a bug here) must not kill the lane or lose the frame
                log.exception("inference failed on %s frame %s", job.stream.name, job.frame.frame_id)
                post(self._failed, job, "inference_error", f"{type(exc).__name__}: {exc}")
            else:
                post(self._deliver, job, detections, t0, t1, t2, size)
            finally:
                lane.job = None
                if not released:  # failed, or the bookkeeping itself raised: not measured
                    self.scheduler.done(job, None)
                with self._busy_lock:
                    self.stats.workers_busy -= 1

    def _failed(self, job: Job, reason: str, message: str) -> None:
        if reason == "decode_error":
            self.stats.error(reason)
        self._on_drop(job, reason, message)

    def _deliver(self, job: Job, detections: list[dict[str, Any]], t0: float, t1: float, t2: float,
                 size: tuple[int, int]) -> None:
        conn: ClientConnection = job.stream.owner
        if job in self._abandoned:  # answered with a shutdown notice when its lane was given up
            return
        if conn.closed:
            self.stats.frame_dropped(conn.key, DISCONNECTED)
            return
        done = time.perf_counter()
        latency_ms = (done - job.received) * 1000.0
        timings = {"queue_ms": round((t0 - job.received) * 1000.0, 3),
                   "decode_ms": round((t1 - t0) * 1000.0, 3), "infer_ms": round((t2 - t1) * 1000.0, 3)}
        frame = job.frame
        msg = {
            "type": "result",
            "stream_name": frame.stream_name,
            "frame_id": frame.frame_id,
            "detections": detections,
            "latency_ms": round(latency_ms, 3),
            "timings": timings,
            "timestamp": frame.timestamp,
            "image_size": list(size),
            "server_time": time.time(),
        }
        conn.send(msg)
        self.stats.frame_processed(conn.key, latency_ms, timings)
        self.broadcaster.publish(msg)

    def _on_drop(self, job: Job, reason: str, message: str | None = None) -> None:
        conn: ClientConnection = job.stream.owner
        if job in self._abandoned and reason != SHUTDOWN:
            return
        self.stats.frame_dropped(conn.key, reason)
        if reason != DISCONNECTED:
            msg = dropped_msg(job.frame.stream_name, job.frame.frame_id, reason)
            if message:
                msg["message"] = message
            conn.send(msg)
