"""The server's lifecycle: startup, main loop, shutdown; the TCP listener and uvicorn in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import itertools
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

from visionstream.server.admission import Admission
from visionstream.server.broadcast import Broadcaster
from visionstream.server.config import Executor, ServerConfig
from visionstream.server.connection import ClientConnection
from visionstream.server.descriptors import LISTEN_BACKLOG, check_descriptors
from visionstream.server.history import History
from visionstream.server.http import create_app
from visionstream.server.httplimits import BurstLog, HttpGuard, HttpLimits, http_protocol
from visionstream.server.inference.api import DetectorSpec, InFlight
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.inference.models import DEFAULT_MODEL, check_model, falls_back, resolve_model
from visionstream.server.lanes import LaneExecutor, Lanes
from visionstream.server.latest import LatestFrames
from visionstream.server.replies import Replies
from visionstream.server.scheduler import SHUTDOWN, Scheduler
from visionstream.server.state import ServerState
from visionstream.server.stats import Stats
from visionstream.server.tls import (
    MAX_TLS_HANDSHAKES,
    TLS_HANDSHAKE_TIMEOUT,
    ServerTLSContext,
    handshake_failure_reason,
    server_context,
)
from visionstream.server.tracking import Tracking, load_tracker_settings
from visionstream.wire.errors import ModelNotFound, PortUnavailable
from visionstream.wire.protocol import encode, error_msg

log = logging.getLogger("visionstream.server")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the InferenceServer owns signals, so uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup for pre-bound sockets (lifespan is off), with a TLS handshake deadline: uvicorn
        passes none, and asyncio's default of 60 s lets a silent peer hold a descriptor six times longer."""
        assert sockets is not None
        config = self.config
        loop = asyncio.get_running_loop()
        await self.lifespan.startup()  # lifespan="off": a no-op, kept so the order stays uvicorn's

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state, _loop=_loop)

        timeout = TLS_HANDSHAKE_TIMEOUT if config.ssl is not None else None
        self.servers = [await loop.create_server(create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog,
                                                 ssl_handshake_timeout=timeout) for sock in sockets]
        self.started = True


def _bind(host: str, port: int, flag: str, role: str) -> socket.socket:
    """A listening socket on host:port; PortUnavailable naming the flag when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        reason = ("is already in use" if exc.errno == errno.EADDRINUSE
                  else f"cannot be bound ({exc.strerror or exc})")
        raise PortUnavailable(flag, port, role, host, reason) from exc
    sock.setblocking(False)
    return sock


def _log_tasks() -> None:
    """Log every asyncio task with where it is suspended (SIGUSR1): for a server that seems stuck."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=6, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue().rstrip())


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof():
        writer.write_eof()
    while await reader.read(1 << 16):
        pass


