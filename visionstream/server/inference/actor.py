"""The inference worker of `--executor ray`: one model per Ray actor process; it decodes and detects what it gets."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from visionstream.server.inference.api import Detector, DetectorSpec, InFlight, load_detector
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.inference.imaging import DecodeError
from visionstream.server.inference.models import load_failure
from visionstream.wire.protocol import Frame

Shipped = dict[str, bytes]  # a model's files by path relative to its parent folder (a file: just its name)


def ship_model(resolved: str, limit: int) -> Shipped | None:
    """The bytes of the weights at `resolved` (a file, or an OpenVINO folder), for nodes that cannot read the
    path; None when they exceed `limit` bytes (then every node must have the path)."""
    path = Path(resolved)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if sum(p.stat().st_size for p in files) > limit:
        return None
    return {str(p.relative_to(path.parent)): p.read_bytes() for p in files}


def materialize(shipped: Shipped, name: str) -> str:
    """Write shipped weights to a private temporary folder (kept for the actor's life); the path to load."""
    root = Path(tempfile.mkdtemp(prefix="visionstream-model-"))
    for rel, data in shipped.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return str(root / name)


class InferenceActor:
    """Wrapped by `ray.remote` in the front (raylanes). Its constructor loads and warms the model, so that a
    restarted actor (Ray re-runs it) is ready again; a load failure is kept and raised by `ready`, where the
    front reports it as one line. Frames run one at a time (max_concurrency 1: detectors are not thread-safe)."""

    def __init__(self, spec: DetectorSpec, resolved: str | None, shipped: list[Any], nice: int) -> None:
        self.pid = os.getpid()
        self.incarnation = uuid.uuid4().hex  # tells the front a restarted actor from the one it knew
        self.node = socket.gethostname()
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()[:12]  # tells apart nodes on one host
        except Exception:
            self.node_id = ""
        if nice and sys.platform == "linux":  # the front's event loop may share this node's cores
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, nice)
        self.inflight = InFlight()
        self.detector: Detector | None = None
        self.error: str | None = None
        try:
            path = resolved
            if resolved is not None and not Path(resolved).exists():  # not on this node: the front's bytes
                import ray

                if not shipped:
                    raise FileNotFoundError(f"{resolved} is not on node {self.node} and was too large to ship")
                path = materialize(ray.get(shipped[0]), Path(resolved).name)
            if spec.device != "cpu":
                from visionstream.server.inference.device import check_device

                check_device(spec.device)
            self.detector = load_detector(spec, path, self.inflight)
        except Exception as exc:
            self.error = str(load_failure(spec.model, exc))

    def ready(self) -> dict[str, Any]:
        """What the front needs of this actor and its model; raises the load failure, if any."""
        if self.detector is None:
            raise RuntimeError(self.error or "no detector")
        det = self.detector
        imgsz = tuple(getattr(det, "imgsz", (0, 0)))
        return {"pid": self.pid, "incarnation": self.incarnation, "node": self.node, "node_id": self.node_id,
                "model_name": det.model_name, "names": dict(det.names),
                "placeholder": isinstance(det, PlaceholderDetector),
                "imgsz": imgsz if any(imgsz) else None,
                "input_shapes": [tuple(s) for s in getattr(det, "input_shapes", [])]}

    def detect(self, image: bytes, encoding: str | None, shape: tuple[int, int, int] | None,
               target: tuple[int, int] | None, max_pixels: int) -> tuple[Any, ...]:
        """One frame's client bytes -> (incarnation, pid, answer), the answer ("result", detections, decode s,
        infer s, (width, height) sent, own s), or ("decode_error", message, code), or ("inference_error", message).
        The incarnation tells the front of a restart it did not see (the actor died with no frame in flight)."""
        return self.incarnation, self.pid, self._detect(image, encoding, shape, target, max_pixels)

    def _detect(self, image: bytes, encoding: str | None, shape: tuple[int, int, int] | None,
                target: tuple[int, int] | None, max_pixels: int) -> tuple[Any, ...]:
        from visionstream.server.lanes import infer

        started = time.perf_counter()
        if self.detector is None:  # a restart whose model did not load (its node lost the path, say)
            return "inference_error", self.error or "no detector"
        frame = Frame("", 0, 0.0, image, encoding, shape)
        try:
            detections, t0, t1, t2, size = infer(self.detector, frame, target, self.inflight, max_pixels)
        except DecodeError as exc:
            return "decode_error", str(exc), exc.code
        except Exception as exc:  # one bad frame must not kill the actor
            return "inference_error", f"{type(exc).__name__}: {exc}"
        return "result", detections, t1 - t0, t2 - t1, size, time.perf_counter() - started
