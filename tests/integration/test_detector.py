"""The detector on the real OpenVINO model, without sockets: numpy head decoding and camera shapes."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, asset, require
from visionstream.detector import DetectorSpec, InFlight, UltralyticsDetector


@pytest.fixture(scope="module")
def detectors():
    require(COCO_MODEL)
    spec = DetectorSpec(str(COCO_MODEL), imgsz=320, workers=2, inflight=InFlight())
    rect = UltralyticsDetector(spec)
    square = UltralyticsDetector(DetectorSpec(str(COCO_MODEL), imgsz=320, workers=2, rect=False))
    return rect, square


def test_head_maps_decode_like_the_exported_graph(detectors) -> None:
    """Until a camera shape is compiled, the cut model runs the square input: same detections as the
    export's own in-graph decode, box for box."""
    rect, square = detectors
    image = cv2.imread(str(asset("zidane.jpg")))
    got, want = rect.detect(image), square.detect(image)
    assert [d["label"] for d in got] == [d["label"] for d in want] == ["person", "person"]
    for g, w in zip(got, want):
        assert g["conf"] == pytest.approx(w["conf"], abs=0.002)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=2.0)


def test_a_camera_shape_gets_compiled_and_finds_the_same_objects(detectors) -> None:
    rect, square = detectors
    image = cv2.imread(str(asset("bus.jpg")))  # 810x1080: pads to 320x256 (h x w) instead of 320x320
    deadline = time.monotonic() + 60
    while (320, 256) not in rect.input_shapes:
        assert time.monotonic() < deadline, f"shape never compiled: {rect.input_shapes}"
        rect.detect(image)
        time.sleep(0.1)
    got = rect.detect(image)
    labels = [d["label"] for d in got]
    assert labels.count("bus") == 1 and labels.count("person") >= 3
    want = {d["label"]: d for d in square.detect(image)}
    bus = next(d for d in got if d["label"] == "bus")
    x1, y1, x2, y2 = bus["bbox"]
    wx1, wy1, wx2, wy2 = want["bus"]["bbox"]
    inter = max(0, min(x2, wx2) - max(x1, wx1)) * max(0, min(y2, wy2) - max(y1, wy1))
    union = (x2 - x1) * (y2 - y1) + (wx2 - wx1) * (wy2 - wy1) - inter
    assert inter / union > 0.95


def test_extra_shapes_are_capped(detectors) -> None:
    rect, _ = detectors
    for h in (64, 128, 192, 256, 320, 384, 448):
        for _ in range(4):
            rect.detect(np.full((h, 640, 3), 90, np.uint8))
    time.sleep(3)
    assert len(rect.input_shapes) <= 3  # the square plus at most two camera shapes
