"""visionstream: real-time multi-stream YOLOv8 inference over TCP with a FastAPI control plane."""

from __future__ import annotations

from typing import Any

__all__ = ["DetectClient", "detect"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import visionstream.server` does not pull in the client side (numpy, OpenCV).
    if name in __all__:
        from visionstream import api

        return getattr(api, name)
    raise AttributeError(f"module 'visionstream' has no attribute {name!r}")
