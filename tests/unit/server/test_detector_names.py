"""`inference.detector` still offers the names server.py imports, and the spec keeps its field order."""

from __future__ import annotations

import dataclasses

import numpy as np

from visionstream.server.inference import api, detector, device, letterbox, models
from visionstream.server.inference.backends.placeholder import PlaceholderDetector


def test_the_old_module_re_exports_the_same_objects() -> None:
    homes = {"LETTERBOX_FILL": letterbox, "PLACEHOLDER": api, "Detector": api, "DetectorSpec": api,
             "InFlight": api, "load_detector": api, "letterbox": letterbox, "resolve_model": models,
             "check_device": device}
    assert sorted(detector.__all__) == sorted([*homes, "PlaceholderDetector"])
    for name, home in homes.items():
        assert getattr(detector, name) is getattr(home, name)
    assert detector.PlaceholderDetector is PlaceholderDetector


def test_the_spec_is_built_positionally_as_server_py_does() -> None:
    inflight = api.InFlight()
    spec = api.DetectorSpec("m", "cpu", 320, 0.3, 0.6, 100, 2, 3, False, inflight)
    assert [f.name for f in dataclasses.fields(spec)] == [
        "model", "device", "imgsz", "conf", "iou", "max_det", "threads", "streams", "rect", "inflight"]
    assert (spec.threads, spec.streams, spec.rect, spec.inflight) == (2, 3, False, inflight)
    assert spec == dataclasses.replace(spec, inflight=None)  # live state is no part of its value


def test_no_weights_load_the_placeholder() -> None:
    det = api.load_detector(api.DetectorSpec("missing.pt"), None)
    assert isinstance(det, PlaceholderDetector)
    assert det.detect(np.zeros((4, 4, 3), np.uint8))[0]["label"] == api.PLACEHOLDER
