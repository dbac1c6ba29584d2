"""Frame sources for the clients (webcam, video file, image folder, synthetic) and frame encoding."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# FFmpeg prints its own diagnostics (e.g. "moov atom not found") straight to stderr, which would bury the
# one-line error the user should see; it must be set before OpenCV first opens a file. Users may override.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2
import numpy as np

from visionstream.wire.errors import SourceError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
CAMERA_HINT = "try --source 1 if you have more than one camera"


@dataclass(slots=True)
class SourceFrame:
    """One BGR frame plus what the results file should say about where it came from."""

    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


class FrameSource(ABC):
    """A blocking frame iterator; `read` returns None once the source is exhausted."""

    kind: str = "source"
    finite: bool = False

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


def open_source(spec: str, *, loop: bool = False) -> FrameSource:
    """A source from one string: a camera index ("0"), an image folder, or a video file."""
    text = spec.strip()
    if text.isdigit():
        return WebcamSource(int(text))
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
