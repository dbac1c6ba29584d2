"""Server flags parsed once into a frozen config; the core never reads argparse or os.environ."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from visionstream.cli.common import HelpFormatter
from visionstream.server.inference.models import DEFAULT_MODEL, FORMATS
from visionstream.server.policy import RULES
from visionstream.server.tracking import Tracking
from visionstream.wire.errors import ConfigError
from visionstream.wire.protocol import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_PIXELS, MAX_IMAGE_DIM, TOKEN_ENV


def _max_age(text: str) -> float:
    if text.strip().lower() == "auto":
        raise argparse.ArgumentTypeError("'auto' is gone: no frame a lane could serve is dropped for its age any "
                                         "more unless you set a limit in milliseconds (0: none)")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds (0: no limit), got {text!r}") from None


RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable naming the cluster to join


class Executor(str, Enum):
    """--executor: where the inference lanes run (`threads`: in this process; `ray`: Ray actors on a cluster)."""

    THREADS = "threads"
    RAY = "ray"


def _device(text: str) -> str:
    """`0`, `1`, ... (the ultralytics idiom) mean cuda:0, cuda:1, ...; `cuda` means cuda:0."""
    text = text.strip().lower()
    if text.isdigit():
        return f"cuda:{int(text)}"
    return "cuda:0" if text == "cuda" else text


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    tcp_port: int = 9000
    api_port: int = 8000
    model: str = DEFAULT_MODEL
    placeholder: bool = False  # placeholder detections on purpose; --model is not loaded
    device: str = "cpu"
    workers: int = 2
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    threads: int = 0  # inference threads per worker; 0 = cores / workers
    lanes: int = 1  # frames in flight per worker (lane threads in all: workers x lanes)
    worker_nice: int = 10  # niceness of the inference threads (Linux), so the event loop preempts them
    max_age_ms: float = 0.0  # 0 = frames never go stale
    queue_depth: int = 1
    lossless_depth: int = 4
    max_queue: int = 256
    send_buffer: int = 4 * 1024 * 1024
    max_clients: int = 64
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # per frame, from its header, before decoding
    infer_timeout: float = 10.0  # seconds a frame may spend in a lane (decode and inference); 0 = no limit
    read_timeout: float = 30.0
    hello_timeout: float = 5.0  # seconds a new connection has for its hello (or first message)
    max_pending: int = 64  # connections not yet past their hello; the oldest is evicted for a newer one
    token: str | None = None
    log_dir: Path = Path("logs")
    log_level: str = "info"
    ready_file: Path | None = None
    download_timeout: float = 5.0
    shutdown_grace: float = 3.0
    ws_queue: int = 256
    max_ws_clients: int = 32
    max_http_clients: int = 256  # open sockets on the HTTP port, /ws viewers included
    http_timeout: float = 10.0  # seconds to send a whole HTTP request
    tls_cert: Path | None = None
    tls_key: Path | None = None
    fast_decode: bool = True
    rect: bool = True
    track: Tracking = Tracking.OFF  # an ultralytics tracker per stream; results then carry track_id
    tracker_config: Path | None = None  # an ultralytics tracker YAML overriding the tracker's defaults
    executor: Executor = Executor.THREADS  # ray: --workers Ray actors, each with --lanes frames in flight
    ray_address: str | None = None  # the cluster to join (None: a local Ray the server starts and stops)
    ray_num_cpus: float = 1.0  # Ray resources each actor reserves (and its inference threads, unless --threads)
    ray_num_gpus: float = 0.0

    def validate(self) -> ServerConfig:
        """Raise ConfigError (one readable line) for values that cannot work."""
        checks = [
            (0 <= self.tcp_port <= 65535, f"--tcp-port must be 0-65535, got {self.tcp_port}"),
            (0 <= self.api_port <= 65535, f"--api-port must be 0-65535, got {self.api_port}"),
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (32 <= self.imgsz <= 4096 and self.imgsz % 32 == 0,
             f"--imgsz must be a multiple of 32 between 32 and 4096, got {self.imgsz}"),
            (0.0 < self.conf < 1.0, f"--conf must be between 0 and 1, got {self.conf}"),
            (0.0 < self.iou < 1.0, f"--iou must be between 0 and 1, got {self.iou}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
            (1 <= self.lanes <= 8, f"--lanes must be 1-8, got {self.lanes}"),
            (0 <= self.worker_nice <= 19, f"--worker-nice must be 0-19, got {self.worker_nice}"),
            (self.max_age_ms >= 0, f"--max-age-ms must be >= 0, got {self.max_age_ms}"),
            (self.queue_depth >= 1, f"--queue-depth must be >= 1, got {self.queue_depth}"),
            (self.lossless_depth >= 1, f"--lossless-depth must be >= 1, got {self.lossless_depth}"),
            (self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}"),
            (self.send_buffer >= 65536, f"--send-buffer must be >= 65536 bytes, got {self.send_buffer}"),
            (self.max_clients >= 1, f"--max-clients must be >= 1, got {self.max_clients}"),
            (1024 <= self.max_frame_bytes <= 1 << 30,
             f"--max-frame-bytes must be between 1 KiB and 1 GiB, got {self.max_frame_bytes}"),
            (self.read_timeout > 0, f"--read-timeout must be > 0, got {self.read_timeout}"),
            (1 <= self.max_pixels <= MAX_IMAGE_DIM * MAX_IMAGE_DIM,
             f"--max-pixels must be between 1 and {MAX_IMAGE_DIM * MAX_IMAGE_DIM}, got {self.max_pixels}"),
            (self.infer_timeout >= 0, f"--infer-timeout must be >= 0 seconds (0: no limit), got {self.infer_timeout}"),
            (self.hello_timeout > 0, f"--hello-timeout must be > 0, got {self.hello_timeout}"),
            (self.max_pending >= 1, f"--max-pending must be >= 1, got {self.max_pending}"),
            (self.max_det >= 1, f"--max-det must be >= 1, got {self.max_det}"),
            # asyncio.Queue(0) is unbounded: a slow viewer would then grow memory without limit.
            (self.ws_queue >= 1, f"--ws-queue must be >= 1, got {self.ws_queue}"),
            (self.max_ws_clients >= 1, f"--max-ws-clients must be >= 1, got {self.max_ws_clients}"),
            # Viewers hold their seats; with none left over, /health and /stats could not get in.
            (self.max_http_clients > self.max_ws_clients,
             f"--max-http-clients ({self.max_http_clients}) must exceed --max-ws-clients "
             f"({self.max_ws_clients}): viewers would leave no seat for /health"),
            (self.http_timeout > 0, f"--http-timeout must be > 0, got {self.http_timeout}"),
            ((self.tls_cert is None) == (self.tls_key is None),
             "--tls-cert and --tls-key go together: give both (PEM certificate chain and its private key) "
             "or neither"),
            (self.tracker_config is None or self.track is not Tracking.OFF,
             "--tracker-config needs --track bytetrack or --track botsort"),
            (self.ray_num_cpus > 0, f"--ray-num-cpus must be > 0, got {self.ray_num_cpus:g}"),
            (self.ray_num_gpus >= 0, f"--ray-num-gpus must be >= 0, got {self.ray_num_gpus:g}"),
            (self.executor is Executor.RAY or (self.ray_address is None and self.ray_num_cpus == 1.0
                                                and self.ray_num_gpus == 0.0),
             "--ray-address, --ray-num-cpus and --ray-num-gpus need --executor ray"),
            # A tracker steps on the decoded image in the lane; Ray actors decode in another process.
            (self.executor is Executor.THREADS or self.track is Tracking.OFF,
             "--track needs --executor threads: Ray actors decode the frames, and a stream's tracker must "
             "step in the front process in frame order"),
            (re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
             f"--device must be cpu, cuda, cuda:N or N (= cuda:N), got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    @property
    def exposed(self) -> bool:
        """True when bound beyond loopback, where running without a token is risky."""
        return self.host not in ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="server.py",
        description="Real-time YOLOv8 inference server: frames over TCP (length-prefixed msgpack), "
        "results back per client, and a FastAPI control plane (/health, /stats, /metrics, /ws).",
        formatter_class=HelpFormatter,
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", default=d.host, help="address to bind both listeners to (loopback by default)")
    net.add_argument("--tcp-port", type=int, default=d.tcp_port, help="TCP port for frames (0: any free port)")
    net.add_argument("--api-port", type=int, default=d.api_port, help="HTTP port of the control plane (0: any)")
    net.add_argument("--token", default=None,
                     help=f"shared secret clients must present (hello, /ws, /stats, /metrics, /streams, latest.jpg, "
                          f"/stats/history; the dashboard at / asks for it); "
                          f"also read from ${TOKEN_ENV} (default: none, no authentication)")
    net.add_argument("--max-clients", type=int, default=d.max_clients,
                     help="concurrent TCP clients past their hello (connections still waiting to say it do not count; "
                          "see --max-pending)")
    net.add_argument("--read-timeout", type=float, default=d.read_timeout,
                     help="seconds a connection may stay silent or leave a message half-sent before it is closed "
                          "(silence does not count while frames it sent still wait for their answers)")
    net.add_argument("--hello-timeout", type=float, default=d.hello_timeout,
                     help="seconds a new connection has to say hello (with --token: a hello with the token; "
                          "without: any valid first message) before it is closed")
    net.add_argument("--max-pending", type=int, default=d.max_pending,
                     help="connections that have not yet said hello; they hold none of the --max-clients seats, "
                          "and when there are this many a new one evicts the oldest")
    net.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes,
                     help="largest message accepted; a larger length prefix closes the connection unread")
    net.add_argument("--max-http-clients", type=int, default=d.max_http_clients,
                     help="open connections on the HTTP port, /ws viewers included; at the limit a newcomer "
                          "displaces the oldest connection without a request in progress, or gets 503 when "
                          "every one is busy")
    net.add_argument("--http-timeout", type=float, default=d.http_timeout,
                     help="seconds an HTTP client has, from connecting (or from a request's first byte), to send "
                          "its whole request; then 408 and close. Request heads beyond 64 KiB get 431")
    net.add_argument("--tls-cert", type=Path, default=None,
                     help="PEM certificate chain: serve the frame port and the HTTP port over TLS, with "
                          "--tls-key (None: plaintext)")
    net.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    net.add_argument("--send-buffer", type=int, default=d.send_buffer,
                     help="reply bytes buffered per client; a client that stops reading past this is "
                          "disconnected and its waiting frames are discarded")
    net.add_argument("--max-pixels", type=int, default=d.max_pixels,
                     help="largest image accepted, in pixels (width x height, read from its header before any "
                          "decode; a progressive JPEG counts up to 1.8x for the coefficients its decoder holds); "
                          "larger is a 'decode_error' drop with code 'too_many_pixels'. One decode holds at most "
                          "about 6 bytes per pixel of this")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=d.model,
                   help=f"weights ultralytics can load: {FORMATS}. A model that is missing or does not "
                        f"load stops the server (exit code 2); only the default {DEFAULT_MODEL}, when it "
                        f"cannot be had offline, starts in placeholder mode, with a warning")
    m.add_argument("--placeholder", action="store_true",
                   help="placeholder detections on purpose (one dummy box per frame, no model loaded), for "
                        "trying the protocol and the clients without weights")
    m.add_argument("--device", type=_device, default=d.device,
                   help="cpu, cuda, cuda:N, or N meaning cuda:N (the ultralytics idiom: 0 is cuda:0); "
                        "CUDA asked for but absent is an error")
    m.add_argument("--workers", type=int, default=d.workers,
                   help="inference workers, each with its own model (with --executor ray: Ray actors)")
    m.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads per worker for inference (0: cores divided by workers)")
    m.add_argument("--lanes", type=int, default=d.lanes,
                   help="frames each worker keeps in flight, each on its own thread (more lanes overlap one frame's "
                        "decoding with another's inference, but frames then share the cores inside the lanes "
                        "instead of waiting for the fair scheduler's choice); with --executor ray: frames sent "
                        "to each actor at once (it runs them one by one; 2 overlaps the transfer with inference)")
    m.add_argument("--worker-nice", type=int, default=d.worker_nice,
                   help="niceness (0-19) of the inference threads on Linux, so the event loop that reads frames "
                        "and writes replies (and answers /health) preempts them under overload (with --executor ray: "
                        "of the actor processes) (0: same priority)")
    m.add_argument("--imgsz", type=int, default=d.imgsz, help="inference image size (multiple of 32)")
    m.add_argument("--conf", type=float, default=d.conf, help="confidence threshold")
    m.add_argument("--iou", type=float, default=d.iou, help="NMS IoU threshold")
    m.add_argument("--max-det", type=int, default=d.max_det, help="most detections per frame")
    m.add_argument("--full-decode", dest="fast_decode", action="store_false",
                   help="always decode JPEGs at full size (by default a JPEG much larger than --imgsz is "
                        "decoded at 1/2, 1/4 or 1/8 scale, which the model cannot tell apart and costs far less)")
    m.add_argument("--no-rect", dest="rect", action="store_false",
                   help="pad every frame to the full --imgsz square (by default a frame is padded only to a "
                        "multiple of 32, as ultralytics does for PyTorch models: a 640x480 frame runs at 320x256 "
                        "at imgsz 320, about 20 %% less work; static YOLOv8 OpenVINO exports are cut before "
                        "their fixed-size decode for this)")
    m.add_argument("--infer-timeout", type=float, default=d.infer_timeout,
                   help="seconds a frame may spend in its lane (decode and inference) before it is answered "
                        "'timeout' and the lane is replaced by a fresh one with a newly loaded model (with --executor "
                        "ray: the actor is killed and Ray restarts it) (0: no limit)")
    m.add_argument("--download-timeout", type=float, default=d.download_timeout,
                   help=f"seconds allowed to fetch a bare *.pt name ultralytics publishes that is not on disk "
                        f"(0: never try); when it cannot be had, the default {DEFAULT_MODEL} starts in placeholder "
                        f"mode and any other name is an error")
    r = p.add_argument_group("executor", "Where inference runs; see docs/SCALING.md")
    r.add_argument("--executor", type=Executor, default=d.executor.value, choices=list(Executor),
                   metavar="{" + ",".join(k.value for k in Executor) + "}",
                   help="threads: lanes in this process; ray: --workers Ray actors on a Ray cluster (GPU nodes "
                        "included), each loading the model once and decoding the frames it gets, while this process "
                        "keeps the ports, the fair scheduler and the control plane")
    r.add_argument("--ray-address", default=None,
                   help=f"Ray cluster to join, host:port of its head (or 'auto'); default: ${RAY_ADDRESS_ENV} if "
                        f"set, else a local Ray started (and stopped) by the server")
    r.add_argument("--ray-num-cpus", type=float, default=d.ray_num_cpus,
                   help="CPUs each Ray actor reserves; also its inference threads unless --threads is set")
    r.add_argument("--ray-num-gpus", type=float, default=d.ray_num_gpus,
                   help="GPUs each Ray actor reserves (fractions share one GPU); pair with --device cuda")
    s = p.add_argument_group("scheduling", f"The policy: {RULES}")
    s.add_argument("--queue-depth", type=int, default=d.queue_depth,
                   help="frames waiting per real-time stream; a newer frame supersedes the oldest")
    s.add_argument("--lossless-depth", type=int, default=d.lossless_depth,
                   help="frames waiting per lossless stream before the server stops reading it")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="frames waiting across all streams")
    s.add_argument("--max-age-ms", type=_max_age, default=d.max_age_ms,
                   help="drop a real-time frame as stale when a lane reaches it older than this many ms (0: never; "
                        "a limit trades frames a lane could serve for a bound on the age of every result)")
    t = p.add_argument_group("tracking")
    t.add_argument("--track", type=Tracking, default=d.track.value, choices=list(Tracking),
                   metavar="{" + ",".join(k.value for k in Tracking) + "}",
                   help="give each detection an identity across its stream's frames with ultralytics' ByteTrack "
                        "or BoT-SORT (one tracker per stream; results then carry track_id)")
    t.add_argument("--tracker-config", type=Path, default=None,
                   help="ultralytics tracker YAML whose settings override the --track tracker's defaults "
                        "(BoT-SORT: gmc_method none unless set here)")
    o = p.add_argument_group("operations")
    o.add_argument("--log-dir", type=Path, default=d.log_dir, help="directory of the server log file")
    o.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"],
                   help="log verbosity")
    o.add_argument("--ready-file", type=Path, default=None,
                   help="write {tcp_port, api_port, pid} as JSON here once ready (for scripts and tests)")
    o.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace,
                   help="seconds in-flight inference may take to finish on SIGINT/SIGTERM")
    o.add_argument("--ws-queue", type=int, default=d.ws_queue,
                   help="events buffered per WebSocket viewer; a slow viewer loses the oldest")
    o.add_argument("--max-ws-clients", type=int, default=d.max_ws_clients,
                   help="concurrent /ws viewers; the next one is refused (close code 1013, try again later)")
    return p


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """argv + environment -> validated ServerConfig. Only this function looks at the environment."""
    environ = os.environ if environ is None else environ
    ns = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(ns).items()}
    if fields["token"] is None:
        fields["token"] = environ.get(TOKEN_ENV) or None
    if fields["ray_address"] is None and fields["executor"] is Executor.RAY:
        fields["ray_address"] = environ.get(RAY_ADDRESS_ENV) or None
    return ServerConfig(**fields).validate()
