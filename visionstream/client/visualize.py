"""Drawing detections on the frames they belong to, and showing or saving the annotated video."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


def draw_detections(image: np.ndarray, detections: list[dict[str, Any]]) -> np.ndarray:
    """A copy of `image` with each detection's box and "label conf" tag drawn on it."""
    out = image.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 320))
    scale = max(0.4, min(h, w) / 900)
    for det in detections:
        bbox = det.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in bbox)
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        color = class_color(det.get("cls"))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick + 1)
        conf = det.get("conf")
        text = str(det.get("label", det.get("cls", "?")))
        if isinstance(conf, (int, float)):
            text += f" {conf:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        # Tag above the box, or inside it when the box touches the top edge.
        ty = y1 - 4 if y1 - th - base - 4 >= 0 else y1 + th + 4
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 4, ty + base), color, -1)
        cv2.putText(out, text, (x1 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return out


def draw_overlay(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """Writes status lines (fps, latency) in a dark box at the top-left corner, in place."""
    scale = max(0.45, min(image.shape[:2]) / 900)
    thick = 1
    sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0] for t in lines]
    if not sizes:
        return image
    line_h = max(h for _, h in sizes) + 8
    box_w = max(w for w, _ in sizes) + 12
    box_h = line_h * len(lines) + 6
    roi = image[0:box_h, 0:box_w]
    # Darken rather than paint over, so the picture under the text stays visible.
    roi[:] = (roi * 0.35).astype(image.dtype)
    for i, text in enumerate(lines):
        y = 4 + line_h * (i + 1) - 6
        cv2.putText(image, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return image


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
                cv2.namedWindow(window, cv2.WINDOW_NORMAL)
            except cv2.error as exc:
                raise DisplayError(f"cannot open a window ({exc.msg.strip() or exc}); run with --headless") \
                    from None
        if self.save is not None and self.save.parent and not self.save.parent.exists():
            raise DisplayError(f"cannot write {self.save}: folder {self.save.parent} does not exist")

    def show(self, image: np.ndarray) -> None:
        if self.save is not None:
            self._write(image)
        if self.window is not None:
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
