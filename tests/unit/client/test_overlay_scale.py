"""Labels scale with the frame: as readable on 640x480 as on 1920x1080."""

from __future__ import annotations

import numpy as np
import pytest

from visionstream.client.visualize import draw_detections


def tag_rows(h: int, w: int) -> int:
    """Height in pixels of the label tag drawn for one box in the middle of an (h, w) black frame."""
    det = {"bbox": [w * 0.3, h * 0.5, w * 0.6, h * 0.9], "label": "person", "conf": 0.9, "cls": 0}
    out = draw_detections(np.zeros((h, w, 3), np.uint8), [det])
    column = out[: int(h * 0.5), int(w * 0.3) + 3 : int(w * 0.3) + 6].max(axis=(1, 2)) > 0  # above the box
    return int(column.sum())


@pytest.mark.parametrize(("small", "large"), [((480, 640), (1080, 1920)), ((720, 1280), (2160, 3840))])
def test_label_height_grows_with_the_frame(small: tuple[int, int], large: tuple[int, int]) -> None:
    a, b = tag_rows(*small), tag_rows(*large)
    factor = (large[0] + large[1]) / (small[0] + small[1])
    assert a >= 0.05 * small[0]  # a tag a twentieth of the frame high: readable when shown at 100 %
    assert 0.85 * factor <= b / a <= 1.15 * factor, (a, b)
