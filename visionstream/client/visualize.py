"""Drawing detections on the frames they belong to, and showing or saving the annotated video."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from visionstream.measure import RateWindow
from visionstream.wire.errors import DisplayError

log = logging.getLogger("visionstream.visualizer")


def class_color(cls: Any) -> tuple[int, int, int]:
    """A stable, well-saturated BGR colour per class id, so a class keeps its colour across frames."""
    try:
        idx = int(cls)
    except (TypeError, ValueError):
        idx = abs(hash(str(cls)))
    hue = (idx * 47) % 180  # spread neighbouring ids around the hue circle
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


LINE_PER_PIXEL: Final = 0.003  # box width per pixel of mean frame side (2 px at 640x480, 4-5 at 1080p)
MIN_LINE: Final = 2
MIN_FONT_SCALE: Final = 0.5  # below this Hershey glyphs blur into each other
FONT: Final = cv2.FONT_HERSHEY_SIMPLEX
OVERLAY_FONT: Final = 0.9  # status lines a little smaller than the labels they sit beside


@dataclass(frozen=True, slots=True)
class OverlayStyle:
    """Line width, font scale and padding for one frame size, so labels read the same at any resolution."""

    line: int  # box outline width, px
    font_scale: float
    text: int  # glyph stroke width, px
    pad: int  # space around label text, px

    @classmethod
    def for_frame(cls, shape: tuple[int, ...]) -> OverlayStyle:
        # The convention ultralytics' own plots use: everything grows with the mean of width and height,
        # so a 640x480 label is as readable as a 1920x1080 one when each is shown at its own size.
        unit = (shape[0] + shape[1]) / 2 * LINE_PER_PIXEL
        line = max(MIN_LINE, round(unit))
        return cls(line=line, font_scale=max(MIN_FONT_SCALE, unit / 2.5), text=max(1, round(unit / 1.5)),
                   pad=max(2, round(unit * 1.5)))


TRAIL_POINTS: Final = 20  # box centres kept per track id: about two seconds at 10 fps
TRAIL_FORGET: Final = 30  # a track id unseen in this many drawn frames loses its trail


def track_id(det: dict[str, Any]) -> int | None:
    """The detection's track id when the server tracks (`--track`), else None (also while unconfirmed)."""
    tid = det.get("track_id")
    return tid if isinstance(tid, int) and not isinstance(tid, bool) else None


class TrackTrails:
    """The last TRAIL_POINTS box centres of each track id, fed one frame's detections at a time, in order."""

    def __init__(self, points: int = TRAIL_POINTS, forget: int = TRAIL_FORGET) -> None:
        self.points = points
        self.forget = forget
        self._trails: dict[int, deque[tuple[int, int]]] = {}
        self._seen: dict[int, int] = {}  # track id -> the frame count when it was last seen
        self._frames = 0

    def update(self, detections: list[dict[str, Any]]) -> None:
        self._frames += 1
        for det in detections:
            tid, bbox = track_id(det), det.get("bbox")
            if tid is None or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                continue
            x1, y1, x2, y2 = (float(v) for v in bbox)
            self._trails.setdefault(tid, deque(maxlen=self.points)).append((round((x1 + x2) / 2),
                                                                             round((y1 + y2) / 2)))
            self._seen[tid] = self._frames
        for tid in [t for t, last in self._seen.items() if self._frames - last > self.forget]:
            del self._seen[tid], self._trails[tid]

    def trail(self, tid: int) -> list[tuple[int, int]]:
        return list(self._trails.get(tid, ()))

    def __len__(self) -> int:
        return len(self._trails)


def draw_detections(image: np.ndarray, detections: list[dict[str, Any]], trails: TrackTrails | None = None
                    ) -> np.ndarray:
    """A copy of `image` with each detection's box and "label #id conf" tag drawn on it, scaled to its size;
    with `trails` (updated with these detections first), each tracked object's recent path as a line."""
    out = image.copy()
    h, w = out.shape[:2]
    st = OverlayStyle.for_frame(out.shape)
    if trails is not None:
        trails.update(detections)
        for det in detections:
            tid = track_id(det)
            points = trails.trail(tid) if tid is not None else []
            if len(points) >= 2:
                cv2.polylines(out, [np.array(points, dtype=np.int32)], False, class_color(det.get("cls")),
                              st.line, cv2.LINE_AA)
    for det in detections:
        bbox = det.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in bbox)
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        color = class_color(det.get("cls"))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, st.line, cv2.LINE_AA)
        conf = det.get("conf")
        text = str(det.get("label", det.get("cls", "?")))
        tid = track_id(det)
        if tid is not None:
            text += f" #{tid}"
        if isinstance(conf, (int, float)):
            text += f" {conf:.2f}"
        (tw, th), base = cv2.getTextSize(text, FONT, st.font_scale, st.text)
        tag_h = th + base + 2 * st.pad
        # Tag above the box, or inside it when the box touches the top edge.
        top = y1 - tag_h if y1 - tag_h >= 0 else y1
        cv2.rectangle(out, (x1, top), (x1 + tw + 2 * st.pad, top + tag_h), color, -1)
        cv2.putText(out, text, (x1 + st.pad, top + st.pad + th), FONT, st.font_scale, (0, 0, 0), st.text,
                    cv2.LINE_AA)
    return out


