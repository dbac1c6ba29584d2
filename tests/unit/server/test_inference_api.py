"""The inference API in isolation: the spec is plain values, and no weights give the placeholder."""

from __future__ import annotations

import dataclasses

import numpy as np

from visionstream.server.inference import api
from visionstream.server.inference.backends.placeholder import PlaceholderDetector


def test_the_spec_is_plain_values_and_carries_no_live_state() -> None:
    spec = api.DetectorSpec("m", "cpu", 320, 0.3, 0.6, 100, threads=2, streams=3, rect=False, pin_threads=False)
    assert [f.name for f in dataclasses.fields(spec)] == [
        "model", "device", "imgsz", "conf", "iou", "max_det", "threads", "streams", "rect", "pin_threads"]
    assert (spec.threads, spec.streams, spec.rect, spec.pin_threads) == (2, 3, False, False)
    assert api.DetectorSpec("m").pin_threads  # one process per node (threads lanes): OpenVINO pins as it likes
    assert spec == dataclasses.replace(spec)


def test_no_weights_load_the_placeholder() -> None:
    det = api.load_detector(api.DetectorSpec("missing.pt"), None)
    assert isinstance(det, PlaceholderDetector)
    assert det.detect(np.zeros((4, 4, 3), np.uint8))[0]["label"] == api.PLACEHOLDER
