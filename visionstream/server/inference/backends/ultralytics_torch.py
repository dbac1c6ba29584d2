"""YOLOv8 through ultralytics' AutoBackend: PyTorch weights, and every format it loads that the
OpenVINO backend does not take (ONNX, dynamic or GPU OpenVINO exports, ...)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from visionstream.server.inference.api import DetectorSpec
from visionstream.server.inference.backends.common import LetterboxDetector, import_ultralytics
from visionstream.server.inference.yolohead import decode_preds
from visionstream.wire.errors import ModelLoadError


class UltralyticsDetector(LetterboxDetector):
    """YOLOv8 through ultralytics' AutoBackend with lean pre/post-processing (no Results objects).

    Matches `model.predict` (same letterbox, NMS and box scaling) at a fraction of its overhead.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        ul = import_ultralytics(spec.threads)
        torch = self._torch = ul.torch
        self._nms = ul.non_max_suppression
        self.spec = spec
        self.model_name = Path(spec.model).name
        try:
            yolo = ul.YOLO(spec.model, task="detect")
            source = yolo.model if isinstance(yolo.model, torch.nn.Module) else spec.model
            self.backend = ul.AutoBackend(source, device=ul.select_device(spec.device, verbose=False),
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

    def _candidates(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
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
