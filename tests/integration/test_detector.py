"""The detector on the real OpenVINO model, without sockets: numpy head decoding and camera shapes.

Everything OpenVINO runs on a lane thread, as in the server: compiling with
CPU_DENORMALS_OPTIMIZATION sets flush-to-zero on the compiling thread, and the test process's main
thread must keep IEEE subnormals (hypothesis refuses to run without them).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, asset, require
from visionstream.server.inference.api import DetectorSpec, InFlight
from visionstream.server.inference.backends.openvino import OpenVINODetector


def subnormals() -> bool:
    """This thread's floating point keeps values below 2.2e-308 (no flush-to-zero)."""
    return bool((np.array([1e-310]) * 1.0)[0] != 0)


class Lane:
    """A detector used from its own thread, like a server lane."""

    def __init__(self, pool: ThreadPoolExecutor, detector: OpenVINODetector) -> None:
        self.pool, self.detector = pool, detector
        self.spec, self.input_shapes = detector.spec, detector.input_shapes

    def detect(self, image: np.ndarray) -> list[dict]:
        return self.pool.submit(self.detector.detect, image).result()


@pytest.fixture(scope="module")
def lane_pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1, thread_name_prefix="lane") as pool:
        yield pool


@pytest.fixture(scope="module")
def detectors(lane_pool):
    require(COCO_MODEL)

    def build() -> tuple[OpenVINODetector, OpenVINODetector]:
        rect = OpenVINODetector(DetectorSpec(str(COCO_MODEL), imgsz=320, streams=2), InFlight())
        square = OpenVINODetector(DetectorSpec(str(COCO_MODEL), imgsz=320, streams=2, rect=False))
        return rect, square

    rect, square = lane_pool.submit(build).result()
    return Lane(lane_pool, rect), Lane(lane_pool, square)


def test_flush_to_zero_stays_on_the_lane_thread(detectors, lane_pool) -> None:
    assert subnormals()  # the main thread, after compiling and running on the lane
    assert not lane_pool.submit(subnormals).result()  # the lane itself runs with denormals flushed


def iou(a: list[float], b: list[float]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_camera_shapes_are_compiled_at_start(detectors) -> None:
    rect, square = detectors
    assert rect.input_shapes == [(320, 320), (256, 320), (192, 320)]  # square, 4:3, 16:9
    assert square.input_shapes == [(320, 320)]


def test_head_maps_decode_like_the_exported_graph(detectors) -> None:
    """A portrait photo pads to the square, where the cut model must match the export's own in-graph
    decode box for box."""
    rect, square = detectors
    image = cv2.imread(str(asset("bus.jpg")))  # 810x1080: no compiled portrait shape
    got, want = rect.detect(image), square.detect(image)
    assert [d["label"] for d in got] == [d["label"] for d in want]
    assert [d["label"] for d in got].count("person") >= 3
    for g, w in zip(got, want):
        assert g["conf"] == pytest.approx(w["conf"], abs=0.002)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=2.0)


def test_a_landscape_camera_runs_unpadded_and_finds_the_same_objects(detectors) -> None:
    rect, square = detectors
    image = cv2.imread(str(asset("zidane.jpg")))  # 1280x720 -> 192x320 instead of 320x320
    got, want = rect.detect(image), square.detect(image)
    assert [d["label"] for d in got] == [d["label"] for d in want] == ["person", "person"]
    for g, w in zip(got, want):
        assert iou(g["bbox"], w["bbox"]) > 0.85 and g["conf"] == pytest.approx(w["conf"], abs=0.05)
    assert all(rect.detect(image) == got for _ in range(3))  # the same image, the same answer


def test_no_shape_is_added_at_run_time(detectors) -> None:
    rect, _ = detectors
    for h in (64, 128, 240, 320, 448, 900):
        rect.detect(np.full((h, 640, 3), 90, np.uint8))
    assert len(rect.input_shapes) == 3


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_square_input_matches_ultralytics_predict_box_for_box(detectors, name: str) -> None:
    """Our own OpenVINO compile (flush-denormals, pixels in the graph, numpy head decode, cv2 NMS)
    against ultralytics' own `predict` on the same export: the same objects, scores and boxes."""
    from ultralytics import YOLO

    _, square = detectors
    image = cv2.imread(str(asset(name)))
    ref = square.pool.submit(lambda: YOLO(str(COCO_MODEL), task="detect").predict(
        image, imgsz=320, conf=square.spec.conf, iou=square.spec.iou, verbose=False)[0].boxes).result()
    got = square.detect(image)
    assert [d["cls"] for d in got] == ref.cls.int().tolist()
    assert [d["conf"] for d in got] == pytest.approx(ref.conf.tolist(), abs=0.002)
    for d, box in zip(got, ref.xyxy.tolist()):
        assert d["bbox"] == pytest.approx(box, abs=1.0)


def test_load_detector_picks_openvino_and_takes_inflight_apart_from_the_spec(lane_pool) -> None:
    require(COCO_MODEL)
    from visionstream.server.inference.api import load_detector

    spec = DetectorSpec("yolov8n", imgsz=320, streams=2)
    det = lane_pool.submit(load_detector, spec, str(COCO_MODEL), InFlight()).result()
    assert isinstance(det, OpenVINODetector)
    assert det.spec.model == str(COCO_MODEL) and not hasattr(det.spec, "inflight")
    assert det.input_shapes == [(320, 320), (256, 320), (192, 320)]
