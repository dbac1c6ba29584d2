"""The dashboard's routes: the page itself (static files in the package), /streams, latest.jpg, /stats/history."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Final

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from visionstream.server.history import History
from visionstream.server.latest import GONE_AFTER_S, LatestFrames
from visionstream.server.stats import Stats

DASHBOARD_DIR: Final = Path(__file__).with_name("dashboard")
# The page loads nothing but its own files, and talks to nobody but this server.
PAGE_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Percentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class StreamInfo(BaseModel):
    """One stream: its newest connection's counters (a gone one's last), and its newest processed frame."""

    name: str
    connected: bool = Field(description="false for a stream that left (kept for `gone_after_s`)")
    lossless: bool
    received: int
    processed: int
    dropped: int
    in_flight: int
    drops_by_reason: dict[str, int]
    fps: float = Field(description="results per second over the last 5 s")
    last_latency_ms: float | None
    latency_ms: Percentiles = Field(description="over its last 256 results")
    last_frame_id: int | None = Field(description="the frame `latest.jpg` serves; null before its first result")
    image_size: list[int] | None = Field(None, description="[w, h] of that frame")
    detections: int | None = Field(None, description="boxes found on that frame")
    tracks: dict[str, int] | None = Field(None, description="with --track: distinct confirmed tracks by label")


class StreamsReply(BaseModel):
    streams: list[StreamInfo]
    gone_after_s: float = Field(description="seconds a stream that left stays listed (disconnected)")
    tracking: str = Field(description="--track: off, bytetrack or botsort")


class HistorySample(BaseModel):
    t: float = Field(description="server wall clock (s)")
    fps: float = Field(description="results per second since the previous sample")
    drops_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    queue: int
    lanes_busy: int
    lanes: int
    cpu: float | None = Field(description="system CPU %, all cores")
    process_cpu: float = Field(description="the server process, % of one core")
    ram: float = Field(description="system RAM %")
    rss_mb: float
    streams: int = Field(description="connected streams")


class HistoryReply(BaseModel):
    every_s: float
    span_s: float
    samples: list[HistorySample]


def dashboard_routes(app: FastAPI, stats: Stats, latest: LatestFrames, history: History | None,
                     require_token: Callable[[Request], None]) -> None:
    """Mount the page (open: it holds no data and asks for the token itself) and its token-guarded data."""
    page = APIRouter(tags=["dashboard"])
    data = APIRouter(tags=["dashboard"], dependencies=[Depends(require_token)])

    @page.get("/", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
    async def index() -> FileResponse:
        """The live dashboard: one tile per stream (its latest frame with boxes) and the server's health."""
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @data.get("/streams", response_model=StreamsReply)
    async def streams() -> StreamsReply:
        """Every live stream, and those that left less than `gone_after_s` ago with a frame still kept."""
        now = stats.clock()
        frames = latest.entries()
        out: dict[str, StreamInfo] = {}
        live = {st.name: st for st in stats.streams.values()}  # a newer connection for a name comes later: it wins
        gone = {name: e.stats for name, e in frames.items() if name not in live}
        for name, st in (*gone.items(), *live.items()):
            snap = st.snapshot(now)
            entry = frames.get(name)
            out[name] = StreamInfo(
                name=name, **snap,
                last_frame_id=None if entry is None else entry.frame.frame_id,
                image_size=None if entry is None else list(entry.image_size),
                detections=None if entry is None else len(entry.detections),
                tracks=dict(st.tracks) if stats.tracking != "off" else None)
        return StreamsReply(streams=sorted(out.values(), key=lambda s: s.name), gone_after_s=GONE_AFTER_S,
                            tracking=stats.tracking)

    @data.get("/streams/{name}/latest.jpg", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "The stream's newest processed frame: the bytes the "
              "client sent when it sent a JPEG, else encoded once to JPEG. `X-Frame-Id` names the frame, "
              "`X-Image-Size` is its `w,h`, and `X-Detections` holds its detections as compact JSON (those of "
              "its `result`), so a page draws the boxes of exactly this frame."},
        404: {"description": "no such stream, or none of its frames has been processed yet"}})
    async def latest_jpg(name: str) -> Response:
        """The latest frame the server processed for stream `name`."""
        entry = latest.get(name)
        if entry is None:
            raise HTTPException(status_code=404, detail=f"no frame of stream '{name}'")
        try:
            body = await latest.jpeg(entry)
        except ValueError as exc:  # it decoded in the lane, so this is the server's fault: say so, once
            raise HTTPException(status_code=500, detail=f"frame of stream '{name}' could not be encoded: {exc}"
                                ) from exc
        return Response(body, media_type="image/jpeg", headers={
            "X-Frame-Id": str(entry.frame.frame_id), "X-Image-Size": "{},{}".format(*entry.image_size),
            # ASCII only (header values are latin-1): labels with other letters come \u-escaped
            "X-Detections": json.dumps(entry.detections, separators=(",", ":")), "Cache-Control": "no-store"})

    @data.get("/stats/history", response_model=HistoryReply)
    async def stats_history() -> HistoryReply | dict:
        """The last few minutes of throughput, latency, queue, lanes, CPU and RAM, one sample every few s."""
        if history is None:
            return {"every_s": 0.0, "span_s": 0.0, "samples": []}
        return history.to_dict()

    app.include_router(page)
    app.include_router(data)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
