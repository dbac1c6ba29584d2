"""Live visualizer: stream frames to the server and draw each frame's own detections on it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from visionstream.cli.common import (
    TOKEN_ENV,
    HelpFormatter,
    add_tls_flags,
    exit_code,
    resolve_token,
    setup_logging,
    tls_context,
    with_stop_signals,
)
from visionstream.client.connection import ClientError
from visionstream.client.sources import FrameSource, SourceError, SourceFrame, open_source
from visionstream.client.streamer import Pending, ResultLog, StreamConfig, Streamer
from visionstream.client.visualize import (
    DisplayError,
    FrameBuffer,
    RateMeter,
    TrackTrails,
    Viewer,
    draw_detections,
    draw_overlay,
    quiet_qt_environment,
)
from visionstream.wire.errors import InvalidMessage
from visionstream.wire.protocol import validate_stream_name

log = logging.getLogger("visionstream.visualizer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client_visualizer.py",
        description="Send frames to a visionstream server and show them with their detections drawn\n"
                    "(boxes, label, confidence, fps and latency). Press q in the window to quit.",
        formatter_class=HelpFormatter,
        epilog="example:\n  python client_visualizer.py --host 127.0.0.1 --port 9000 "
               "--stream-name webcam_viz --fps 10",
    )
    p.add_argument("--host", default="127.0.0.1", help="server host")
    p.add_argument("--port", type=int, default=9000, help="server TCP port")
    p.add_argument("--token", default=None, help=f"auth token (default: ${TOKEN_ENV} if set, else none)")
    add_tls_flags(p)
    p.add_argument("--stream-name", "--stream", dest="stream", default="webcam_viz",
                   help="stream name (letters, digits, _ . -)")
    p.add_argument("--source", default="0", help="camera index, video file or image folder")
    p.add_argument("--loop", action="store_true", help="restart a video file or folder when it ends")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second to send")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: when the source ends, on q or Ctrl-C)")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality, 1-100")
    p.add_argument("--allow-drops", action="store_true",
                   help="video/folder: let the server drop frames to stay real-time (default there: "
                        "lossless, every frame drawn); a webcam always allows drops")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds to wait for outstanding results after the source ends")
    p.add_argument("--headless", action="store_true",
                   help="no window; needs --save (for results only, use client.py)")
    p.add_argument("--save", default=None, help="write the annotated video here (mp4v; .avi uses MJPG)")
    p.add_argument("--buffer", type=int, default=64,
                   help="sent frames kept for drawing their results; older ones are forgotten")
    p.add_argument("--results-dir", default="results",
                   help="save every result to <dir>/<stream>.jsonl, as client.py does")
    p.add_argument("--no-save", action="store_true", help="do not write the results file")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh results file instead of appending this run (each run starts with "
                        "a {\"type\": \"run\"} line either way)")
    p.add_argument("--log-dir", default="logs", help="folder for client_visualizer.log ('' to disable)")
    p.add_argument("--quiet", action="store_true", help="summary only on the console")
    return p


class Annotator:
    """Keeps sent frames by frame_id and, per reply, draws that frame's detections and hands it on."""

    def __init__(self, viewer: Viewer, buffer: FrameBuffer) -> None:
        self.viewer = viewer
        self.buffer = buffer
        self.rate = RateMeter()
        self.drawn = 0
        self.missing = 0  # replies whose frame had already left the buffer
        self.dropped = 0
        self.trails = TrackTrails()  # results arrive about in frame order; a trail is a short, approximate path
        self.error: Exception | None = None

    def on_sent(self, frame_id: int, frame: SourceFrame) -> None:
        self.buffer.put(frame_id, frame.image)

    def on_reply(self, msg: dict[str, Any], pending: Pending | None, e2e_ms: float | None) -> None:
        image = self.buffer.pop(msg.get("frame_id", -1))
        if msg.get("type") != "result":
            self.dropped += 1
            return
        if image is None:
            self.missing += 1
            return
        self.rate.tick()
        annotated = draw_detections(image, msg.get("detections") or [], self.trails)
        server_ms = msg.get("latency_ms")
        lines = [
            f"fps {self.rate.rate():4.1f}   frame {msg.get('frame_id')}",
            f"e2e {e2e_ms:5.0f} ms" + (f"   server {server_ms:4.0f} ms"
                                        if isinstance(server_ms, (int, float)) else ""),
            f"{len(msg.get('detections') or [])} detections   dropped {self.dropped}",
        ]
        draw_overlay(annotated, lines)
        try:
            self.viewer.show(annotated)
        except DisplayError as exc:  # raised inside the receiver; remembered and reported by main
            self.error = exc
            return
        self.drawn += 1


