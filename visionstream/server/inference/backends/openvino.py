"""A static ultralytics OpenVINO export on CPU, run by OpenVINO itself: one compiled model shared by
every lane, cut to its head maps so camera shapes need not pad to the square."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from visionstream.server.inference.api import DetectorSpec, InFlight
from visionstream.server.inference.backends.common import LetterboxDetector, import_ultralytics
from visionstream.server.inference.letterbox import LETTERBOX_FILL, rect_shape
from visionstream.server.inference.yolohead import REG_MAX, decode_maps, decode_preds
from visionstream.wire.errors import ModelLoadError

log = logging.getLogger("visionstream.detector")


class OpenVINODetector(LetterboxDetector):
    """One lane's detector on the shared compiled model (`SharedOpenVINO`), with its own infer requests.

    Not AutoBackend, which would compile one more latency model per lane and keep its threads around.
    """

    def __init__(self, spec: DetectorSpec, inflight: InFlight | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        import_ultralytics(spec.threads)
        if meta is None:
            meta = openvino_metadata(spec)
        if meta is None:
            raise ModelLoadError(f"{spec.model!r} is not a static-shape OpenVINO detect export run on CPU")
        self.spec = spec
        self.model_name = Path(spec.model).name
        self.device = "cpu"
        self.names = {int(k): str(v) for k, v in meta["names"].items()}
        self.stride = max(int(meta.get("stride", 32)), 32)
        self.imgsz = self._fixed_input(meta["imgsz"])
        self._shared = _shared_openvino(Path(spec.model), spec.streams, spec.threads, len(self.names),
                                        spec.rect, self.stride, spec.pin_threads)
        # Cut to its head maps, the model can run other shapes: 640x480 at 320x256, not 320x320.
        self.auto = self._head_maps = self._shared.head_maps
        self._infer = self._shared.runner(inflight)

    @property
    def input_shapes(self) -> list[tuple[int, int]]:
        """The (h, w) inputs inference runs at: a frame pads to its stride-multiple shape if that is
        one of them, else to the square."""
        return self._shared.shapes

    def _pad_to_stride(self, image: np.ndarray) -> bool:
        # Only for a shape the model is compiled for.
        return self.auto and self._shared.input_shape(rect_shape(image.shape[:2], self.imgsz, self.stride)) \
            != self.imgsz

    def _candidates(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        # The compiled model takes the uint8 BGR pixels as they are (its own first step converts
        # them), so no float blob is built here.
        outs = self._infer(np.ascontiguousarray(padded)[None])
        if self._head_maps:
            return (*decode_maps(outs, padded.shape[:2], len(self.names), self.spec.conf), False)
        return (*decode_preds(outs[0][0], self.spec.conf), False)


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


def pixels_input(model: Any) -> Any:
    """The model taking (1, h, w, 3) uint8 BGR pixels: conversion to RGB floats in [0, 1], NCHW, is
    compiled into the graph instead of done in Python per frame (less CPU, the same detections)."""
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
    """One input shape: a latency-compiled model and, with several streams, a throughput-compiled one."""

    latency: Any
    throughput: Any | None


class SharedOpenVINO:
    """One OpenVINO model shared by all lanes, compiled twice per input shape.

    A frame alone in the server runs on the latency-compiled model (all cores on one inference:
    lowest latency). When other frames are in flight, it runs on the throughput-compiled model (one
    CPU stream per concurrent inference), so concurrent inferences do not fight over the same cores.

    Shapes: the export's own square input, plus, with `rect` on a YOLOv8 graph (cut to its head
    maps), static compilations for the landscape camera ratios 4:3 and 16:9: at imgsz 320 a 640x480
    frame runs at 256x320 instead of 320x320 and a 1280x720 one at 192x320. Other shapes pad to the
    square. All shapes are compiled at start-up, never later: a shape compiled on demand stalls
    frames, and switching a camera from square to rect mid-stream changes its boxes and scores -- the
    same image must always get the same answer. A fully dynamic input grows memory and stalls on
    every new shape (docs/BENCHMARKS.md).
    """

    RATIOS: Final = ((3, 4), (9, 16))  # h:w of the camera shapes compiled besides the square

    def __init__(self, xml: Path, streams: int, threads: int, nc: int, rect: bool, stride: int = 32,
                 pin: bool = True) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        h, w = (int(d) for d in model.input(0).get_partial_shape().to_shape()[2:])
        self.square = (h, w)
        cut = head_maps_model(model, nc) if rect else None
        self.head_maps = cut is not None
        self._core, self._streams = core, streams
        self._pin = pin
        self._total_threads = threads * streams if threads else 0
        shapes = {self.square: cut if cut is not None else model}
        if cut is not None:
            for rh, rw in self.RATIOS:
                hw = rect_shape((rh * 1000, rw * 1000), self.square, stride)
                if hw not in shapes:
                    shaped = cut.clone()
                    shaped.reshape({shaped.input(0): ov.PartialShape([1, 3, *hw])})
                    shapes[hw] = shaped
        started = time.monotonic()
        self._shapes: dict[tuple[int, int], _Compiled] = {hw: self._compile(pixels_input(m))
                                                          for hw, m in shapes.items()}
        self._active = 0
        self._lock = threading.Lock()
        log.info("OpenVINO model compiled for latency%s, input shapes %s (h x w), in %.1fs",
                 f" and throughput ({streams} streams)" if streams > 1 else "",
                 ", ".join(f"{h}x{w}" for h, w in self._shapes), time.monotonic() - started)

    def _compile(self, model: Any) -> _Compiled:
        # Flush denormals to zero: the same outputs bit for bit, and less CPU per inference. It also
        # sets flush-to-zero on the compiling thread: the server compiles on a lane thread, never on
        # the event loop's (tests/integration/test_detector.py checks the main thread keeps subnormals).
        latency_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "CPU_DENORMALS_OPTIMIZATION": True}
        if not self._pin:
            latency_cfg["ENABLE_CPU_PINNING"] = False
        if self._total_threads:
            latency_cfg["INFERENCE_NUM_THREADS"] = self._total_threads
        latency = self._core.compile_model(model, "CPU", latency_cfg)
        throughput = None
        if self._streams > 1:
            throughput_cfg: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self._streams,
                                              "CPU_DENORMALS_OPTIMIZATION": True}
            if not self._pin:
                throughput_cfg["ENABLE_CPU_PINNING"] = False
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
            # First inferences run one at a time: concurrent first calls on fresh requests can deadlock
            # inside OpenVINO's input copy at start-up.
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


_OV_MODELS: dict[tuple[str, int, int, int, bool, bool], SharedOpenVINO] = {}  # one per model and layout
_OV_LOCK = threading.Lock()


def _shared_openvino(folder: Path, streams: int, threads: int, nc: int, rect: bool, stride: int,
                     pin: bool = True) -> SharedOpenVINO:
    xml = folder if folder.suffix == ".xml" else next(folder.glob("*.xml"))
    key = (str(xml.resolve()), streams, threads, nc, rect, pin)
    with _OV_LOCK:
        if key not in _OV_MODELS:
            _OV_MODELS[key] = SharedOpenVINO(xml, streams, threads, nc, rect, stride, pin)
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
