"""YOLOv8 head decoding and NMS in numpy, against hand-built head outputs."""

from __future__ import annotations

import numpy as np
import pytest

from visionstream.server.inference.yolohead import REG_MAX, decode_maps, decode_preds, nms

NC = 3


def head_maps(hw: tuple[int, int]) -> list[np.ndarray]:
    """Empty head maps (every class logit very negative) for an input of hw, strides 8/16/32."""
    maps = []
    for stride in (8, 16, 32):
        m = np.zeros((1, 4 * REG_MAX + NC, hw[0] // stride, hw[1] // stride), np.float32)
        m[0, 4 * REG_MAX:] = -20.0
        maps.append(m)
    return maps


def put(maps: list[np.ndarray], level: int, y: int, x: int, cls: int, logit: float, ltrb: tuple[int, ...]) -> None:
    """One anchor with a class score and a DFL distribution peaked on whole-bin distances."""
    m = maps[level]
    m[0, 4 * REG_MAX + cls, y, x] = logit
    for side, d in enumerate(ltrb):
        m[0, side * REG_MAX:(side + 1) * REG_MAX, y, x] = -30.0
        m[0, side * REG_MAX + d, y, x] = 30.0


def test_one_anchor_decodes_to_its_box_in_input_pixels() -> None:
    maps = head_maps((256, 320))
    put(maps, level=1, y=3, x=5, cls=2, logit=2.0, ltrb=(1, 2, 3, 4))  # stride 16, centre (5.5, 3.5) cells
    boxes, scores, classes = decode_maps(maps, (256, 320), NC, conf=0.25)
    assert classes.tolist() == [2]
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5)
    assert boxes[0] == pytest.approx([(5.5 - 1) * 16, (3.5 - 2) * 16, (5.5 + 3) * 16, (3.5 + 4) * 16], abs=1e-3)


def test_dfl_takes_the_expectation_over_bins() -> None:
    maps = head_maps((64, 64))
    put(maps, level=0, y=0, x=0, cls=0, logit=3.0, ltrb=(0, 0, 0, 0))
    m = maps[0]
    m[0, 0:REG_MAX, 0, 0] = -30.0
    m[0, [2, 4], 0, 0] = 0.0  # left side: equal mass on bins 2 and 4 -> distance 3 cells
    boxes, _, _ = decode_maps(maps, (64, 64), NC, conf=0.25)
    assert boxes[0][0] == pytest.approx((0.5 - 3) * 8, abs=1e-3)


def test_confidence_filter_is_strict_and_uses_the_best_class() -> None:
    maps = head_maps((64, 64))
    put(maps, level=0, y=1, x=1, cls=1, logit=0.0, ltrb=(1, 1, 1, 1))  # sigmoid 0.5
    assert decode_maps(maps, (64, 64), NC, conf=0.5)[1].size == 0
    assert decode_maps(maps, (64, 64), NC, conf=0.49)[2].tolist() == [1]


def test_maps_with_the_wrong_channel_count_are_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        decode_maps([np.zeros((1, 10, 8, 8), np.float32)], (64, 64), NC, conf=0.25)


def test_full_output_decodes_xywh_and_class_probabilities() -> None:
    preds = np.zeros((4 + NC, 5), np.float32)
    preds[:, 2] = [50, 40, 20, 10, 0.1, 0.9, 0.3]
    preds[:, 4] = [10, 10, 4, 4, 0.2, 0.1, 0.2]  # below conf
    boxes, scores, classes = decode_preds(preds, conf=0.25)
    assert boxes.tolist() == [[40, 35, 60, 45]] and classes.tolist() == [1]
    assert scores[0] == pytest.approx(0.9)


def test_nms_is_class_aware_sorted_and_capped() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, classes, iou=0.5, max_det=300).tolist() == [3, 0, 2]  # 1 overlaps 0 (same class)
    assert nms(boxes, scores, classes, iou=0.5, max_det=2).tolist() == [3, 0]
    assert nms(boxes, scores, classes, iou=0.95, max_det=300).tolist() == [3, 0, 1, 2]  # IoU 0.81 < 0.95
    assert nms(boxes[:0], scores[:0], classes[:0], iou=0.5, max_det=300).size == 0
