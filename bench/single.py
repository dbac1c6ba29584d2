"""`python -m bench.single`: one stream of bus.jpg through the server vs raw `model.predict` on the same image."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import DEFAULT_MODEL
from visionstream.client.connection import Connection
from visionstream.loadtest.loadgen import asset_path
from visionstream.loadtest.serverproc import start_server


def raw_predict_ms(model: str, imgsz: int, image_path: Path, calls: int, fps: float = 0.0) -> float:
    """Median wall time of `YOLO.predict` on the decoded photo (the seed's reference path), back to
    back or, with `fps`, paced like the stream (idle gaps let inference threads go cold)."""
    import cv2
    from ultralytics import YOLO

    image = cv2.imread(str(image_path))
    yolo = YOLO(model, task="detect")
    for _ in range(5):
        yolo.predict(image, imgsz=imgsz, verbose=False)
    times = []
    for _ in range(calls):
        if fps:
            time.sleep(1.0 / fps)
        t = time.perf_counter()
        yolo.predict(image, imgsz=imgsz, verbose=False)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def stream(port: int, jpeg: bytes, frames: int, fps: float
                 ) -> tuple[list[float], list[float], dict[str, float]]:
    """Paced real-time stream; returns server latency_ms and client end-to-end ms per result, and
    the median of each server stage."""
    conn = await Connection.open("127.0.0.1", port)
    await conn.hello("single")
    stages: dict[str, list[float]] = {"queue_ms": [], "decode_ms": [], "infer_ms": []}
    server: list[float] = []
    e2e: list[float] = []
    sent: dict[int, float] = {}

    async def receive() -> None:
        answered = 0
        while answered < frames:
            msg = await conn.recv()
            if msg is None:
                return
            if msg["type"] in ("result", "dropped"):
                answered += 1
            if msg["type"] == "result":
                server.append(msg["latency_ms"])
                for k, v in msg["timings"].items():
                    stages[k].append(v)
                e2e.append((time.perf_counter() - sent[msg["frame_id"]]) * 1000)

    rx = asyncio.create_task(receive())
    start = time.perf_counter()
    for i in range(frames):
        await asyncio.sleep(max(0.0, start + i / fps - time.perf_counter()))
        sent[i] = time.perf_counter()
        await conn.send_frame("single", i, jpeg)
    await asyncio.wait_for(rx, 30)
    await conn.close()
    return server, e2e, {k: statistics.median(v) for k, v in stages.items() if v}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.single", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model for both measurements")
    p.add_argument("--imgsz", type=int, default=320, help="inference size")
    p.add_argument("--frames", type=int, default=300, help="frames to stream")
    p.add_argument("--fps", type=float, default=10.0, help="stream rate (well below capacity)")
    args = p.parse_args()
    image = asset_path("bus.jpg")
    raw = raw_predict_ms(args.model, args.imgsz, image, calls=args.frames)
    raw_paced = raw_predict_ms(args.model, args.imgsz, image, calls=min(args.frames, 100), fps=args.fps)
    with tempfile.TemporaryDirectory() as tmp, start_server(Path(tmp), model=args.model, imgsz=args.imgsz) as srv:
        server, e2e, stages = asyncio.run(stream(srv.tcp_port, image.read_bytes(), args.frames, args.fps))
    print(f"raw model.predict on bus.jpg (810x1080), imgsz {args.imgsz}: median {raw:.2f} ms back to back, "
          f"{raw_paced:.2f} ms paced at {args.fps:g} calls/s")
    print(f"server, one stream of bus.jpg at {args.fps:g} fps, {len(server)} results: "
          f"latency_ms p50 {statistics.median(server):.2f} (server receive -> result), "
          f"end-to-end p50 {statistics.median(e2e):.2f} ms; stage medians {stages}")


if __name__ == "__main__":
    main()
