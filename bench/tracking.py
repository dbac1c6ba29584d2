"""Tracking cost: throughput at saturation with --track on vs off (alternating runs), and the tracker step alone."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.lossless import lossless_stream
from visionstream.loadtest.serverproc import COCO_MODEL, start_server


def zidane_video(n: int = 80, step: int = 4) -> list[bytes]:
    """A 640x360 window sliding across zidane.jpg (as the tracking tests make it)."""
    import importlib.util

    import cv2

    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None
    img = cv2.resize(cv2.imread(str(Path(spec.origin).parent / "assets" / "zidane.jpg")), (960, 540))
    out = []
    for i in range(n):
        x, y = min(i * step, 320), min(i * step // 4, 180)
        out.append(cv2.imencode(".jpg", img[y:y + 360, x:x + 640], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def saturate(track: str, video: list[bytes], streams: int, duration: float, warmup: float, workdir: Path) -> float:
    """Results a second from one server (default flags but --track) under `streams` lossless streams."""
    extra = ["--track", track]
    with start_server(workdir, model=str(COCO_MODEL), imgsz=320, extra=extra) as srv:
        t0 = time.perf_counter()
        until = t0 + warmup + duration
        counts: list[float] = []
        threads = [threading.Thread(target=lossless_stream, args=(
            srv.tcp_port, f"cam{i}", video, 2, lambda: time.perf_counter() >= until,
            lambda _msg: counts.append(time.perf_counter())))
                   for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + warmup + 60)
    n = sum(1 for c in counts if t0 + warmup <= c <= until)
    return n / duration


def step_cost(video: list[bytes], kind: str, gmc: str | None = None, frames: int = 400) -> float:
    """µs per tracker step on the detections of the video (two people), outside the server."""
    import cv2
    import numpy as np

    from visionstream.server.inference.api import DetectorSpec, load_detector
    from visionstream.server.tracking import StreamTracker, TrackerSettings, load_tracker_settings

    det = load_detector(DetectorSpec(str(COCO_MODEL), imgsz=320, threads=1), str(COCO_MODEL))
    images = [cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_COLOR) for v in video]
    dets = [det.detect(img) for img in images]
    settings = load_tracker_settings(kind)
    assert settings is not None
    if gmc is not None:
        settings = TrackerSettings(settings.kind, {**settings.args, "gmc_method": gmc})
    tracker = StreamTracker(settings, det.names)
    t0 = time.perf_counter()
    for i in range(frames):
        k = i % len(video)
        tracker.step(i, images[k], [dict(d) for d in dets[k]], float(i))
    return (time.perf_counter() - t0) / frames * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs, alternating (order flips each round)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--streams", type=int, default=4, help="lossless streams, each keeping 2 frames outstanding")
    p.add_argument("--track", default="bytetrack", choices=["bytetrack", "botsort"])
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    a = p.parse_args(argv)
    if not COCO_MODEL.exists():
        print(f"{COCO_MODEL} not found (VISIONSTREAM_MODELS)", file=sys.stderr)
        return 2
    video = zidane_video()
    runs: dict[str, list[float]] = {"off": [], a.track: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ["off", a.track] if r % 2 == 0 else [a.track, "off"]
            for mode in order:
                fps = saturate(mode, video, a.streams, a.duration, a.warmup, Path(tmp) / f"{mode}-{r}")
                runs[mode].append(fps)
                print(f"round {r + 1}: --track {mode:9s} {fps:7.1f} results/s", flush=True)
    pairs = [on / off for on, off in zip(runs[a.track], runs["off"], strict=True)]
    costs = {"bytetrack_step_us": step_cost(video, "bytetrack"), "botsort_step_us": step_cost(video, "botsort"),
             "botsort_sparseOptFlow_step_us": step_cost(video, "botsort", "sparseOptFlow", frames=160)}
    out = {"runs": runs, "ratio_per_round": pairs, "ratio_median": statistics.median(pairs),
           "throughput_cost_pct": round(100 * (1 - statistics.median(pairs)), 1), **costs}
    print(f"on/off throughput: median ratio {out['ratio_median']:.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in pairs)}), cost {out['throughput_cost_pct']} %")
    for k, v in costs.items():
        print(f"{k}: {v:.0f} µs per frame")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