async def pump_window(viewer: Viewer, streamer: Streamer, annotator: Annotator) -> None:
    """Keeps the window responsive and turns q / closing it (or a write failure) into a stop."""
    while True:
        if viewer.poll_quit():
            streamer.quit()
            return
        if annotator.error is not None:
            streamer.quit()
            return
        await asyncio.sleep(0.02)


async def run(args: argparse.Namespace, source: FrameSource, viewer: Viewer) -> int:
    lossless = source.lossless_default and not args.allow_drops
    cfg = StreamConfig(host=args.host, port=args.port, stream=args.stream, fps=args.fps,
                       token=resolve_token(args.token), lossless=lossless, quality=args.quality,
                       duration=args.duration, grace=args.grace, tls=args.tls_context)
    annotator = Annotator(viewer, FrameBuffer(args.buffer))
    results = None if args.no_save else ResultLog(Path(args.results_dir) / f"{args.stream}.jsonl",
                                                  overwrite=args.overwrite)
    streamer = Streamer(cfg, source, results=results, on_sent=annotator.on_sent, on_reply=annotator.on_reply)
    pump = asyncio.create_task(pump_window(viewer, streamer, annotator))
    try:
        stats = await with_stop_signals(streamer.run(), streamer.interrupt, streamer.stop)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        if results is not None:
            results.close()
    print(stats.format())
    where = f", saved {viewer.frames_written} to {viewer.save}" if viewer.save else ""
    print(f"  drawn:         {annotator.drawn} frame(s){where}"
          + (f"; {annotator.missing} result(s) arrived after their frame left the buffer"
             if annotator.missing else ""), flush=True)
    return exit_code(log, annotator.error, stats.failure)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.fps > 0:
        parser.error("--fps must be positive")
    if args.buffer < 1:
        parser.error("--buffer must be at least 1")
    if args.headless and not args.save:
        # Neither a window nor a video: the run would draw for nobody.
        parser.exit(2, f"{parser.prog}: error: --headless shows no window: add --save FILE.mp4 for the "
                       f"annotated video (client.py streams for results only)\n")
    try:
        args.tls_context = tls_context(args)
    except ClientError as exc:
        parser.error(str(exc))
    setup_logging("client_visualizer", log_dir=args.log_dir, quiet=args.quiet)
    viewer = None
    try:
        validate_stream_name(args.stream)
        if not args.headless:
            # Before the first window: Qt reads these once, when OpenCV starts it.
            os.environ.update(quiet_qt_environment(dict(os.environ)))
        viewer = Viewer(window=None if args.headless else f"visionstream: {args.stream}",
                        save=args.save, fps=args.fps)
        with open_source(args.source, loop=args.loop) as source:
            return asyncio.run(run(args, source, viewer))
    except InvalidMessage as exc:
        log.error("--stream-name: %s", exc)
    except (SourceError, ClientError, DisplayError) as exc:
        log.error("%s", exc)
    except KeyboardInterrupt:  # only where signal handlers are unavailable (Windows)
        return 130
    finally:
        if viewer is not None:
            viewer.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
