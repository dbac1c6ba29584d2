"""Frame sources for the clients (webcam, video file or URL, image folder, synthetic) and frame encoding."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# FFmpeg prints its own diagnostics (e.g. "moov atom not found") straight to stderr, which would bury the
# one-line error the user should see; it must be set before OpenCV first opens a file. Users may override.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2
import numpy as np

from visionstream.client.pacing import retry_delays
from visionstream.wire.errors import SourceError

log = logging.getLogger("visionstream.client")

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
CAMERA_HINT = "try --source 1 if you have more than one camera"
# URL schemes handed to OpenCV (its FFmpeg backend) instead of being looked up as files.
URL_SCHEMES: Final = frozenset({"http", "https", "rtsp", "rtsps", "rtmp"})
# Schemes that only ever carry live streams; over http(s) a stream is live when it has no frame count.
LIVE_SCHEMES: Final = frozenset({"rtsp", "rtsps", "rtmp"})
# How long OpenCV may wait to open a URL, and for one frame of it, before it reports a failure.
URL_OPEN_TIMEOUT_MS: Final = 10_000
URL_READ_TIMEOUT_MS: Final = 5_000
# Query parameters whose values are masked where a URL is shown (logs, summary, results file).
SECRET_QUERY_KEYS: Final = re.compile(r"token|pass|pwd|secret|key|auth|sig|credential", re.I)
MASK: Final = "***"


@dataclass(slots=True)
class SourceFrame:
    """One BGR frame plus what the results file should say about where it came from."""

    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class FrameSource(ABC):
    """A blocking frame iterator; `read` returns None once the source is exhausted."""

    kind: str = "source"
    finite: bool = False
    reopens: int = 0  # times a live source dropped and was opened again
    failure: str | None = None  # why the source ended early, when it did not simply run out

    @property
    def total(self) -> int | None:
        """Frames one run will deliver, when known (drives the progress bar)."""
        return None

    @property
    def lossless_default(self) -> bool:
        # Recorded material is worth every frame; a live feed is only worth its latest frame.
        return self.finite

    @abstractmethod
    def read(self) -> SourceFrame | None: ...

    def close(self) -> None:  # noqa: B027 (most sources hold nothing to release)
        """Release the device or file; safe to call twice."""

    def interrupt(self) -> None:  # noqa: B027 (only sources that wait to reopen have something to cut short)
        """Called from another thread on stop: a read waiting to reopen the source returns None soon."""

    def describe(self) -> str:
        return self.kind

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_opencv() -> None:
    # OpenCV's own WARN/ERROR lines about missing cameras duplicate the message we print ourselves.
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:
        pass


class WebcamSource(FrameSource):
    """A camera by index; frames are read live, so the newest frame wins."""

    kind = "webcam"
    finite = False
    # A camera that stops delivering for this many reads in a row is treated as unplugged.
    MAX_FAILED_READS = 10

    def __init__(self, index: int) -> None:
        _quiet_opencv()
        self.index = index
        self._cap = cv2.VideoCapture(index)
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"Failed to open video source {index} ({CAMERA_HINT})")
        # Without this the driver queues stale frames and a slow sender sees the past, not the present.
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> SourceFrame | None:
        for _ in range(self.MAX_FAILED_READS):
            ok, frame = self._cap.read()
            if ok and frame is not None:
                return SourceFrame(frame)
        return None

    def close(self) -> None:
        self._cap.release()

    def describe(self) -> str:
        return f"webcam {self.index}"


class VideoFileSource(FrameSource):
    """A video file read frame by frame; `meta` carries the frame index within the file."""

    kind = "video"
    finite = True

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        _quiet_opencv()
        self.path = Path(path)
        self.loop = loop
        if not self.path.exists():
            raise SourceError(f"Failed to open video source {path} (no such file)")
        if self.path.is_dir():
            raise SourceError(f"Failed to open video source {path} (it is a folder: use --mode 1 --folder)")
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"Failed to open video source {path} (not a video OpenCV can decode)")
        self._count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        # Read one frame now so a file that opens but holds no decodable frame fails up front.
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise SourceError(f"Failed to open video source {path} (no decodable frames)")
        self._first: np.ndarray | None = first
        self._index = 0
        self._pass = 0

    @property
    def total(self) -> int | None:
        return None if self.loop or self._count <= 0 else self._count

    def read(self) -> SourceFrame | None:
        if self._first is not None:
            frame, self._first = self._first, None
        else:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                if not self.loop or self._index == 0:
                    return None
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self._cap.read()
                if not ok or frame is None:
                    return None
                self._index = 0
                self._pass += 1
        meta: dict[str, Any] = {"frame_index": self._index}
        if self.loop:
            meta["pass"] = self._pass
        self._index += 1
        return SourceFrame(frame, meta)

    def close(self) -> None:
        self._cap.release()

    def describe(self) -> str:
        return f"video {self.path}"


def is_url(text: str) -> bool:
    """Whether `text` names a network stream (http, https, rtsp, rtsps, rtmp) rather than a path."""
    return "://" in text and urlsplit(text).scheme.lower() in URL_SCHEMES


def mask_url(url: str) -> str:
    """`url` fit to print: user and password, and the values of token-like query parameters, become ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class UrlSource(FrameSource):
    """A video over the network, read by OpenCV's FFmpeg backend.

    It is a recorded file (finite, lossless by default; the end ends the run, or restarts it with
    `loop`) when the scheme is http(s) and OpenCV reports a frame count; otherwise (rtsp, rtmp, MJPEG
    over HTTP, ...) it is live: a thread reads it as fast as it comes and `read` returns the newest
    frame (a sender slower than the camera would otherwise fall further and further behind on
    buffered frames); a failed read is a drop, and the URL is reopened with backoff for up to
    `reopen_for` seconds (counted in `reopens`). The URL is shown only masked (`mask_url`).
    """

    kind = "url"

    def __init__(self, url: str, *, loop: bool = False, reopen_for: float = 60.0) -> None:
        _quiet_opencv()
        self.url = url
        self.shown = mask_url(url)
        self.loop = loop
        self.reopen_for = reopen_for
        self._wake = threading.Event()
        self._cap = self._open()
        if self._cap is None:
            raise SourceError(f"Failed to open video source {self.shown} (OpenCV could not open the URL: "
                              f"nothing answers there, or it is not a video)")
        self._count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.finite = urlsplit(url).scheme.lower() not in LIVE_SCHEMES and self._count > 0
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise SourceError(f"Failed to open video source {self.shown} (no decodable frames; an MP4 over "
                              f"HTTP needs a server that honours Range requests, or its index first: "
                              f"ffmpeg -movflags +faststart)")
        self._first: np.ndarray | None = first
        self._index = 0
        self._pass = 0
        # Live: the grabber thread's newest frame, its sequence number, and the last one handed out.
        self._cond = threading.Condition()
        self._latest: np.ndarray | None = None
        self._seq = self._delivered = 0
        self._ended = False
        self._grabber: threading.Thread | None = None
        if not self.finite:
            self._grabber = threading.Thread(target=self._grab, name="url-grabber", daemon=True)
            self._grabber.start()

    def _grab(self) -> None:
        while not self._wake.is_set():
            frame = self._read_one()
            if frame is None and not self._wake.is_set():
                frame = self._reopen_live()
            with self._cond:
                if frame is None:
                    self._ended = True
                    self._cond.notify_all()
                    return
                self._latest = frame
                self._seq += 1
                self._cond.notify_all()

    def _newest(self) -> np.ndarray | None:
        """The newest live frame not handed out yet, waiting for it; None once the source has ended."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq != self._delivered or self._ended or self._wake.is_set())
            if self._seq == self._delivered:
                return None
            self._delivered = self._seq
            return self._latest

    def _open(self) -> Any:
        cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, URL_OPEN_TIMEOUT_MS,
                                                          cv2.CAP_PROP_READ_TIMEOUT_MSEC, URL_READ_TIMEOUT_MS])
        if cap.isOpened():
            return cap
        cap.release()
        return None

    @property
    def total(self) -> int | None:
        return self._count if self.finite and not self.loop else None

    def read(self) -> SourceFrame | None:
        frame: np.ndarray | None
        if self._first is not None:
            frame, self._first = self._first, None
        elif not self.finite:
            frame = self._newest()
            if frame is None:
                return None
        else:
            frame = self._read_one()
            if frame is None:
                if not self.loop or self._index == 0:
                    return None
                frame = self._reopen_file()
                if frame is None:
                    return None
        meta: dict[str, Any] = {"frame_index": self._index} if self.finite else {}
        if self.finite and self.loop:
            meta["pass"] = self._pass
        self._index += 1
        return SourceFrame(frame, meta)

    def _read_one(self) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        return frame if ok and frame is not None else None

    def _reopen_file(self) -> np.ndarray | None:
        # A fresh capture rather than a seek: an HTTP server need not support range requests.
        self._replace(self._open())
        frame = self._read_one()
        if frame is not None:
            self._index = 0
            self._pass += 1
        return frame

    def _reopen_live(self) -> np.ndarray | None:
        """Reopen a live source that dropped, with backoff, until a frame comes or `reopen_for` is spent."""
        lost_at = time.monotonic()
        deadline = lost_at + self.reopen_for
        delays = retry_delays()
        log.warning("live source %s dropped; reopening for up to %gs", self.shown, self.reopen_for)
        while not self._wake.is_set():
            self._replace(self._open())
            frame = self._read_one()
            if frame is not None:
                self.reopens += 1
                log.warning("live source reopened after %.1f s", time.monotonic() - lost_at)
                return frame
            delay = next(delays)
            if self.reopen_for <= 0 or time.monotonic() + delay >= deadline:
                self.failure = (f"live source {self.shown} dropped and could not be reopened within "
                                f"{self.reopen_for:g}s")
                return None
            self._wake.wait(delay)
        return None

    def _replace(self, cap: Any) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = cap

    def interrupt(self) -> None:
        self._wake.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self.interrupt()
        if self._grabber is not None:
            self._grabber.join(URL_READ_TIMEOUT_MS / 1000 + 1)  # a read in progress ends by its timeout
        self._replace(None)

    def describe(self) -> str:
        return f"{'video' if self.finite else 'live'} {self.shown}"


def _natural_key(path: Path) -> list[Any]:
    # img2.jpg before img10.jpg, as a person numbering files would expect.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: str | Path) -> list[Path]:
    """The folder's image files (not recursive), in natural name order; raises SourceError if none."""
    root = Path(folder)
    if not root.exists():
        raise SourceError(f"Image folder {folder} does not exist")
    if not root.is_dir():
        raise SourceError(f"Image folder {folder} is not a directory")
    files = sorted(
        (p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=_natural_key
    )
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTS))
        raise SourceError(f"Image folder {folder} contains no images (looked for {exts})")
    return files


