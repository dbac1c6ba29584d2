"""Letterboxing as ultralytics does it: resize keeping the aspect ratio, pad centred with grey."""

from __future__ import annotations

import cv2
import numpy as np

LETTERBOX_FILL = 114  # the grey ultralytics pads with; the models were trained on it


def _fit(h: int, w: int, new_shape: tuple[int, int]) -> tuple[float, int, int]:
    """(gain, resized h, resized w) of an h x w image scaled to fit `new_shape`, keeping its aspect."""
    gain = min(new_shape[0] / h, new_shape[1] / w)
    return gain, max(1, round(h * gain)), max(1, round(w * gain))


def letterbox(image: np.ndarray, new_shape: tuple[int, int], auto: bool, stride: int
              ) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad (centred) like ultralytics' LetterBox; returns (img, gain, pad)."""
    h, w = image.shape[:2]
    gain, nh, nw = _fit(h, w, new_shape)
    dh, dw = new_shape[0] - nh, new_shape[1] - nw
    if auto:  # minimal rectangle: pad only to the stride
        dh, dw = dh % stride, dw % stride
    if (h, w) != (nh, nw):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = round(dh / 2 - 0.1), round(dw / 2 - 0.1)
    bottom, right = dh - top, dw - left
    if dh or dw:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                   value=(LETTERBOX_FILL,) * 3)
    return image, gain, (left, top)


def rect_shape(hw: tuple[int, ...], new_shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """The (h, w) `letterbox(..., auto=True)` produces for an image of size `hw`."""
    _gain, nh, nw = _fit(hw[0], hw[1], new_shape)
    return nh + (new_shape[0] - nh) % stride, nw + (new_shape[1] - nw) % stride
