"""The names `visionstream.server.inference.detector` offered before inference was split into modules.

New code imports from where they live: `api` (the protocol, spec, InFlight, load_detector),
`backends/` (one module per backend), `letterbox`, `models` (resolve_model) and `device` (check_device).
"""

from visionstream.server.inference.api import PLACEHOLDER, Detector, DetectorSpec, InFlight, load_detector
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.inference.device import check_device
from visionstream.server.inference.letterbox import LETTERBOX_FILL, letterbox
from visionstream.server.inference.models import resolve_model

__all__ = [
    "LETTERBOX_FILL",
    "PLACEHOLDER",
    "Detector",
    "DetectorSpec",
    "InFlight",
    "PlaceholderDetector",
    "check_device",
    "letterbox",
    "load_detector",
    "resolve_model",
]
