"""The detector used when no model can be had."""

from __future__ import annotations

import numpy as np

from visionstream.server.inference.api import PLACEHOLDER, Detection


class PlaceholderDetector:
    """Stand-in when no model can be had: one centred box per frame, labelled as what it is."""

    model_name = PLACEHOLDER
    names = {0: PLACEHOLDER}

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        return [{"label": PLACEHOLDER, "cls": 0, "conf": 0.0,
                 "bbox": [round(w * 0.25, 1), round(h * 0.25, 1), round(w * 0.75, 1), round(h * 0.75, 1)]}]
