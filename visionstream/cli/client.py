"""Unified streaming client: send webcam, video, image-folder or synthetic frames to a visionstream server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visionstream.cli.common import (
    HelpFormatter,
    add_tls_flags,
    exit_code,
    resolve_token,
    setup_logging,
    tls_context,
    with_stop_signals,
)
from visionstream.client.annotate import AnnotatedImages, AnnotatedSink, AnnotatedVideo
from visionstream.client.connection import ClientError
from visionstream.client.sources import (
    FolderSource,
    FrameSource,
    SourceError,
    SyntheticSource,
    UrlSource,
    VideoFileSource,
    WebcamSource,
    open_source,
)
from visionstream.client.streamer import ResultLog, StreamConfig, Streamer
from visionstream.wire.errors import DisplayError, InvalidMessage
from visionstream.wire.protocol import TOKEN_ENV, validate_stream_name

log = logging.getLogger("visionstream.client")

MODES = {"0": "capture", "capture": "capture", "webcam": "capture", "video": "capture",
         "1": "folder", "folder": "folder", "2": "synthetic", "synthetic": "synthetic"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="client.py",
        description="Stream frames to a visionstream server and save every result to\n"
                    "<results-dir>/<stream>.jsonl. Prints a summary at the end; Ctrl-C stops early.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  python client.py --mode 2 --stream syn1 --fps 10 --duration 20\n"
               "  python client.py --mode 0 --source 0 --stream webcam_1 --fps 15\n"
               "  python client.py --mode 0 --source video.mp4 --stream vid1 --fps 10\n"
               "  python client.py --source rtsp://user:pass@camera.local/stream1 --stream door --fps 10\n"
               "  python client.py --mode 1 --folder images/ --stream img_stream --fps 5",
    )
    src = p.add_argument_group("source")
    src.add_argument("--mode", choices=sorted(MODES), default=None,
                     help="0 = webcam or video file (--source), 1 = image folder (--folder), "
                          "2 = synthetic noise frames; default: 1 if --folder is given, 0 if --source is "
                          "given, else 2")
    src.add_argument("--source", default=None,
                     help="mode 0: camera index (0, 1, ...), video file path, or URL (http, https, rtsp, "
                          "rtsps, rtmp: an http(s) video with a frame count is a file, anything else a live "
                          "stream, reopened for up to --reconnect-for seconds when it drops) (default for "
                          "mode 0: 0)")
    src.add_argument("--folder", default=None, help="mode 1: folder of images, sent in name order")
    src.add_argument("--loop", action="store_true", help="restart a video file or folder when it ends")
    src.add_argument("--width", type=int, default=640, help="synthetic frame width in pixels")
    src.add_argument("--height", type=int, default=480, help="synthetic frame height in pixels")

    stream = p.add_argument_group("streaming")
    stream.add_argument("--host", default="127.0.0.1", help="server host")
    stream.add_argument("--port", type=int, default=9000, help="server TCP port")
    stream.add_argument("--token", default=None,
                        help=f"auth token for the server (default: ${TOKEN_ENV} if set, else none)")
    add_tls_flags(stream)
    stream.add_argument("--stream", default=None,
                        help="stream name (letters, digits, _ . -); default: derived from the source")
    stream.add_argument("--fps", type=float, default=10.0,
                        help="frames per second to send, on a fixed schedule (late frames skip ahead)")
    stream.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds (default: when the source ends or on Ctrl-C)")
    stream.add_argument("--max-frames", type=int, default=None,
                        help="stop after sending this many frames (default: no limit)")
    stream.add_argument("--encoding", choices=["jpeg", "raw"], default="jpeg",
                        help="jpeg = compressed; raw = uncompressed BGR bytes (more bandwidth, no artefacts)")
    stream.add_argument("--quality", type=int, default=80, help="JPEG quality, 1-100")
    stream.add_argument("--allow-drops", action="store_true",
                        help="folder/video: let the server drop frames to stay real-time instead of the "
                             "default lossless mode (webcam and synthetic always allow drops)")
    stream.add_argument("--grace", type=float, default=5.0,
                        help="seconds to wait for outstanding results after the last frame")
    stream.add_argument("--connect-retries", type=int, default=3,
                        help="first connection only: attempts after the first, with exponential backoff "
                             "from 0.5s, so a wrong --port fails within seconds")
    stream.add_argument("--reconnect-for", type=float, default=60.0, metavar="SECONDS",
                        help="after losing the connection mid-stream, keep trying to reconnect for this long "
                             "(backoff 0.25s doubling to 2s, with jitter); also how long a live URL source "
                             "that dropped is reopened; 0 = never")
    stream.add_argument("--reconnects", type=int, default=None,
                        help="reconnect after at most this many lost connections in one run "
                             "(default: no limit; --reconnect-for bounds each outage)")

    out = p.add_argument_group("output")
    out.add_argument("--results-dir", default="results", help="folder for <stream>.jsonl result files")
    out.add_argument("--no-save", action="store_true", help="do not write the results file")
    out.add_argument("--overwrite", action="store_true",
                     help="start a fresh results file instead of appending this run (each run starts with "
                          "a {\"type\": \"run\"} line either way)")
    out.add_argument("--save-annotated", metavar="DIR", default=None,
                     help="also write each frame drawn with its detections: folder mode one image per input "
                          "(same name), else one video DIR/<stream>.mp4 (default: off)")
    out.add_argument("--log-dir", default="logs", help="folder for client.log ('' to disable)")
    out.add_argument("--quiet", action="store_true", help="no progress bar or status lines; summary only")
    out.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def default_stream_name(source: FrameSource) -> str:
    if isinstance(source, WebcamSource):
        base = f"webcam_{source.index}"
    elif isinstance(source, VideoFileSource):
        base = source.path.stem
    elif isinstance(source, UrlSource):
        parts = urlsplit(source.url)
        base = Path(parts.path).stem or (parts.hostname or "url")
    elif isinstance(source, FolderSource):
        base = source.folder.resolve().name or "folder"
    else:
        base = "synthetic"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".-")[:128] or "stream"


def make_source(args: argparse.Namespace) -> FrameSource:
    mode = MODES[args.mode] if args.mode else ("folder" if args.folder else
                                               "capture" if args.source else "synthetic")
    if mode == "folder":
        folder = args.folder or args.source
        if not folder:
            raise SourceError("--mode 1 needs --folder DIR")
        return FolderSource(folder, loop=args.loop)
    if mode == "capture":
        return open_source(args.source if args.source is not None else "0", loop=args.loop,
                           reopen_for=args.reconnect_for)
    return SyntheticSource(args.width, args.height)


def open_annotated(args: argparse.Namespace, source: FrameSource, name: str) -> AnnotatedSink | None:
    """--save-annotated: images for a folder, one video at the source's fps (else --fps) otherwise."""
    if not args.save_annotated:
        return None
    if isinstance(source, FolderSource):
        return AnnotatedImages(args.save_annotated)
    fps = getattr(source, "fps", 0.0) or args.fps
    return AnnotatedVideo(args.save_annotated, name, fps)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.fps > 0:
        p.error("--fps must be positive")
    if not 1 <= args.quality <= 100:
        p.error("--quality must be within 1-100")
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be positive")
    if args.grace < 0 or args.connect_retries < 0 or args.reconnect_for < 0 or (args.reconnects or 0) < 0:
        p.error("--grace, --connect-retries, --reconnect-for and --reconnects must not be negative")
    try:
        args.tls_context = tls_context(args)
    except ClientError as exc:
        p.error(str(exc))


