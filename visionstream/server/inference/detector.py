"""Inference behind one method, `Detector.detect(image) -> detections`; the only module importing ultralytics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import cv2
import numpy as np

from visionstream.server.inference.yolohead import REG_MAX, decode_maps, decode_preds, nms
from visionstream.wire.errors import ConfigError, ModelLoadError

log = logging.getLogger("visionstream.detector")

PLACEHOLDER = "placeholder"
LETTERBOX_FILL = 114  # the grey ultralytics pads with; the models were trained on it


class Detector(Protocol):
    """What a worker needs: a name, class labels and one detect call (not thread-safe)."""

    model_name: str
    names: dict[int, str]

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]: ...


class InFlight:
    """Frames being worked on across all lanes, from decode to result (a thread-safe counter), plus
    whether more work is waiting or on its way (`busy`, asked of the server's scheduler).

    OpenVINO picks its compiled model by it: a frame alone in a server that is not overloaded gets
    every core (latency model); as soon as a second frame is anywhere, waiting or still decoding, or
    frames arrive faster than the lanes finish them, one core each. Under overload a lane that found
    itself alone for a moment took both cores, the next frame arrived a millisecond later on the
    other lane, and the two fought: such inferences took 18-19 ms instead of 7.
    """

    def __init__(self, busy: Callable[[], bool] = lambda: False) -> None:
        self.count = 0
        self.busy = busy
        self._lock = threading.Lock()

    @property
    def alone(self) -> bool:
        """At most one frame in the server, the caller's own, and no more expected soon."""
        return self.count <= 1 and not self.busy()

    def __enter__(self) -> InFlight:
        with self._lock:
            self.count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.count -= 1


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
    rect: bool = True  # pad to a stride multiple instead of the full square where the model allows it
    inflight: InFlight | None = field(default=None, compare=False)  # the server's frames in lanes


class PlaceholderDetector:
    """Stand-in when no model can be had: one centred box per frame, labelled as what it is."""

    model_name = PLACEHOLDER
    names = {0: PLACEHOLDER}

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        h, w = image.shape[:2]
        return [{"label": PLACEHOLDER, "cls": 0, "conf": 0.0,
                 "bbox": [round(w * 0.25, 1), round(h * 0.25, 1), round(w * 0.75, 1), round(h * 0.75, 1)]}]


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


class UltralyticsDetector:
    """YOLOv8 through ultralytics' AutoBackend with lean pre/post-processing (no Results objects).

    Matches `model.predict` (same letterbox, NMS and box scaling) at a fraction of its overhead.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        try:
            import torch
            from ultralytics import YOLO
            from ultralytics.nn.autobackend import AutoBackend
            from ultralytics.utils.nms import non_max_suppression
            from ultralytics.utils.torch_utils import select_device
        except ImportError as exc:
            raise ModelLoadError(f"ultralytics is not installed ({exc})") from exc
        self._torch = torch
        self._nms = non_max_suppression
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model_name = Path(spec.model).name
        self.end2end = False
        self._ov_infer = None
        self._head_maps = False
        self._shared: SharedOpenVINO | None = None
        meta = openvino_metadata(spec)
        if meta is not None:
            # A static OpenVINO export on CPU: our own shared compiled model, no AutoBackend (which
            # would compile one more latency model per worker and keep its threads around).
            self.backend = None
            self.device = "cpu"
            self.names = {int(k): str(v) for k, v in meta["names"].items()}
            self.stride = max(int(meta.get("stride", 32)), 32)
            self.imgsz = self._fixed_input(meta["imgsz"])
            self._shared = _shared_openvino(Path(spec.model), spec.workers, spec.threads, len(self.names),
                                            spec.rect, self.stride)
            # Cut to its head maps, the model can run other shapes: 640x480 at 320x256, not 320x320.
            self.auto = self._head_maps = self._shared.head_maps
            self._ov_infer = self._shared.runner(spec.inflight)
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
        self.auto = spec.rect and (self.backend.format == "pt" or dynamic)
        self.end2end = bool(getattr(self.backend, "end2end", False))

    def _fixed_input(self, imgsz: Any) -> tuple[int, int]:
        """An export's fixed (h, w) input, which wins over --imgsz (said once, not per lane)."""
        fixed = tuple(int(v) for v in (imgsz if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)))
        if fixed != (self.spec.imgsz, self.spec.imgsz) and not _WARNED.get(self.spec.model):
            _WARNED[self.spec.model] = True
            log.warning("model %s has a fixed input of %s; using it instead of --imgsz %d",
                        self.model_name, fixed, self.spec.imgsz)
        return fixed  # type: ignore[return-value]

    @property
    def input_shapes(self) -> list[tuple[int, int]]:
        """The (h, w) inputs inference runs at: a frame pads to its stride-multiple shape if that is
        one of them, else to the square."""
        return self._shared.shapes if self._shared is not None else [tuple(self.imgsz)]  # type: ignore[list-item]

    def _candidates(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Letterboxed BGR pixels -> (xyxy boxes in their pixels, scores, classes, already NMS'd?)."""
        if self._ov_infer is not None:
            # The compiled model takes the uint8 BGR pixels as they are (its own first step converts
            # them), so no float blob is built here: 5 % less CPU per frame.
            outs = self._ov_infer(np.ascontiguousarray(padded)[None])
            if self._head_maps:
                return (*decode_maps(outs, padded.shape[:2], len(self.names), self.spec.conf), False)
            return (*decode_preds(outs[0][0], self.spec.conf), False)
        # One C call: BGR->RGB, HWC->NCHW, uint8->float32 in [0, 1].
        blob = cv2.dnn.blobFromImage(padded, scalefactor=1 / 255.0, swapRB=True)
        torch = self._torch
        with torch.inference_mode():
            preds = self.backend(torch.from_numpy(blob).to(self.device))
            if isinstance(preds, (list, tuple)):
                preds = preds[0]
            if not self.end2end and preds.ndim == 3 and preds.shape[1] == 4 + len(self.names):
                return (*decode_preds(preds[0].float().cpu().numpy(), self.spec.conf), False)
            # Other layouts (end-to-end heads, extra channels): ultralytics' own NMS.
            det = self._nms(preds, self.spec.conf, self.spec.iou, None, False, max_det=self.spec.max_det,
                            nc=0, end2end=self.end2end)[0][:, :6].float().cpu().numpy()
        return det[:, :4], det[:, 4], det[:, 5].astype(np.int64), True

    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        auto = self.auto
        if self._shared is not None and auto:  # pad to the stride only for a shape the model is compiled for
            auto = self._shared.input_shape(rect_shape(image.shape[:2], self.imgsz, self.stride)) != self.imgsz
        padded, gain, (padx, pady) = letterbox(image, self.imgsz, auto, self.stride)
        boxes, scores, classes, final = self._candidates(padded)
        if not final:
            keep = nms(boxes, scores, classes, self.spec.iou, self.spec.max_det)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if not len(scores):
            return []
        h, w = image.shape[:2]
        boxes = boxes.astype(np.float64)
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - padx) / gain).clip(0, w)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pady) / gain).clip(0, h)
        names = self.names
        return [
            {"label": names.get(int(c), str(int(c))), "cls": int(c), "conf": round(float(s), 4),
             "bbox": [round(float(v), 1) for v in b]}
            for b, s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())
        ]

    def warmup(self, runs: int = 2) -> None:
        dummy = np.full((self.imgsz[0], self.imgsz[1], 3), LETTERBOX_FILL, dtype=np.uint8)
        for _ in range(runs):
            self.detect(dummy)


