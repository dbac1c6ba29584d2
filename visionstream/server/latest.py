"""The newest processed frame of each stream, for the dashboard: the bytes as sent, one frame per stream."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from visionstream.server.stats import RECENT_STREAMS, StreamStats
from visionstream.wire.protocol import Frame

JPEG_MAGIC: Final = b"\xff\xd8\xff"
# A stream that left keeps its tile (greyed out) and its frame this long, then both go.
GONE_AFTER_S: Final = 30.0
PRUNE_EVERY_S: Final = 1.0  # record() looks for streams past GONE_AFTER_S at most this often
JPEG_QUALITY: Final = 85  # raw and PNG frames, encoded once for the page


@dataclass(eq=False, slots=True)
class Latest:
    """One stream's newest result: a reference to its frame (not a copy) and what was found on it."""

    frame: Frame
    stats: StreamStats  # its connection's counters: `connected` turns false when it leaves
    detections: list[dict[str, Any]]
    image_size: tuple[int, int]  # (w, h) of the sent image
    at: float  # store clock when it was recorded
    gone_at: float | None = None  # store clock when the store first saw its stream disconnected
    jpeg: bytes | None = None  # the frame as JPEG: the sent bytes, or encoded on the first request
    encoding: asyncio.Task[bytes] | None = field(default=None, repr=False)

    @property
    def is_jpeg(self) -> bool:
        return self.frame.encoding in (None, "jpeg") and self.frame.image.startswith(JPEG_MAGIC)


def encode_jpeg(frame: Frame) -> bytes:
    """A raw (BGR) or PNG frame as JPEG: off the event loop, once per frame (`LatestFrames.jpeg`)."""
    import cv2
    import numpy as np

    image: np.ndarray | None
    if frame.encoding == "raw":
        assert frame.shape is not None  # the protocol checked it, and the lane decoded it
        image = np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape)
    else:
        image = cv2.imdecode(np.frombuffer(frame.image, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:  # it decoded in the lane; a failure here is a bug, not the client's
            raise ValueError("frame could not be decoded again")
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


class LatestFrames:
    """Event loop only. `record` is on the hot path: it keeps references and never copies or encodes.

    Memory: one frame per live stream name, plus frames of streams that left within GONE_AFTER_S (at
    most RECENT_STREAMS of those), each at most --max-frame-bytes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._frames: dict[str, Latest] = {}
        self._next_prune = 0.0
        self._encoder = asyncio.Semaphore(1)  # page viewers get one core at most for encoding, never both

    def __len__(self) -> int:
        return len(self._frames)

    def record(self, frame: Frame, stats: StreamStats, detections: list[dict[str, Any]],
               image_size: tuple[int, int]) -> None:
        now = self.clock()
        self._frames[frame.stream_name] = Latest(frame, stats, detections, image_size, now)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            self.prune(now)

    def get(self, name: str) -> Latest | None:
        self.prune()
        return self._frames.get(name)

    def entries(self) -> dict[str, Latest]:
        self.prune()
        return dict(self._frames)

    def prune(self, now: float | None = None) -> None:
        """Forget streams that left more than GONE_AFTER_S ago, and the oldest gone beyond RECENT_STREAMS."""
        now = self.clock() if now is None else now
        gone: OrderedDict[str, float] = OrderedDict()
        for name, entry in self._frames.items():
            if entry.stats.connected:
                continue
            if entry.gone_at is None:
                entry.gone_at = now
            gone[name] = entry.gone_at
        for name, at in sorted(gone.items(), key=lambda kv: kv[1]):
            if now - at > GONE_AFTER_S or len(gone) > RECENT_STREAMS:
                del self._frames[name]
                del gone[name]

    async def jpeg(self, entry: Latest) -> bytes:
        """The entry's frame as JPEG: the bytes the client sent when they are a JPEG, else encoded once
        (concurrent requests for the same frame share one encoding)."""
        if entry.jpeg is not None:
            return entry.jpeg
        if entry.is_jpeg:
            entry.jpeg = entry.frame.image
            return entry.jpeg
        if entry.encoding is None:
            entry.encoding = asyncio.create_task(self._encode(entry))
        return await asyncio.shield(entry.encoding)  # a viewer that leaves does not cancel the others' copy

    async def _encode(self, entry: Latest) -> bytes:
        async with self._encoder:
            data = await asyncio.to_thread(encode_jpeg, entry.frame)
        entry.jpeg = data
        return data