async def stream(args: argparse.Namespace, source: FrameSource) -> int:
    name = args.stream or default_stream_name(source)
    lossless = source.lossless_default and not args.allow_drops
    cfg = StreamConfig(
        host=args.host, port=args.port, stream=name, fps=args.fps, token=resolve_token(args.token),
        lossless=lossless, encoding=args.encoding, quality=args.quality, duration=args.duration,
        max_frames=args.max_frames, grace=args.grace, connect_retries=args.connect_retries,
        reconnect_for=args.reconnect_for, reconnects=args.reconnects, tls=args.tls_context,
        # Finite sources show a progress bar instead of periodic status lines.
        status_every=0.0 if args.quiet or source.total else 5.0,
    )
    results = None if args.no_save else ResultLog(Path(args.results_dir) / f"{name}.jsonl",
                                                  overwrite=args.overwrite)
    annotated = open_annotated(args, source, name)
    progress = None
    redirect: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if source.total and not args.quiet:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        progress = tqdm(total=source.total, unit="frame", desc=name, file=sys.stderr, dynamic_ncols=True)
        # Log lines go above the bar instead of being torn through it.
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("visionstream")])
    try:
        with redirect:
            streamer = Streamer(cfg, source, results=results, progress=progress,
                                on_sent=annotated.on_sent if annotated else None,
                                on_reply=annotated.on_reply if annotated else None)
            stats = await with_stop_signals(streamer.run(), streamer.interrupt, streamer.stop)
    finally:
        if progress is not None:
            progress.close()
        if results is not None:
            results.close()
        if annotated is not None:
            annotated.close()
    print(stats.format(), flush=True)
    if annotated is not None:
        print(f"  annotated:     {annotated.describe()}", flush=True)
    return exit_code(log, annotated.error if annotated is not None else None, stats.failure)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_logging("client", log_dir=args.log_dir, level="debug" if args.verbose else "info", quiet=args.quiet)
    try:
        if args.stream is not None:
            validate_stream_name(args.stream)
        with make_source(args) as source:
            return asyncio.run(stream(args, source))
    except InvalidMessage as exc:
        log.error("--stream: %s", exc)
    except (SourceError, ClientError, DisplayError) as exc:
        log.error("%s", exc)
    except KeyboardInterrupt:  # only where signal handlers are unavailable (Windows)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
