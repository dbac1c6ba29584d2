"""What the server sees of inference: the `Detector` protocol, the spec it is built from, and `load_detector`.

A detection is a plain dict (`Detection`), the shape results carry on the wire:
`{"label": str, "cls": int, "conf": float (4 decimals), "bbox": [x1, y1, x2, y2]}`, the box in the
detected image's pixels (1 decimal). Backends live in `backends/`, one module each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

PLACEHOLDER = "placeholder"

Detection = dict[str, Any]  # {"label", "cls", "conf", "bbox"}: see the module's docstring


class Detector(Protocol):
    """What a worker needs: a name, class labels and one detect call (not thread-safe)."""

    model_name: str
    names: dict[int, str]

    def detect(self, image: np.ndarray) -> list[Detection]: ...


class InFlight:
    """Frames being worked on across all lanes, from decode to result (a thread-safe counter), plus
    whether more work is waiting or on its way (`busy`, asked of the server's scheduler).

    OpenVINO picks its compiled model by it: a frame alone in a server that is not overloaded gets
    every core (latency model); as soon as a second frame is anywhere, waiting or still decoding, or
    frames arrive faster than the lanes finish them, one core each. Counting only the inferences
    running at that instant is not enough under overload: a lane alone for a moment would take every
    core just as the next frame starts on another lane, and the two would fight over them.
    """

    def __init__(self, busy: Callable[[], bool] = lambda: False) -> None:
        self.count = 0
        self.busy = busy
        self._lock = threading.Lock()

    @property
    def alone(self) -> bool:
        """At most one frame in the server, the caller's own, and no more expected soon."""
        return self.count <= 1 and not self.busy()

    def __enter__(self) -> InFlight:
        with self._lock:
            self.count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.count -= 1


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to build one detector; each lane builds its own from it."""

    model: str
    device: str = "cpu"
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    threads: int = 0  # inference threads per stream (OpenVINO: threads x streams in all); 0: the runtime's
    # How many inferences run at once on the one OpenVINO compiled model all lanes share: its CPU
    # streams in throughput mode (the server passes --workers); 1 compiles the latency model only.
    streams: int = 1
    rect: bool = True  # pad to a stride multiple instead of the full square where the model allows it
    # OpenVINO pins its inference threads to cores, choosing them as if its process were the node's only
    # inference process. Several such processes on one node (Ray actors) each pin to the same first cores
    # and share them while the rest idle: they run unpinned.
    pin_threads: bool = True


def load_detector(spec: DetectorSpec, resolved: str | None, inflight: InFlight | None = None) -> Detector:
    """Build one detector for the weights at `resolved` (None: the placeholder), warmed up.

    Called once per lane, in that lane's thread. A static OpenVINO export on CPU gets the OpenVINO
    backend, anything else ultralytics'. `inflight` (the server's frames in lanes) tells the OpenVINO
    backend how busy the server is.
    """
    # Imported here: the backends import this module.
    from visionstream.server.inference.backends.openvino import OpenVINODetector, openvino_metadata
    from visionstream.server.inference.backends.placeholder import PlaceholderDetector
    from visionstream.server.inference.backends.ultralytics_torch import UltralyticsDetector

    if resolved is None:
        return PlaceholderDetector()
    spec = replace(spec, model=resolved)
    meta = openvino_metadata(spec)
    detector = OpenVINODetector(spec, inflight, meta) if meta is not None else UltralyticsDetector(spec)
    detector.warmup()
    return detector