def read_image(path: Path) -> np.ndarray | None:
    """Decode an image file to BGR, or None if it is not a readable image."""
    try:
        # np.fromfile + imdecode, unlike imread, copes with non-ASCII paths on Windows.
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


class FolderSource(FrameSource):
    """The images of a folder in name order; `meta` names the file each frame came from."""

    kind = "folder"
    finite = True

    def __init__(self, folder: str | Path, *, loop: bool = False) -> None:
        self.folder = Path(folder)
        self.loop = loop
        self.files = list_images(folder)
        self.skipped: list[str] = []
        self._pos = 0
        self._pass = 0

    @property
    def total(self) -> int | None:
        return None if self.loop else len(self.files)

    def read(self) -> SourceFrame | None:
        unreadable_in_a_row = 0
        while True:
            if self._pos >= len(self.files):
                if not self.loop:
                    return None
                self._pos = 0
                self._pass += 1
            path = self.files[self._pos]
            self._pos += 1
            image = read_image(path)
            if image is not None:
                meta: dict[str, Any] = {"source": path.name}
                if self.loop:
                    meta["pass"] = self._pass
                return SourceFrame(image, meta)
            if self._pass == 0:
                self.skipped.append(path.name)
            unreadable_in_a_row += 1
            if unreadable_in_a_row >= len(self.files):
                # Every file is unreadable; looping would spin forever.
                return None

    def describe(self) -> str:
        return f"folder {self.folder} ({len(self.files)} images)"


