"""Where the weights come from: a local path, or a bare asset name fetched within a time limit."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Final

from visionstream.wire.errors import ModelLoadError, ModelNotFound

log = logging.getLogger("visionstream.detector")

# The seed's default weights. Only this name, when it cannot be had (offline, say), falls back to
# placeholder detections: any other --model that is missing or fails to load stops the server.
DEFAULT_MODEL: Final = "yolov8n.pt"
CONFIG_SUFFIXES: Final = (".yaml", ".yml")  # ultralytics builds these from its own configs: no file needed
FORMATS: Final = "a .pt, .onnx, .torchscript or .yaml file, or an OpenVINO model folder"
MAX_REASON: Final = 200  # characters of a library's error message kept on the one console line


def falls_back(model: str) -> bool:
    """True for the one name that may start in placeholder mode when its weights cannot be had."""
    return model == DEFAULT_MODEL


def _fetchable(path: Path) -> bool:
    """A bare `*.pt` name: ultralytics may find it in its weights folder or download it."""
    return path.parent == Path(".") and path.suffix == ".pt"


def check_model(model: str) -> None:
    """Cheap start-up check, before anything binds or loads: ModelNotFound for a path that is not there
    and is not a bare asset name that could still be fetched (a typo fails in a second, not after minutes)."""
    path = Path(model)
    if path.exists() or path.suffix in CONFIG_SUFFIXES or _fetchable(path):
        return
    where = f" (looked in {path.parent.resolve()})" if path.parent != Path(".") else ""
    raise ModelNotFound(model, f"no such file or folder{where}")


def resolve_model(model: str, download_timeout: float) -> str:
    """The local path to load; ModelNotFound when the weights cannot be had.

    A bare asset name such as `yolov8n.pt` may be fetched by ultralytics, but never for longer than
    `download_timeout` seconds: an offline machine must not hang at start-up. Only names ultralytics
    publishes are asked for (it would otherwise query its release list online for any `*.pt` typo).
    """
    check_model(model)
    path = Path(model)
    if path.exists() or path.suffix in CONFIG_SUFFIXES:
        return model
    if download_timeout <= 0:
        raise ModelNotFound(model, "no such file, and --download-timeout 0 does not fetch it")
    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            from ultralytics.utils import SETTINGS
            from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

            if model not in GITHUB_ASSETS_NAMES and not (Path(SETTINGS["weights_dir"]) / model).exists():
                outcome["missing"] = f"no such file, and {model} is not a model ultralytics publishes for download"
                return
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
    if "missing" in outcome:
        raise ModelNotFound(model, outcome["missing"])
    error = outcome.get("error")
    why = one_line(error) if error is not None else f"no answer within {download_timeout:g}s"
    raise ModelNotFound(model, f"not found locally and could not be downloaded ({why})")


def one_line(exc: BaseException) -> str:
    """A library's error message cut to its first line (ultralytics' run to a dozen), at most MAX_REASON chars."""
    lines = str(exc).strip().splitlines()
    # ultralytics starts its own messages with a level and an emoji ("ERROR ❌️ ..."): not ours to repeat.
    text = re.sub(r"^(?:ERROR|WARNING)\W+", "", lines[0].strip()) if lines else type(exc).__name__
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


def load_failure(model: str, exc: BaseException) -> ModelLoadError:
    """The one readable line for weights that exist but do not load (not a model, corrupt, wrong task)."""
    if isinstance(exc, ModelNotFound):
        return exc
    cause = exc.__cause__ if isinstance(exc, ModelLoadError) and exc.__cause__ is not None else exc
    text = one_line(cause)
    if isinstance(cause, TypeError) and "not a supported model format" in text:
        kind = "a folder" if Path(model).is_dir() else "a file"
        why = f"{kind} ultralytics cannot load as a model (expected {FORMATS})"
    elif (cause is exc and isinstance(exc, ModelLoadError)) or isinstance(cause, TypeError):
        why = text  # ours, or ultralytics' way of saying what is wrong with the file (no type name needed)
    else:
        why = f"{type(cause).__name__}: {text}"
    return ModelLoadError(f"cannot load --model {model}: {why}")
