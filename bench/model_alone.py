"""The model alone: OpenVINO infer requests on the server's compiled graph, no pre/post-processing.

A second physical reference beside the raw `predict()` loop, run in its own process before any
server starts. It builds the graph exactly as the server does
(visionstream/server/inference/backends/openvino.py): the
YOLOv8 export cut to its head maps, reshaped to the input a 640x480 frame pads to at imgsz 320
(320 wide x 256 high), with the uint8 BGR NHWC -> float RGB NCHW conversion compiled into the
graph, and CPU_DENORMALS_OPTIMIZATION on. It then times bare infer requests on one fixed tensor
(a letterboxed bus.jpg) in two ways and keeps the faster:

- "lanes": the server's throughput compile (THROUGHPUT hint, one CPU stream per worker, the
  server's thread count) with one infer request per worker, each run back to back by its own
  Python thread, like the server's lanes;
- "async": the THROUGHPUT hint left to choose streams and threads itself, fed by an
  AsyncInferQueue of its optimal number of requests.

No letterbox, no decode, no NMS, no event loop: what is left is what the model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

FRAME_SIZE = (640, 480)


def input_pixels(model_dir: Path, imgsz: int, size: tuple[int, int]) -> tuple[Any, Any, int, bool]:
    """(ov model taking uint8 BGR pixels, the pixels it is fed, nc, cut to head maps?) for one frame
    of `size` (w, h) letterboxed the way the server does it."""
    import cv2
    import numpy as np
    import openvino as ov
    import yaml

    from visionstream.loadtest.loadgen import asset_path, load_bgr
    from visionstream.server.inference.backends.openvino import head_maps_model, pixels_input
    from visionstream.server.inference.letterbox import letterbox, rect_shape

    xml = model_dir if model_dir.suffix == ".xml" else next(model_dir.glob("*.xml"))
    meta = yaml.safe_load((xml.parent / "metadata.yaml").read_text())
    nc = len(meta["names"])
    stride = max(int(meta.get("stride", 32)), 32)
    core = ov.Core()
    model = core.read_model(str(xml))
    square = tuple(int(d) for d in model.input(0).get_partial_shape().to_shape()[2:])
    if square != (imgsz, imgsz):
        print(f"note: the export's fixed input is {square}, used instead of imgsz {imgsz} (as the server does)",
              file=sys.stderr)
    cut = head_maps_model(model, nc)
    frame = cv2.resize(load_bgr(asset_path("bus.jpg")), size, interpolation=cv2.INTER_AREA)
    if cut is not None:
        hw = rect_shape(frame.shape[:2], square, stride)  # 640x480 at 320: (256, 320)
        if hw != square:
            cut.reshape({cut.input(0): ov.PartialShape([1, 3, *hw])})
        graph = cut
    else:  # a graph the server cannot cut: it runs the square export, so do the same
        hw, graph = square, model
    padded, _gain, _pad = letterbox(frame, square, hw != square, stride)
    assert padded.shape[:2] == hw, (padded.shape, hw)
    return pixels_input(graph), np.ascontiguousarray(padded)[None], nc, cut is not None


def time_lanes(core: Any, model: Any, pixels: Any, duration: float, workers: int, threads: int) -> dict[str, Any]:
    """`workers` threads, each with its own infer request on the server's throughput compile."""
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": workers,
                           "CPU_DENORMALS_OPTIMIZATION": True}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads * workers
    compiled = core.compile_model(model, "CPU", cfg)
    requests = [compiled.create_infer_request() for _ in range(workers)]
    for req in requests:  # one at a time: the server does its first inferences serially too
        for _ in range(5):
            req.infer({0: pixels}, share_inputs=True, share_outputs=True)
    times: list[list[float]] = [[] for _ in requests]
    start = threading.Barrier(len(requests) + 1)
    stop_at = [0.0]

    def lane(k: int) -> None:
        req, mine = requests[k], times[k]
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            req.infer({0: pixels}, share_inputs=True, share_outputs=True)
            mine.append(time.perf_counter() - t)

    threads_ = [threading.Thread(target=lane, args=(k,), daemon=True) for k in range(len(requests))]
    for t in threads_:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads_:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x * 1000.0 for lane_times in times for x in lane_times)
    return {
        "mode": "lanes",
        "config": {k: str(v) for k, v in cfg.items()},
        "requests": len(requests),
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "inference_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "calls": len(flat),
        "seconds": wall,
        "fps": len(flat) / wall,
        "infer_ms_median": statistics.median(flat),
        "infer_ms_p90": flat[int(0.9 * (len(flat) - 1))],
    }


def time_async(core: Any, model: Any, pixels: Any, duration: float) -> dict[str, Any]:
    """The THROUGHPUT hint's own choice of streams, kept busy by an AsyncInferQueue."""
    import openvino as ov

    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "CPU_DENORMALS_OPTIMIZATION": True}
    compiled = core.compile_model(model, "CPU", cfg)
    n = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    queue = ov.AsyncInferQueue(compiled, n)
    done = [0]
    queue.set_callback(lambda _req, _data: done.__setitem__(0, done[0] + 1))
    for _ in range(5 * n):
        queue.start_async({0: pixels}, share_inputs=True)
    queue.wait_all()
    done[0] = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < duration:
        queue.start_async({0: pixels}, share_inputs=True)  # blocks until a request is idle
    queue.wait_all()
    wall = time.perf_counter() - t0
    calls = done[0]
    return {
        "mode": "async",
        "config": {k: str(v) for k, v in cfg.items()},
        "requests": n,
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "inference_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "calls": calls,
        "seconds": wall,
        "fps": calls / wall,
        # n requests in flight on average: each took about n / fps.
        "infer_ms_median": 1000.0 * n / (calls / wall) if calls else None,
    }


def measure_model_alone(model: str, imgsz: int, duration: float, size: tuple[int, int] = FRAME_SIZE,
                        workers: int = 2, threads: int = 0) -> dict[str, Any]:
    import openvino as ov

    graph, pixels, _nc, cut = input_pixels(Path(model), imgsz, size)
    core = ov.Core()
    cores = os.cpu_count() or 1
    per_worker = threads or max(1, cores // workers)  # the server's default: cores divided by workers
    lanes = time_lanes(core, graph, pixels, duration, workers, per_worker)
    async_ = time_async(core, graph, pixels, duration)
    best = max((lanes, async_), key=lambda r: r["fps"])
    return {
        "model": model,
        "input": {"shape_nhwc": list(pixels.shape), "dtype": str(pixels.dtype), "frame": f"bus.jpg {size[0]}x{size[1]}",
                  "head_maps_cut": cut, "pixels_in_graph": True},
        "modes": {"lanes": lanes, "async": async_},
        "best_mode": best["mode"],
        "fps": best["fps"],
        "infer_ms_median": best["infer_ms_median"],
        "openvino": ov.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_alone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="OpenVINO export folder (or its .xml)")
    p.add_argument("--imgsz", type=int, default=320, help="inference size (an export's fixed input wins)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of timed inferences per mode")
    p.add_argument("--size", default="640x480", help="camera frame WxH whose padded shape is used")
    p.add_argument("--workers", type=int, default=2, help="the server's --workers: requests in the 'lanes' mode")
    p.add_argument("--threads", type=int, default=0, help="the server's --threads (0: cores divided by workers)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    from visionstream.loadtest.loadgen import parse_size

    size = parse_size(args.size) or FRAME_SIZE
    result = measure_model_alone(args.model, args.imgsz, args.duration, size, args.workers, args.threads)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
