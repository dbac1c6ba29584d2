"""Where the weights come from: a local path, or a bare asset name fetched within a time limit."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("visionstream.detector")


def resolve_model(model: str, download_timeout: float) -> str | None:
    """The local path to load, or None when the weights cannot be had (-> placeholder mode).

    A bare asset name such as `yolov8n.pt` may be fetched by ultralytics, but never for longer than
    `download_timeout` seconds: an offline machine must not hang at start-up.
    """
    path = Path(model)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return model
    if download_timeout <= 0 or path.parent != Path(".") or path.suffix != ".pt":
        log.warning("model %s not found", model)
        return None
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            from ultralytics.utils.downloads import attempt_download_asset

            outcome["path"] = attempt_download_asset(model)
        except Exception as exc:  # offline, DNS, HTTP errors: all mean "not available"
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=fetch, name="model-download", daemon=True)
    worker.start()
    worker.join(download_timeout)
    fetched = outcome.get("path")
    if fetched and Path(fetched).exists():
        log.info("downloaded %s in %.1fs", model, time.monotonic() - started)
        return str(fetched)
    reason = outcome.get("error") or f"no answer within {download_timeout:.0f}s"
    log.warning("model %s not found locally and could not be downloaded: %s", model, reason)
    return None
