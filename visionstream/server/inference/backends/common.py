"""What the model backends share: the ultralytics runtime, and a YOLO detect around their raw outputs
(letterbox in; NMS and boxes in the image's pixels out)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from visionstream.server.inference.api import Detection, DetectorSpec
from visionstream.server.inference.letterbox import LETTERBOX_FILL, letterbox
from visionstream.server.inference.yolohead import nms
from visionstream.wire.errors import ModelLoadError

log = logging.getLogger("visionstream.detector")

_WARNED: dict[str, bool] = {}  # models whose fixed input was said to win over --imgsz


class Ultralytics(NamedTuple):
    torch: Any
    YOLO: Any
    AutoBackend: Any
    non_max_suppression: Any
    select_device: Any


def import_ultralytics(threads: int) -> Ultralytics:
    """torch and the ultralytics parts the backends use (ModelLoadError when absent); sets torch's threads.

    The OpenVINO backend needs neither, but calls this too so that every backend runs under the same
    process settings: importing ultralytics also turns OpenCV's own threading off, and decode,
    letterbox and NMS run under that.
    """
    try:
        import torch
        from ultralytics import YOLO
        from ultralytics.nn.autobackend import AutoBackend
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.torch_utils import select_device
    except ImportError as exc:
        raise ModelLoadError(f"ultralytics is not installed ({exc})") from exc
    if threads:
        torch.set_num_threads(threads)
    return Ultralytics(torch, YOLO, AutoBackend, non_max_suppression, select_device)


class LetterboxDetector:
    """A YOLO detector around a backend's raw outputs: letterbox, `_candidates`, NMS, boxes scaled back.

    A backend sets `spec`, `model_name`, `names`, `stride`, `imgsz` (h, w) and `auto` (pad only to the
    stride) and implements `_candidates`.
    """

    spec: DetectorSpec
    model_name: str
    names: dict[int, str]
    stride: int
    imgsz: tuple[int, int]
    auto: bool

    def _fixed_input(self, imgsz: Any) -> tuple[int, int]:
        """An export's fixed (h, w) input, which wins over --imgsz (said once, not per lane)."""
        fixed = tuple(int(v) for v in (imgsz if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)))
        if fixed != (self.spec.imgsz, self.spec.imgsz) and not _WARNED.get(self.spec.model):
            _WARNED[self.spec.model] = True
            log.warning("model %s has a fixed input of %s; using it instead of --imgsz %d",
                        self.model_name, fixed, self.spec.imgsz)
        return fixed  # type: ignore[return-value]

    @property
    def input_shapes(self) -> list[tuple[int, int]]:
        """The (h, w) inputs inference runs at."""
        return [tuple(self.imgsz)]  # type: ignore[list-item]

    def _pad_to_stride(self, image: np.ndarray) -> bool:
        """Whether this image pads only to the stride (`auto`) rather than to the full input."""
        return self.auto

    def _candidates(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Letterboxed BGR pixels -> (xyxy boxes in their pixels, scores, classes, already NMS'd?)."""
        raise NotImplementedError

    def detect(self, image: np.ndarray) -> list[Detection]:
        padded, gain, (padx, pady) = letterbox(image, self.imgsz, self._pad_to_stride(image), self.stride)
        boxes, scores, classes, final = self._candidates(padded)
        if not final:
            keep = nms(boxes, scores, classes, self.spec.iou, self.spec.max_det)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if not len(scores):
            return []
        h, w = image.shape[:2]
        boxes = boxes.astype(np.float64)
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - padx) / gain).clip(0, w)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pady) / gain).clip(0, h)
        names = self.names
        return [
            {"label": names.get(int(c), str(int(c))), "cls": int(c), "conf": round(float(s), 4),
             "bbox": [round(float(v), 1) for v in b]}
            for b, s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())
        ]

    def warmup(self, runs: int = 2) -> None:
        dummy = np.full((self.imgsz[0], self.imgsz[1], 3), LETTERBOX_FILL, dtype=np.uint8)
        for _ in range(runs):
            self.detect(dummy)