class InferenceServer:
    """Owns every component; `run` is `startup`, `main_loop` (until SIGINT/SIGTERM), `shutdown`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = Stats(model="loading", device=config.device, workers=config.workers,
                           lanes_per_worker=config.lanes)
        self.broadcaster = Broadcaster(self.stats, config.ws_queue)
        self.latest = LatestFrames()  # the dashboard's newest frame per stream
        self.history = History(self.stats)
        self.replies = Replies(self.stats, self.broadcaster, self.latest)
        self.scheduler = Scheduler(
            on_drop=self.replies.drop,
            dispatch=self._dispatch,
            queue_depth=config.queue_depth,
            lossless_depth=config.lossless_depth,
            max_queue=config.max_queue,
            max_age_ms=config.max_age_ms,
        )
        self.stats.queue_size_fn = lambda: len(self.scheduler)
        # What connections see of the server (the model's names and input size once it is loaded).
        self.state = ServerState(config, self.stats, self.scheduler, imgsz=[config.imgsz, config.imgsz])
        self.lanes: LaneExecutor = self._lanes()
        self.connections: dict[int, ClientConnection] = {}
        self.admission = Admission(self.stats, max_clients=config.max_clients, max_pending=config.max_pending)
        self.tcp_port: int | None = None
        self.api_port: int | None = None
        self._keys = itertools.count(1)
        self._readers: dict[int, asyncio.Task] = {}
        self._stop_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tcp: asyncio.Server | None = None
        self._uvicorn: _EmbeddedUvicorn | None = None
        self._uv_task: asyncio.Task | None = None
        self._tls: ServerTLSContext | None = None
        self._burst = BurstLog(logging.getLogger("visionstream.server.http"))
        # What shutdown counts and hands from one step to the next.
        self._dropped = self._abandoned = 0
        self._conns: list[ClientConnection] = []

    def _lanes(self) -> LaneExecutor:
        cfg, inflight = self.config, InFlight(busy=self.scheduler.busy)
        self.stats.executor = cfg.executor.value
        if cfg.executor is Executor.RAY:
            from visionstream.server.raylanes import RayLanes  # ray itself is imported only when loading

            ray = RayLanes(self.scheduler, self.replies, self.stats, self._dispatch, inflight, actors=cfg.workers,
                           per_actor=cfg.lanes, address=cfg.ray_address, num_cpus=cfg.ray_num_cpus,
                           num_gpus=cfg.ray_num_gpus)
            self.stats.actors_fn = ray.actors
            return ray
        return Lanes(self.scheduler, self.replies, self.stats, self._dispatch, inflight)

    def _dispatch(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the event loop, from any thread: lane results, and what a lane's take
        causes in the scheduler (drop notices)."""
        if self._loop is None or self._loop_thread == threading.get_ident():
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_tls_failure(self, exc: ssl.SSLError) -> None:
        reason = handshake_failure_reason(exc)
        self.stats.error("tls_handshake_failed")
        self._burst.note("TLS handshakes failed", f"TLS handshake failed ({reason}; e.g. a plaintext client on a "
                                                 f"TLS port): closed, counted as tls_handshake_failed")

    def _on_tls_refused(self) -> None:
        self.stats.error("tls_handshake_refused")
        self._burst.note("TLS handshakes refused", f"{MAX_TLS_HANDSHAKES} TLS handshakes in progress: refusing "
                                                  f"more until some finish (counted as tls_handshake_refused)")

    def request_shutdown(self) -> None:
        if not self._stop_event.is_set():
            log.info("shutdown requested")
            self._stop_event.set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self.startup()
        except BaseException:  # e.g. a model that does not load: nothing may outlive the failed start
            await self._abort_startup()
            raise
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        """Signals, both ports bound (a port in use fails before minutes of model loading), the control
        plane up (it answers /health while models load), the lanes loaded and warm, then frames."""
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, AttributeError):  # Windows
                loop.add_signal_handler(sig, self.request_shutdown)
        with contextlib.suppress(NotImplementedError, AttributeError):  # kill -USR1: what is everyone waiting for?
            loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
        check_descriptors(cfg)  # before anything is bound or loaded: a refusal is one line and exit 2
        if not cfg.placeholder:
            check_model(cfg.model)  # a mistyped path fails here, before the ports and the control plane
        self.state.tracker = load_tracker_settings(cfg.track, cfg.tracker_config)  # e.g. no `lap`: one line, exit 2
        self.stats.tracking = cfg.track.value if isinstance(cfg.track, Tracking) else str(cfg.track)
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            self._tls = server_context(cfg.tls_cert, cfg.tls_key)
            self._tls.on_handshake_failure = self._on_tls_failure
            self._tls.on_handshake_refused = self._on_tls_refused
        api_sock = _bind(cfg.host, cfg.api_port, "--api-port", "HTTP control plane")
        try:
            tcp_sock = _bind(cfg.host, cfg.tcp_port, "--tcp-port", "frames")
        except PortUnavailable:
            api_sock.close()
            raise
        self.api_port, self.tcp_port = api_sock.getsockname()[1], tcp_sock.getsockname()[1]
        if cfg.exposed and not cfg.token:
            log.warning("listening on %s without --token: anyone who can reach this address can stream "
                        "frames and read results", cfg.host)
        app = create_app(self.stats, self.broadcaster, cfg.token, cfg.max_ws_clients, self.latest, self.history)
        self.history.start()
        guard = HttpGuard(HttpLimits(cfg.max_http_clients, cfg.http_timeout), self.stats, self._burst)
        tls_ctx = self._tls
        tls_options: dict[str, Any] = {} if tls_ctx is None else {
            "ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key),
            "ssl_context_factory": lambda _config, _default: tls_ctx}
        self._uvicorn = _EmbeddedUvicorn(uvicorn.Config(app, log_config=None, lifespan="off", access_log=False,
                                                        ws="websockets-sansio", http=http_protocol(guard),
                                                        backlog=LISTEN_BACKLOG, **tls_options))
        self._uv_task = asyncio.create_task(self._uvicorn.serve(sockets=[api_sock]), name="uvicorn")
        scheme = ("https", "tls") if self._tls is not None else ("http", "tcp")
        log.info("control plane on %s://%s:%d (health answers while models load)", scheme[0], cfg.host,
                 self.api_port)
        await self._start_lanes()
        self._tcp = await asyncio.start_server(
            self._on_client, sock=tcp_sock, limit=1 << 20, backlog=LISTEN_BACKLOG, ssl=self._tls,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._tls is not None else None)
        self.stats.ready = True
        log.info("ready: frames on %s://%s:%d, model %s on %s, %d lane(s) (%d worker(s) x %d lane(s) each), "
                 "imgsz %s", scheme[1], cfg.host, self.tcp_port, self.stats.model, cfg.device, self.stats.lanes,
                 cfg.workers, cfg.lanes, self.state.imgsz)
        self._write_ready_file()

    async def main_loop(self) -> None:
        await self._stop_event.wait()

    async def _start_lanes(self) -> None:
        cfg = self.config
        resolved: str | None = None
        why = "--placeholder: placeholder detections on purpose, no model is loaded"
        if not cfg.placeholder:
            try:
                resolved = await asyncio.to_thread(resolve_model, cfg.model, cfg.download_timeout)
            except ModelNotFound as exc:
                if not falls_back(cfg.model):  # a model the user named: stop, one line, exit 2
                    raise
                why = (f"the default model {DEFAULT_MODEL} is not on disk and could not be downloaded "
                       f"({exc.reason}). Pass --model with a local .pt, .onnx, .yaml or OpenVINO folder")
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
        streams = cfg.workers
        if cfg.executor is Executor.RAY:  # each actor its own model, running one frame at a time on its CPUs
            threads, streams = cfg.threads or max(1, round(cfg.ray_num_cpus)), 1
        spec = DetectorSpec(cfg.model, cfg.device, cfg.imgsz, cfg.conf, cfg.iou, cfg.max_det, threads=threads,
                            streams=streams, rect=cfg.rect)
        detectors = await self.lanes.load(spec, resolved, cfg.workers * cfg.lanes, cfg.worker_nice)
        first = detectors[0]
        placeholder = isinstance(first, PlaceholderDetector) or getattr(first, "placeholder", False)
        if placeholder:
            log.warning("PLACEHOLDER MODE: every frame gets one dummy box labelled 'placeholder', no real "
                        "detections: %s", why)
        self.stats.model = first.model_name
        self.state.names = dict(first.names)
        imgsz = self.state.imgsz = list(getattr(first, "imgsz", (cfg.imgsz, cfg.imgsz)))
        self.stats.input_shapes_fn = lambda: getattr(first, "input_shapes", [tuple(imgsz)])
        if cfg.fast_decode and not placeholder:
            self.lanes.decode_target = (imgsz[0], imgsz[1])
        self.stats.lanes = self.scheduler.lanes = len(self.lanes)
        self.lanes.max_pixels, self.lanes.infer_timeout = cfg.max_pixels, cfg.infer_timeout
        self.stats.lanes_stuck_fn = lambda: self.lanes.stuck
        self.lanes.start(detectors)

    def _write_ready_file(self) -> None:
        if self.config.ready_file is None:
            return
        path = Path(self.config.ready_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"tcp_port": self.tcp_port, "api_port": self.api_port, "pid": os.getpid()}))
        tmp.replace(path)  # atomic: readers never see half a file

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop accepting, answer every received frame (a result or a drop notice), flush, close. Each
        step is named in the debug log; a step that raises is logged and the next one still runs."""
        started = time.monotonic()
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("stop accepting", self._stop_accepting),
            ("stop readers", self._stop_readers),
            ("answer waiting frames and finish inference", self._finish_frames),
            ("tell and flush clients", self._flush_clients),
            ("linger and close connections", self._close_connections),
            ("stop the control plane", self._stop_http),
            ("release the lanes", self._release_lanes),
        ]
        for name, step in steps:
            log.debug("shutdown: %s", name)
            try:
                await step()
            except Exception:
                log.exception("shutdown step %r failed; going on", name)
        log.info("stopped in %.2fs: %d waiting frame(s) dropped as shutdown, %d inference(s) abandoned; "
                 "totals: %d received, %d processed, %d dropped", time.monotonic() - started, self._dropped,
                 self._abandoned, self.stats.total_frames, self.stats.processed_frames, self.stats.dropped_frames)

    async def _stop_accepting(self) -> None:
        self.state.stopping = True
        self.stats.ready = False
        if self._tcp is not None:
            self._tcp.close()

    async def _stop_readers(self) -> None:
        # Cancel the readers, and again whatever still runs: on Python < 3.12 a cancel that lands just
        # as asyncio.wait_for's inner read completes is swallowed, and that reader would keep the
        # shutdown waiting for as long as its client kept sending.
        pending = set(self._readers.values())
        for _ in range(50):
            for task in pending:
                task.cancel()
            if not pending:
                break
            _done, pending = await asyncio.wait(pending, timeout=0.05)

    async def _finish_frames(self) -> None:
        """Waiting frames get a 'shutdown' notice; so do frames clients sent before the signal but not
        yet read, while in-flight inference finishes (up to --shutdown-grace)."""
        cfg = self.config
        self._dropped = self.scheduler.close(SHUTDOWN)
        until = asyncio.get_running_loop().time() + min(1.0, cfg.shutdown_grace)
        drains = asyncio.gather(*(c.drain(until) for c in list(self.connections.values())),
                                return_exceptions=True)
        self._abandoned = await self.lanes.stop(cfg.shutdown_grace)
        await drains

    async def _flush_clients(self) -> None:
        self._conns = conns = list(self.connections.values())
        for conn in conns:
            conn.send(error_msg("shutdown", "server is shutting down"))
            # drain() otherwise returns below the low-water mark, leaving the last replies unsent.
            with contextlib.suppress(Exception):
                conn.writer.transport.set_write_buffer_limits(high=0)
        # One deadline for all: flushing one by one would let N stalled clients cost N seconds.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(c.writer.drain() for c in conns), return_exceptions=True), 1.0)

    async def _close_connections(self) -> None:
        # Lingering close: closing a socket with unread input sends RST, and the peer's kernel may
        # then discard our last replies before its application reads them. Send FIN, swallow what
        # the client still sends until it closes too (or a short deadline), then close.
        conns = self._conns
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(_linger(c.reader, c.writer) for c in conns),
                                                  return_exceptions=True), 0.5)
        for conn in conns:
            conn.cleanup()
        self.connections.clear()

    async def _stop_http(self) -> None:
        await self.history.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._uv_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._uv_task, 3.0)

    async def _release_lanes(self) -> None:
        self.lanes.close()

    async def _abort_startup(self) -> None:
        """Undo a start that failed half-way (ports bound, control plane up, lanes loading), quietly:
        the caller reports the one reason."""
        self.stats.ready = False
        if self._tcp is not None:
            self._tcp.close()
        for step in (self._stop_http, self._release_lanes):
            with contextlib.suppress(Exception):
                await step()

    # ------------------------------------------------------------------ clients

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state.stopping:
            writer.close()
            return
        if self.admission.full:  # pending connections hold no seat: only clients past their hello count
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
        conn = ClientConnection(self.state, key, reader, writer, admission=self.admission, replies=self.replies)
        self.connections[key] = conn
        self._readers[key] = asyncio.current_task()  # type: ignore[assignment]
        self.stats.client_connected()
        self.admission.admit(conn)  # pending until its hello; may evict the oldest pending connection
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
