"""Raw ceiling: a plain ultralytics model.predict() loop on one decoded frame, in its own process."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure_raw(model: str, imgsz: int, duration: float, size: str = "640x480", warmup: int = 5) -> dict[str, Any]:
    """Frames per second and per-call times of `model.predict` on bus.jpg as the load generator sends it."""
    import cv2
    import numpy as np
    import torch
    from ultralytics import YOLO

    from visionstream.loadtest.loadgen import asset_path, parse_size, prepare_payloads

    # The very JPEG the stress load sends, decoded once: the ceiling excludes decode, like a camera
    # pipeline that hands predict() a ready frame.
    payload = prepare_payloads(image=asset_path("bus.jpg"), size=parse_size(size))[0]
    frame = cv2.imdecode(np.frombuffer(payload.data, np.uint8), cv2.IMREAD_COLOR)
    started = time.perf_counter()
    yolo = YOLO(model, task="detect")
    for _ in range(warmup):
        yolo.predict(frame, imgsz=imgsz, verbose=False)
    load_s = time.perf_counter() - started
    times: list[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration or len(times) < 5:
        t = time.perf_counter()
        res = yolo.predict(frame, imgsz=imgsz, verbose=False)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000.0 for x in times)
    return {
        "model": model,
        "imgsz": imgsz,
        "frame": f"{payload.label} {payload.shape[1]}x{payload.shape[0]}",
        "calls": len(times),
        "seconds": wall,
        "fps": len(times) / wall,
        "infer_ms_median": statistics.median(ms),
        "infer_ms_mean": statistics.fmean(ms),
        "infer_ms_p90": ms[int(0.9 * (len(ms) - 1))],
        "infer_ms_min": ms[0],
        "ultralytics_speed_ms": {k: round(v, 3) for k, v in res[0].speed.items()},
        "detections": len(res[0].boxes),
        "torch_threads": torch.get_num_threads(),
        "load_and_warmup_s": load_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="weights or OpenVINO folder ultralytics can load")
    p.add_argument("--imgsz", type=int, default=320, help="inference size")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of timed predict() calls")
    p.add_argument("--size", default="640x480", help="frame size WxH (as the load generator sends)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    result = measure_raw(args.model, args.imgsz, args.duration, args.size)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
