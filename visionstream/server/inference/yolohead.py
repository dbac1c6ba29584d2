"""YOLOv8 detect-head decoding and NMS in numpy: raw outputs in, (boxes, scores, classes) out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

REG_MAX = 16  # YOLOv8's DFL bins per box side
MAX_NMS = 30000  # most candidates NMS looks at, highest scores first (as ultralytics)

_BINS = np.arange(REG_MAX, dtype=np.float32).reshape(1, REG_MAX, 1)


def _logit(p: float) -> float:
    """The raw class score whose sigmoid is p: thresholding logits skips a sigmoid per anchor and class."""
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)


def decode_maps(maps: Sequence[np.ndarray], input_hw: tuple[int, int], nc: int, conf: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates from the per-scale head maps, each (1, 4*REG_MAX + nc, h, w) of raw values.

    Equivalent to ultralytics' Detect head (DFL softmax expectation, anchor centres at cell + 0.5,
    sigmoid scores) followed by its confidence filter, but only the anchors that pass the filter are
    decoded. Returns xyxy boxes in input pixels, scores and class ids.
    """
    thr = _logit(conf)
    boxes, scores, classes = [], [], []
    for m in maps:
        _, c, h, w = m.shape
        if c != 4 * REG_MAX + nc:
            raise ValueError(f"head map has {c} channels, expected {4 * REG_MAX + nc}")
        stride = input_hw[0] / h
        flat = m.reshape(c, h * w)
        logits = flat[4 * REG_MAX:]
        best = logits.max(axis=0)
        idx = np.flatnonzero(best > thr)
        if not idx.size:
            continue
        classes.append(logits[:, idx].argmax(axis=0))
        scores.append(1.0 / (1.0 + np.exp(-best[idx])))
        dist = flat[:4 * REG_MAX, idx].reshape(4, REG_MAX, idx.size)
        dist = np.exp(dist - dist.max(axis=1, keepdims=True))
        ltrb = (dist * _BINS).sum(axis=1) / dist.sum(axis=1)  # (4, k): expected distance per side
        cy, cx = np.divmod(idx, w)
        cx = cx + 0.5
        cy = cy + 0.5
        boxes.append(np.stack([cx - ltrb[0], cy - ltrb[1], cx + ltrb[2], cy + ltrb[3]], axis=1) * stride)
    if not boxes:
        return _empty()
    return (np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32),
            np.concatenate(classes))


def decode_preds(preds: np.ndarray, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates from a full head output (4 + nc, N): xywh boxes then class probabilities."""
    probs = preds[4:]
    best = probs.max(axis=0)
    idx = np.flatnonzero(best > conf)
    if not idx.size:
        return _empty()
    xywh = preds[:4, idx]
    half_w, half_h = xywh[2] / 2, xywh[3] / 2
    boxes = np.stack([xywh[0] - half_w, xywh[1] - half_h, xywh[0] + half_w, xywh[1] + half_h], axis=1)
    return boxes.astype(np.float32), best[idx].astype(np.float32), probs[:, idx].argmax(axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Class-aware non-maximum suppression; indices of the kept boxes, highest score first."""
    if not len(scores):
        return np.zeros(0, np.int64)
    if len(scores) > MAX_NMS:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS]
        return top[nms(boxes[top], scores[top], classes[top], iou, max_det)]
    xywh = boxes.astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    # cv2's stubs say sequences; it takes the arrays as they are (no per-box Python objects).
    keep = cv2.dnn.NMSBoxesBatched(xywh, scores.astype(np.float32), classes.astype(np.int32), 0.0, iou)  # type: ignore[arg-type]
    return np.asarray(keep, dtype=np.int64).reshape(-1)[:max_det]