class SyntheticSource(FrameSource):
    """Random-noise frames of a fixed size, endless; useful for load and latency checks."""

    kind = "synthetic"
    finite = False

    def __init__(self, width: int = 640, height: int = 480, *, seed: int | None = None) -> None:
        if width <= 0 or height <= 0:
            raise SourceError(f"synthetic frame size must be positive, got {width}x{height}")
        self.width = width
        self.height = height
        self._rng = np.random.default_rng(seed)

    def read(self) -> SourceFrame:
        return SourceFrame(self._rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8))

    def describe(self) -> str:
        return f"synthetic {self.width}x{self.height}"


def open_source(spec: str, *, loop: bool = False, reopen_for: float = 60.0) -> FrameSource:
    """A source from one string: a camera index ("0"), a URL (http, https, rtsp, rtsps, rtmp; a live one is
    reopened for up to `reopen_for` seconds when it drops), an image folder, or a video file."""
    text = spec.strip()
    if text.isdigit():
        return WebcamSource(int(text))
    if is_url(text):
        return UrlSource(text, loop=loop, reopen_for=reopen_for)
    if Path(text).is_dir():
        return FolderSource(text, loop=loop)
    return VideoFileSource(text, loop=loop)


def encode_frame(
    image: np.ndarray, encoding: str = "jpeg", quality: int = 80
) -> tuple[bytes, str | None, tuple[int, int, int] | None]:
    """(payload, encoding field, shape field) for a frame message; JPEG leaves encoding to sniffing."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 BGR image, got shape {image.shape} {image.dtype}")
    if encoding == "raw":
        h, w, c = image.shape
        return np.ascontiguousarray(image).tobytes(), "raw", (h, w, c)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return buf.tobytes(), None, None
    raise ValueError(f"unknown encoding {encoding!r} (use jpeg or raw)")