def head_maps_model(model: Any, nc: int) -> Any | None:
    """A YOLOv8 OpenVINO graph cut before its fixed-size decode; None if the graph is not one.

    Static exports bake the anchor grid for one input size into the graph, but everything before the
    per-scale head maps (1, 4*REG_MAX + nc, h, w) is convolutional. Returning those maps (decoded in
    numpy, `yolohead.decode_maps`) lets the same weights be reshaped to other stride-multiple sizes.
    """
    import openvino as ov

    maps = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Concat":
            continue
        shape = op.get_output_partial_shape(0)
        if shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static \
                and shape[1].get_length() == 4 * REG_MAX + nc:
            maps.append(op.output(0))
    if len(maps) != 3:
        return None
    maps.sort(key=lambda o: -o.get_partial_shape()[2].get_length())  # strides 8, 16, 32
    try:
        cut = ov.Model(maps, model.get_parameters(), "yolo_head_maps")
        probe = cut.clone()
        probe.reshape({probe.input(0): ov.PartialShape([1, 3, -1, -1])})  # reshapable at all?
    except Exception as exc:  # an unexpected graph: keep the whole static model
        log.info("OpenVINO model kept at its fixed input size (%s)", exc)
        return None
    return cut


def _pixels_input(model: Any) -> Any:
    """The model taking (1, h, w, 3) uint8 BGR pixels: conversion to RGB floats in [0, 1], NCHW, is
    compiled into the graph instead of done in Python per frame (measured: 7.45-7.68 -> 7.11-7.15 ms
    of CPU per frame, the same detections)."""
    import openvino as ov
    from openvino.preprocess import ColorFormat, PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")) \
        .set_color_format(ColorFormat.BGR)
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).scale(255.0)
    return ppp.build()


