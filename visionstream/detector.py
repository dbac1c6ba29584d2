"""Inference behind one method, `Detector.detect(image) -> detections`; the only module importing ultralytics."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .errors import ConfigError, ModelLoadError

log = logging.getLogger("visionstream.detector")

PLACEHOLDER = "placeholder"
LETTERBOX_FILL = 114  # the grey ultralytics pads with; the models were trained on it


class Detector(Protocol):
    """What a worker needs: a name, class labels and one detect call (not thread-safe)."""

    model_name: str
    names: dict[int, str]

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to build one detector; each worker builds its own from it."""

    model: str
    device: str = "cpu"
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    threads: int = 0
    workers: int = 1  # concurrent users of one shared OpenVINO compiled model


class PlaceholderDetector:
    """Stand-in when no model can be had: one centred box per frame, labelled as what it is."""

    model_name = PLACEHOLDER
    names = {0: PLACEHOLDER}

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        h, w = image.shape[:2]
        return [{"label": PLACEHOLDER, "cls": 0, "conf": 0.0,
                 "bbox": [round(w * 0.25, 1), round(h * 0.25, 1), round(w * 0.75, 1), round(h * 0.75, 1)]}]


def letterbox(image: np.ndarray, new_shape: tuple[int, int], auto: bool, stride: int
              ) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad (centred) like ultralytics' LetterBox; returns (img, gain, pad)."""
    h, w = image.shape[:2]
    gain = min(new_shape[0] / h, new_shape[1] / w)
    nh, nw = max(1, round(h * gain)), max(1, round(w * gain))
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


class UltralyticsDetector:
    """YOLOv8 through ultralytics' AutoBackend with lean pre/post-processing (no Results objects).

    Matches `model.predict` (same letterbox, NMS and box scaling) at a fraction of its overhead.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        try:
            import torch
            from ultralytics import YOLO
            from ultralytics.nn.autobackend import AutoBackend
            from ultralytics.utils import nms
            from ultralytics.utils.torch_utils import select_device
        except ImportError as exc:
            raise ModelLoadError(f"ultralytics is not installed ({exc})") from exc
        self._torch = torch
        self._nms = nms.non_max_suppression
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model_name = Path(spec.model).name
        self.end2end = False
        self._ov_infer = None
        meta = openvino_metadata(spec)
        if meta is not None:
            # A static OpenVINO export on CPU: our own shared compiled model, no AutoBackend (which
            # would compile one more latency model per worker and keep its threads around).
            self.backend = None
            self.device = "cpu"
            self.names = {int(k): str(v) for k, v in meta["names"].items()}
            self.stride = max(int(meta.get("stride", 32)), 32)
            self.imgsz = self._fixed_input(meta["imgsz"])
            self.auto = False
            self._ov_infer = _shared_openvino(Path(spec.model), spec.workers, spec.threads).runner()
            return
        try:
            yolo = YOLO(spec.model, task="detect")
            source = yolo.model if isinstance(yolo.model, torch.nn.Module) else spec.model
            self.backend = AutoBackend(source, device=select_device(spec.device, verbose=False),
                                       fuse=True, verbose=False)
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {spec.model!r}: {type(exc).__name__}: {exc}") from exc
        self.backend.eval()
        self.device = self.backend.device
        self.names = {int(k): str(v) for k, v in self.backend.names.items()}
        self.stride = max(int(getattr(self.backend, "stride", 32)), 32)
        meta_imgsz = getattr(self.backend, "imgsz", None)
        dynamic = bool(getattr(self.backend, "dynamic", False))
        self.imgsz = (spec.imgsz, spec.imgsz)
        if self.backend.format != "pt" and not dynamic and meta_imgsz:
            self.imgsz = self._fixed_input(meta_imgsz)
        # PyTorch models accept any stride multiple, so pad minimally (fewer pixels, same boxes).
        self.auto = self.backend.format == "pt" or dynamic
        self.end2end = bool(getattr(self.backend, "end2end", False))

    def _fixed_input(self, imgsz: Any) -> tuple[int, int]:
        """An export's fixed (h, w) input, which wins over --imgsz (said once, not per lane)."""
        fixed = tuple(int(v) for v in (imgsz if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)))
        if fixed != (self.spec.imgsz, self.spec.imgsz) and not _WARNED.get(self.spec.model):
            _WARNED[self.spec.model] = True
            log.warning("model %s has a fixed input of %s; using it instead of --imgsz %d",
                        self.model_name, fixed, self.spec.imgsz)
        return fixed  # type: ignore[return-value]

    def _forward(self, image: np.ndarray) -> tuple[Any, float, tuple[float, float]]:
        padded, gain, pad = letterbox(image, self.imgsz, self.auto, self.stride)
        # One C call: BGR->RGB, HWC->NCHW, uint8->float32 in [0, 1].
        blob = cv2.dnn.blobFromImage(padded, scalefactor=1 / 255.0, swapRB=True)
        if self._ov_infer is not None:  # straight to OpenVINO: no torch round trip on the input
            return self._torch.from_numpy(self._ov_infer(blob)), gain, pad
        return self.backend(self._torch.from_numpy(blob).to(self.device)), gain, pad

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        with self._torch.inference_mode():
            preds, gain, (padx, pady) = self._forward(image)
            det = self._nms(preds, self.spec.conf, self.spec.iou, None, False, max_det=self.spec.max_det,
                            nc=0, end2end=self.end2end)[0]
        if not len(det):
            return []
        arr = det[:, :6].float().cpu().numpy()
        h, w = image.shape[:2]
        boxes = arr[:, :4]
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - padx) / gain).clip(0, w)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pady) / gain).clip(0, h)
        names = self.names
        return [
            {"label": names.get(int(c), str(int(c))), "cls": int(c), "conf": round(float(s), 4),
             "bbox": [round(float(v), 1) for v in b]}
            for b, s, c in zip(boxes, arr[:, 4], arr[:, 5])
        ]

    def warmup(self, runs: int = 2) -> None:
        dummy = np.full((self.imgsz[0], self.imgsz[1], 3), LETTERBOX_FILL, dtype=np.uint8)
        for _ in range(runs):
            self.detect(dummy)


