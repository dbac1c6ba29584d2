"""--executor threads vs ray here (throughput at saturation, p50/p99 paced), and the front's dispatch ceiling."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lossless import lossless_stream
from visionstream.loadtest.loadgen import asset_path
from visionstream.loadtest.serverproc import COCO_MODEL, start_server
from visionstream.measure import percentile

MODES = {  # label -> server flags (besides --workers)
    "threads": [],
    "ray": ["--executor", "ray"],
    "ray-lanes2": ["--executor", "ray", "--lanes", "2"],
}


def camera_jpeg() -> bytes:
    """bus.jpg at a camera's 640x480, as the load generator sends it."""
    import cv2

    img = cv2.resize(cv2.imread(str(asset_path("bus.jpg"))), (640, 480))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def _record(out: list[tuple[float, float, float | None, float]]) -> Callable[[dict[str, Any]], None]:
    """A result's (time, latency_ms, transfer_ms, infer_ms), appended to `out`."""
    def record(msg: dict[str, Any]) -> None:
        t = msg["timings"]
        out.append((time.perf_counter(), msg["latency_ms"], t.get("transfer_ms"), t["infer_ms"]))
    return record


def run(flags: list[str], workers: int, streams: int, window: int, fps: float, duration: float, warmup: float,
        workdir: Path, placeholder: bool = False) -> dict[str, Any]:
    """One server, `streams` lossless streams for warmup + duration s: results/s and latency percentiles."""
    extra = [*flags, *(["--placeholder"] if placeholder else [])]
    jpeg = camera_jpeg()
    with start_server(workdir, model=str(COCO_MODEL), imgsz=320, workers=workers, extra=extra, timeout=240) as srv:
        t0 = time.perf_counter()
        until = t0 + warmup + duration
        out: list[tuple[float, float, float | None, float]] = []
        threads = [threading.Thread(target=lossless_stream, args=(
            srv.tcp_port, f"cam{i}", [jpeg], window, lambda: time.perf_counter() >= until, _record(out), fps))
                   for i in range(streams)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        front_cpu(srv.base_url)  # starts the front's CPU measurement (/stats: since the previous call)
        time.sleep(max(0.0, until - time.perf_counter()))
        cpu = front_cpu(srv.base_url)
        for t in threads:
            t.join(duration + warmup + 120)
    kept = [r for r in out if t0 + warmup <= r[0] <= until]
    lat = sorted(r[1] for r in kept)
    transfer = sorted(r[2] for r in kept if r[2] is not None)
    return {"fps": round(len(kept) / duration, 1), "results": len(kept),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "transfer_p50_ms": percentile(transfer, 50) if transfer else None,
            "infer_p50_ms": percentile([r[3] for r in kept], 50), "front_cpu_pct": cpu}


def front_cpu(base_url: str) -> float:
    """The front process's CPU % (100 = one core) since the previous /stats."""
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as r:
        return float(json.loads(r.read())["process"]["cpu_percent"])


def _fmt(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    return (f"{r['fps']:7.1f} results/s  p50 {ms(r['p50_ms'])} ms  p99 {ms(r['p99_ms'])} ms  "
            f"infer p50 {ms(r['infer_p50_ms'])} ms  transfer p50 {ms(r['transfer_p50_ms'])} ms  "
            f"front CPU {r['front_cpu_pct']:.0f} %")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.executors", description=__doc__)
    p.add_argument("--modes", default="threads,ray", help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the order of the modes flips each round")
    p.add_argument("--workers", type=int, default=2, help="--workers (threads: workers; ray: actors)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    p.add_argument("--streams", type=int, default=4, help="lossless streams at saturation, 2 frames outstanding each")
    p.add_argument("--paced-fps", type=float, default=4.0, help="one paced stream at this rate for p50/p99 (0: skip)")
    p.add_argument("--front", action="store_true",
                   help="also the front's ceiling: --executor ray --placeholder, --front-streams lossless streams")
    p.add_argument("--front-streams", type=int, default=16, help="streams for --front (4 outstanding each)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    a = p.parse_args(argv)
    if not COCO_MODEL.exists():
        print(f"{COCO_MODEL} not found (VISIONSTREAM_MODELS)", file=sys.stderr)
        return 2
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        print(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {"saturated": [], "paced": []} for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                sat = run(MODES[mode], a.workers, a.streams, 2, 0.0, a.duration, a.warmup, Path(tmp) / f"{mode}-s{r}")
                runs[mode]["saturated"].append(sat)
                print(f"round {r + 1}: {mode:10s} saturated {_fmt(sat)}", flush=True)
                if a.paced_fps:
                    paced = run(MODES[mode], a.workers, 1, 1, a.paced_fps, a.duration, a.warmup,
                                Path(tmp) / f"{mode}-p{r}")
                    runs[mode]["paced"].append(paced)
                    print(f"round {r + 1}: {mode:10s} paced {a.paced_fps:g}/s {_fmt(paced)}", flush=True)
        front = None
        if a.front:
            front = run(MODES["ray-lanes2"], a.workers, a.front_streams, 4, 0.0, a.duration, a.warmup,
                        Path(tmp) / "front", placeholder=True)
            print(f"front ceiling (--executor ray --lanes 2 --placeholder, {a.workers} actor(s), "
                  f"{a.front_streams} streams): {_fmt(front)}", flush=True)
            if front["front_cpu_pct"] > 0:  # what one core alone would carry at the same cost per frame
                front["per_core_fps"] = round(front["fps"] * 100.0 / front["front_cpu_pct"], 1)
                print(f"the front spent {front['front_cpu_pct']:.0f} % of a core on {front['fps']:.0f} frames/s: "
                      f"~{front['per_core_fps']:.0f} frames/s per core of front CPU", flush=True)
    summary: dict[str, Any] = {}
    for mode in modes:
        summary[mode] = {kind: {k: statistics.median(x[k] for x in rs) for k in ("fps", "p50_ms", "p99_ms")
                                if all(x[k] is not None for x in rs)} for kind, rs in runs[mode].items() if rs}
    if "threads" in summary and len(modes) > 1:
        base = summary["threads"]["saturated"]["fps"]
        for mode in modes[1:] if modes[0] == "threads" else [m for m in modes if m != "threads"]:
            ratio = summary[mode]["saturated"]["fps"] / base
            summary[mode]["throughput_vs_threads"] = round(ratio, 3)
            print(f"{mode} / threads throughput (medians): {ratio:.3f}")
    print(json.dumps(summary, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps({"runs": runs, "summary": summary, "front": front}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