@dataclass
class _Compiled:
    """One input shape: a latency-compiled model and, with several workers, a throughput-compiled one."""

    latency: Any
    throughput: Any | None


class SharedOpenVINO:
    """One OpenVINO model shared by all workers, compiled twice per input shape.

    A frame alone in the server runs on the latency-compiled model (all cores on one inference:
    lowest latency). When other frames are in flight, it runs on the throughput-compiled model (one
    CPU stream per worker), so concurrent inferences do not fight over the same cores.

    Shapes: the export's own square input, plus, with `rect` on a YOLOv8 graph (cut to its head
    maps), static compilations for the landscape camera ratios 4:3 and 16:9: at imgsz 320 a 640x480
    frame runs at 256x320 instead of 320x320 (20 % less work) and a 1280x720 one at 192x320. Other
    shapes pad to the square. All shapes are compiled at start-up, never later: a shape compiled on
    demand stalls frames, and switching a camera from square to rect mid-stream changed its boxes
    and scores (a person at 0.72 became 0.66) -- the same image must always get the same answer. A
    fully dynamic input was measured to grow by 30 MB and stall 70-270 ms on every new shape.
    """

    RATIOS: Final = ((3, 4), (9, 16))  # h:w of the camera shapes compiled besides the square

    def __init__(self, xml: Path, workers: int, threads: int, nc: int, rect: bool, stride: int = 32) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        self.square = tuple(int(d) for d in model.input(0).get_partial_shape().to_shape()[2:])
        cut = head_maps_model(model, nc) if rect else None
        self.head_maps = cut is not None
        self._core, self._workers = core, workers
        self._total_threads = threads * workers if threads else 0
        shapes = {self.square: cut if cut is not None else model}
        if cut is not None:
            for rh, rw in self.RATIOS:
                hw = rect_shape((rh * 1000, rw * 1000), self.square, stride)
                if hw not in shapes:
                    shaped = cut.clone()
                    shaped.reshape({shaped.input(0): ov.PartialShape([1, 3, *hw])})
                    shapes[hw] = shaped
        started = time.monotonic()
        self._shapes: dict[tuple[int, int], _Compiled] = {hw: self._compile(_pixels_input(m))
                                                          for hw, m in shapes.items()}
        self._active = 0
        self._lock = threading.Lock()
        log.info("OpenVINO model compiled for latency%s, input shapes %s (h x w), in %.1fs",
                 f" and throughput ({workers} streams)" if workers > 1 else "",
                 ", ".join(f"{h}x{w}" for h, w in self._shapes), time.monotonic() - started)

    def _compile(self, model: Any) -> _Compiled:
        # Flush denormals to zero: the same outputs bit for bit on bus.jpg and zidane.jpg, and 22 %
        # less CPU per inference (2 threads on the throughput model: 340-348 -> 414-434 fps). It also
        # sets flush-to-zero on the compiling thread: the server compiles on a lane thread, never on
        # the event loop's (tests/integration/test_detector.py checks the main thread keeps subnormals).
        latency_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "CPU_DENORMALS_OPTIMIZATION": True}
        if self._total_threads:
            latency_cfg["INFERENCE_NUM_THREADS"] = self._total_threads
        latency = self._core.compile_model(model, "CPU", latency_cfg)
        throughput = None
        if self._workers > 1:
            throughput_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self._workers,
                                              "CPU_DENORMALS_OPTIMIZATION": True}
            if self._total_threads:
                throughput_cfg["INFERENCE_NUM_THREADS"] = self._total_threads
            throughput = self._core.compile_model(model, "CPU", throughput_cfg)
        return _Compiled(latency, throughput)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return list(self._shapes)

    def input_shape(self, wanted: tuple[int, int]) -> tuple[int, int]:
        """The input (h, w) for a frame that would pad to `wanted`: it if compiled, else the square."""
        return wanted if wanted in self._shapes else self.square

    def runner(self, inflight: InFlight | None = None) -> Any:
        """A per-lane callable: (1, h, w, 3) uint8 BGR pixels -> outputs (a list), choosing the mode by concurrency:
        the server's frames in flight when it says (`inflight`), else the inferences running now."""
        requests: dict[tuple[tuple[int, int], bool], Any] = {}  # (shape, alone) -> this lane's request
        with self._lock:
            # First inferences run one at a time: concurrent first calls on fresh requests were seen
            # to deadlock inside OpenVINO's input copy at start-up (3 in 20 starts).
            for hw, compiled in self._shapes.items():
                lat = compiled.latency.create_infer_request()
                thr = compiled.throughput.create_infer_request() if compiled.throughput is not None else lat
                for req in {id(lat): lat, id(thr): thr}.values():
                    req.infer({0: np.full((1, *hw, 3), LETTERBOX_FILL, dtype=np.uint8)})
                requests[hw, True], requests[hw, False] = lat, thr

        def infer(pixels: np.ndarray) -> list[np.ndarray]:
            with self._lock:
                alone = self._active == 0 and (inflight is None or inflight.alone)
                self._active += 1
            try:
                # share_inputs: the pixels are contiguous and outlive the call, so no copy is needed.
                # share_outputs: views into the request's buffers, read before this lane's next call.
                out = requests[pixels.shape[1:3], alone].infer({0: pixels}, share_inputs=True, share_outputs=True)
            finally:
                with self._lock:
                    self._active -= 1
            return list(out.values())

        return infer


_WARNED: dict[str, bool] = {}
_OV_MODELS: dict[tuple[str, int, int, int, bool], SharedOpenVINO] = {}  # one per model and layout
_OV_LOCK = threading.Lock()


def _shared_openvino(folder: Path, workers: int, threads: int, nc: int, rect: bool, stride: int) -> SharedOpenVINO:
    xml = folder if folder.suffix == ".xml" else next(folder.glob("*.xml"))
    key = (str(xml.resolve()), workers, threads, nc, rect)
    with _OV_LOCK:
        if key not in _OV_MODELS:
            _OV_MODELS[key] = SharedOpenVINO(xml, workers, threads, nc, rect, stride)
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