class SharedOpenVINO:
    """One OpenVINO model compiled twice and shared by all workers (one infer request each per mode).

    Alone, a frame runs on the latency-compiled model (all cores on one inference: lowest latency).
    When another worker is already inferring, it runs on the throughput-compiled model (one CPU
    stream per worker, pinned threads), so concurrent inferences do not fight over the same cores.
    """

    def __init__(self, xml: Path, workers: int, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        total = threads * workers if threads else 0
        latency_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if total:
            latency_cfg["INFERENCE_NUM_THREADS"] = total
        self.latency = core.compile_model(model, "CPU", latency_cfg)
        self.throughput = None
        if workers > 1:
            throughput_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": workers}
            if total:
                throughput_cfg["INFERENCE_NUM_THREADS"] = total
            self.throughput = core.compile_model(model, "CPU", throughput_cfg)
        self._active = 0
        self._lock = threading.Lock()
        shape = [int(d) for d in model.input(0).get_partial_shape().to_shape()]
        self._dummy = np.full(shape, LETTERBOX_FILL / 255.0, dtype=np.float32)
        log.info("OpenVINO model compiled for latency%s", f" and throughput ({workers} streams)"
                 if self.throughput is not None else "")

    def runner(self) -> Any:
        """A per-worker callable: blob -> first output, choosing the mode by current concurrency."""
        with self._lock:
            # First inferences run one at a time: concurrent first calls on fresh requests were
            # seen to deadlock inside OpenVINO's input copy at start-up (3 in 20 starts).
            lat = self.latency.create_infer_request()
            thr = self.throughput.create_infer_request() if self.throughput is not None else lat
            for request in {id(lat): lat, id(thr): thr}.values():
                request.infer({0: self._dummy}, share_inputs=True)

        def infer(blob: np.ndarray) -> np.ndarray:
            with self._lock:
                alone = self._active == 0
                self._active += 1
            try:
                # share_inputs: the blob is contiguous and outlives the call, so no copy is needed.
                out = (lat if alone else thr).infer({0: blob}, share_inputs=True)
            finally:
                with self._lock:
                    self._active -= 1
            return next(iter(out.values()))

        return infer


_WARNED: dict[str, bool] = {}
_OV_MODELS: dict[tuple[str, int, int], SharedOpenVINO] = {}
_OV_LOCK = threading.Lock()


def _shared_openvino(folder: Path, workers: int, threads: int) -> SharedOpenVINO:
    xml = folder if folder.suffix == ".xml" else next(folder.glob("*.xml"))
    key = (str(xml.resolve()), workers, threads)
    with _OV_LOCK:
        if key not in _OV_MODELS:
            _OV_MODELS[key] = SharedOpenVINO(xml, workers, threads)
        return _OV_MODELS[key]


def openvino_metadata(spec: DetectorSpec) -> dict[str, Any] | None:
    """Metadata of a static-shape ultralytics OpenVINO export folder run on CPU, else None."""
    folder = Path(spec.model)
    if spec.device != "cpu" or not folder.is_dir() or not any(folder.glob("*.xml")):
        return None
    try:
        import yaml

        meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    except Exception:  # no or unreadable metadata: let AutoBackend handle (or reject) it
        return None
    if not isinstance(meta, dict) or meta.get("task", "detect") != "detect" or "names" not in meta:
        return None
    args = meta.get("args") or {}
    if args.get("dynamic") or args.get("nms") or int(meta.get("batch", 1)) != 1 or "imgsz" not in meta:
        return None
    return meta


def lanes_per_worker(spec: DetectorSpec, resolved: str | None) -> int:
    """Frames one worker keeps in flight. With our shared OpenVINO model a second lane decodes and
    pre-processes the next frame while the first infers (measured +19 % throughput, BENCHMARKS.md);
    PyTorch models are not thread-safe, so they stay at one."""
    if resolved is None:
        return 1
    return 2 if openvino_metadata(replace(spec, model=resolved)) else 1


def check_device(device: str) -> None:
    """Fail fast (ConfigError) when CUDA is asked for but absent, before anything starts."""
    if device == "cpu":
        return
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(f"--device {device} needs PyTorch, which is not installed") from exc
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available on this machine; use --device cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")


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


def load_detector(spec: DetectorSpec, resolved: str | None) -> Detector:
    """Build one detector (called once per worker, in that worker's thread)."""
    if resolved is None:
        return PlaceholderDetector()
    detector = UltralyticsDetector(replace(spec, model=resolved))
    detector.warmup()
    return detector
