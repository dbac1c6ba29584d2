"""client.py --save-annotated: each sent frame drawn with its own detections, as images or one video."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from visionstream.client.sources import SourceFrame
from visionstream.client.streamer import Pending
from visionstream.client.visualize import TrackTrails, Viewer, draw_detections, mark_unanswered
from visionstream.wire.errors import DisplayError

log = logging.getLogger("visionstream.client")

# Sent frames waiting for their answer. Past this the oldest is written as "no result" so memory stays
# bounded even when the server never answers (about 60 MB of 640x480 frames).
MAX_WAITING: Final = 64


def make_folder(folder: str | Path) -> Path:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DisplayError(f"--save-annotated {folder}: cannot create the folder ({exc.strerror or exc})") \
            from None
    return path


class AnnotatedSink:
    """Keeps each sent frame until its reply and then writes it drawn; Streamer's on_sent / on_reply hooks.

    A frame the server dropped, or that got no answer, is still written, undrawn, with a red "no result:
    <reason>" line, so a video keeps one output frame per sent frame and an image folder one file per image.
    """

    def __init__(self, capacity: int = MAX_WAITING) -> None:
        self.capacity = capacity
        self.written = 0
        self.unanswered = 0  # written with the "no result" mark
        self.error: DisplayError | None = None
        self.trails = TrackTrails()  # frames are drawn in sending order, so trails follow the video
        # frame_id -> [frame, reply or None]; in sending order, which is also the order they are written.
        self._waiting: OrderedDict[int, list[Any]] = OrderedDict()

    def on_sent(self, frame_id: int, frame: SourceFrame) -> None:
        self._waiting[frame_id] = [frame, None]
        while len(self._waiting) > self.capacity:
            _, (old, _reply) = self._waiting.popitem(last=False)
            self._emit(old, None)
            self._flush()

    def on_reply(self, msg: dict[str, Any], pending: Pending | None, e2e_ms: float | None) -> None:
        entry = self._waiting.get(msg.get("frame_id", -1))
        if entry is None:  # already written as unanswered (the buffer was full)
            return
        entry[1] = msg
        self._flush()

    def _flush(self) -> None:
        # Write answered frames from the front, so a video's frames stay in order whatever order replies take.
        while self._waiting:
            frame_id, (frame, reply) = next(iter(self._waiting.items()))
            if reply is None:
                return
            del self._waiting[frame_id]
            self._emit(frame, reply)

    def _emit(self, frame: SourceFrame, reply: dict[str, Any] | None) -> None:
        if self.error is not None:
            return
        if reply is not None and reply.get("type") == "result":
            image = draw_detections(frame.image, reply.get("detections") or [], self.trails)
        else:
            reason = "not answered in time" if reply is None else str(reply.get("reason") or reply.get("type"))
            image = mark_unanswered(frame.image, reason)
            self.unanswered += 1
        try:
            self.write(frame, image)
        except DisplayError as exc:  # reported once by close(); the stream itself goes on
            self.error = exc
            log.error("%s", exc)
            return
        self.written += 1

    def write(self, frame: SourceFrame, image: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what is still waiting (marked "no result") and finish the output."""
        while self._waiting:
            _, (frame, reply) = self._waiting.popitem(last=False)
            self._emit(frame, reply)

    def describe(self) -> str:
        raise NotImplementedError


class AnnotatedImages(AnnotatedSink):
    """Folder mode: one annotated image per input image, under the same file name, in `folder`."""

    def __init__(self, folder: str | Path, capacity: int = MAX_WAITING) -> None:
        super().__init__(capacity)
        self.folder = make_folder(folder)

    def write(self, frame: SourceFrame, image: np.ndarray) -> None:
        name = Path(str(frame.meta.get("source", f"frame_{self.written:06d}.jpg"))).name
        path = self.folder / name
        ok, buf = cv2.imencode(path.suffix or ".jpg", image)
        if not ok:
            raise DisplayError(f"cannot encode {path} as {path.suffix or '.jpg'}")
        try:
            buf.tofile(str(path))  # tofile, unlike imwrite, copes with non-ASCII paths on Windows
        except OSError as exc:
            raise DisplayError(f"cannot write {path}: {exc.strerror or exc}") from None

    def describe(self) -> str:
        return f"{self.written} image(s) in {self.folder}"


class AnnotatedVideo(AnnotatedSink):
    """Video, webcam and synthetic sources: one mp4v video `<folder>/<stream>.mp4` at the source's fps."""

    def __init__(self, folder: str | Path, stream: str, fps: float, capacity: int = MAX_WAITING) -> None:
        super().__init__(capacity)
        self.path = make_folder(folder) / f"{stream}.mp4"
        # The visualizer's writer: the same codec choice and even-size fix.
        self._viewer = Viewer(window=None, save=self.path, fps=fps)

    def write(self, frame: SourceFrame, image: np.ndarray) -> None:
        self._viewer.show(image)

    def close(self) -> None:
        super().close()
        self._viewer.close()

    def describe(self) -> str:
        return f"{self.written} frame(s) in {self.path}"