def draw_overlay(image: np.ndarray, lines: list[str], *, color: tuple[int, int, int] = (255, 255, 255)
                 ) -> np.ndarray:
    """Writes status lines (fps, latency) in a dark box at the top-left corner, in place, scaled to the frame."""
    st = OverlayStyle.for_frame(image.shape)
    scale = st.font_scale * OVERLAY_FONT
    sizes = [cv2.getTextSize(t, FONT, scale, st.text)[0] for t in lines]
    if not sizes:
        return image
    line_h = max(h for _, h in sizes) + 2 * st.pad
    box_w = max(w for w, _ in sizes) + 4 * st.pad
    box_h = line_h * len(lines) + 2 * st.pad
    roi = image[0:box_h, 0:box_w]
    # Darken rather than paint over, so the picture under the text stays visible.
    roi[:] = (roi * 0.35).astype(image.dtype)
    for i, text in enumerate(lines):
        y = st.pad + line_h * (i + 1) - st.pad
        cv2.putText(image, text, (2 * st.pad, y), FONT, scale, color, st.text, cv2.LINE_AA)
    return image


def mark_unanswered(image: np.ndarray, reason: str) -> np.ndarray:
    """A copy of a frame that got no result, with a red "no result: <reason>" line, for annotated output."""
    return draw_overlay(image.copy(), [f"no result: {reason}"], color=(60, 60, 255))


class FrameBuffer:
    """The last `capacity` sent frames by frame_id, so each result is drawn on its own frame."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._frames: OrderedDict[int, np.ndarray] = OrderedDict()
        self.evicted = 0

    def put(self, frame_id: int, image: np.ndarray) -> None:
        self._frames[frame_id] = image
        while len(self._frames) > self.capacity:
            self._frames.popitem(last=False)
            self.evicted += 1

    def pop(self, frame_id: int) -> np.ndarray | None:
        return self._frames.pop(frame_id, None)

    def __len__(self) -> int:
        return len(self._frames)


class RateMeter:
    """Events per second over a sliding window (the fps shown in the overlay), on its own clock."""

    def __init__(self, window: float = 2.0, clock: Any = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._times = RateWindow(window)

    def tick(self) -> None:
        self._times.add(self.clock())

    def rate(self) -> float:
        return self._times.tick_rate(self.clock())


def display_available() -> bool:
    """False on a Linux/BSD box without X11 or Wayland, where imshow would abort the process."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def quiet_qt_environment(env: dict[str, str]) -> dict[str, str]:
    """Settings for OpenCV's Qt window that silence its start-up warnings; for the CLI to apply before the
    first window (Qt reads them once).

    OpenCV's wheel points Qt at a fonts folder it does not ship, and Qt warns "QFontDatabase: Cannot find
    font directory" for every font lookup. Any TrueType folder will do: matplotlib (a dependency) ships
    DejaVu fonts. A value the user set is kept.
    """
    out: dict[str, str] = {}
    if "QT_QPA_FONTDIR" not in env:
        fonts = bundled_font_dir()
        if fonts is not None:
            out["QT_QPA_FONTDIR"] = str(fonts)
    if "QT_LOGGING_RULES" not in env:
        out["QT_LOGGING_RULES"] = "qt.qpa.*=false"  # platform-plugin chatter (fonts, xcb, wayland)
    return out


def bundled_font_dir() -> Path | None:
    """matplotlib's DejaVu TrueType folder, found without importing matplotlib, or a system font folder."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    candidates = [Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"] if spec and spec.origin else []
    candidates += [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts")]
    return next((p for p in candidates if p.is_dir()), None)


def fourcc_for(path: Path) -> str:
    # mp4v is what OpenCV's bundled FFmpeg always writes for .mp4; MJPG is the safe choice for .avi.
    return "MJPG" if path.suffix.lower() == ".avi" else "mp4v"


class Viewer:
    """Shows annotated frames in a window and/or writes them to a video file."""

    def __init__(self, *, window: str | None, save: str | Path | None, fps: float) -> None:
        self.window = window
        self.save = Path(save) if save else None
        self.fps = fps
        self.frames_written = 0
        self.frames_shown = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        if window is not None:
            if not display_available():
                raise DisplayError("no display available (DISPLAY is not set); run with --headless")
            try:
                # NORMAL: the user may resize; KEEPRATIO: without stretching; GUI_NORMAL: no toolbar eating
                # into the picture. Sized to the first frame in show(): a bare NORMAL window opens at 320x240.
                cv2.namedWindow(window, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
            except cv2.error as exc:
                raise DisplayError(f"cannot open a window ({exc.msg.strip() or exc}); run with --headless") \
                    from None
        if self.save is not None and self.save.parent and not self.save.parent.exists():
            raise DisplayError(f"cannot write {self.save}: folder {self.save.parent} does not exist")

    def show(self, image: np.ndarray) -> None:
        if self.save is not None:
            self._write(image)
        if self.window is not None:
            if self.frames_shown == 0:
                cv2.resizeWindow(self.window, image.shape[1], image.shape[0])
            cv2.imshow(self.window, image)
            self.frames_shown += 1

    def _write(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        if self._writer is None:
            assert self.save is not None
            # Odd sizes trip some encoders; the first frame fixes the video size.
            self._size = (w - w % 2, h - h % 2)
            writer = cv2.VideoWriter(str(self.save), cv2.VideoWriter.fourcc(*fourcc_for(self.save)),
                                     self.fps, self._size)
            if not writer.isOpened():
                raise DisplayError(f"cannot write video {self.save} (fourcc {fourcc_for(self.save)})")
            self._writer = writer
        assert self._size is not None
        if (w, h) != self._size:  # image folders mix sizes; a video needs one
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames_written += 1

    def poll_quit(self) -> bool:
        """Pump the window's events; True when the user pressed q/Esc or closed the window."""
        if self.window is None:
            return False
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            return True
        try:
            return self.frames_shown > 0 and cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1
        except cv2.error:
            return True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self.window is not None:
            try:
                cv2.destroyWindow(self.window)
                cv2.waitKey(1)
            except cv2.error:
                pass
