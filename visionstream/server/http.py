"""FastAPI control plane factory: /health, /stats, /metrics, the /ws result broadcast and the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from visionstream.server.auth import token_ok
from visionstream.server.broadcast import Broadcaster
from visionstream.server.dashboard_http import dashboard_routes
from visionstream.server.history import History
from visionstream.server.latest import LatestFrames
from visionstream.server.stats import Stats


def _presented_token(headers, query) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-token") or query.get("token")


def create_app(stats: Stats, broadcaster: Broadcaster, token: str | None = None, max_viewers: int = 32,
               latest: LatestFrames | None = None, history: History | None = None) -> FastAPI:
    """The control plane; /health, /docs and the dashboard page stay open, the rest need the token when one
    is set. `latest` (the replies' newest frame per stream) and `history` feed the dashboard."""
    # /docs and /redoc with Swagger UI and ReDoc served from the package (fastapi-offline), not a CDN:
    # the API docs render on a machine without internet. No validator: Swagger UI would ask an outside one.
    app: FastAPI = FastAPIOffline(
        title="visionstream control plane",
        description="Health, statistics, Prometheus metrics, a live WebSocket feed of detections, and a "
                    "dashboard at `/` (each stream's latest frame with its boxes, the server's health).",
        version="1",
        swagger_ui_parameters={"validatorUrl": None},
    )

    def require_token(request: Request) -> None:
        if not token_ok(token, _presented_token(request.headers, request.query_params)):
            stats.error("auth")
            raise HTTPException(status_code=401, detail="missing or wrong token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        """Liveness and readiness: `ready` turns true once models are loaded and frames are accepted."""
        return {"status": "ok", "model": stats.model, "ready": stats.ready}

    @app.get("/stats", response_model=None)
    async def get_stats(request: Request) -> dict | HTMLResponse:
        """Counters, rates, latency percentiles, per-stream figures, CPU and RAM (JSON; a browser,
        asking for text/html, gets the same JSON pretty-printed in a page)."""
        require_token(request)
        snapshot = stats.snapshot()
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(_stats_page(snapshot))
        return snapshot

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        require_token(request)
        return Response(generate_latest(stats.registry), media_type=CONTENT_TYPE_LATEST)

    dashboard_routes(app, stats, latest if latest is not None else LatestFrames(), history, require_token)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, stream: str | None = None, every_ms: int = 0) -> None:
        """Every result as one JSON text message; `?stream=NAME` keeps one stream only; `?every_ms=N` at most
        one result per stream every N ms, the newest (the dashboard's way to follow many streams cheaply)."""
        if not token_ok(token, _presented_token(websocket.headers, websocket.query_params)):
            stats.error("auth")
            await websocket.close(code=1008, reason="missing or wrong token")
            return
        if stats.ws_clients >= max_viewers:  # each viewer costs a queue and a copy of every event
            stats.error("too_many_viewers")
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await websocket.accept()  # accepted, so the close code and reason reach the viewer
                await websocket.close(code=1013, reason=f"server is at its limit of {max_viewers} viewers")
            return
        every = max(0, min(every_ms, 60_000)) / 1000.0
        sub = broadcaster.subscribe(stream, every)  # counted before any await: racing viewers cannot pass the limit
        try:
            await websocket.accept()
        except BaseException:
            broadcaster.unsubscribe(sub)
            raise
        # A viewer only listens; reading still matters to notice it leaving while no events flow.
        receiver = asyncio.create_task(_drain(websocket))
        try:
            while True:
                getter = asyncio.create_task(sub.queue.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                await websocket.send_text(getter.result())
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            broadcaster.unsubscribe(sub)
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver

    return app


def _stats_page(snapshot: dict) -> str:
    """The snapshot as indented JSON in a page of its own: no outside script, style or font."""
    body = html.escape(json.dumps(snapshot, indent=2, default=str), quote=False)
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>visionstream /stats</title></head>"
            f"<body><pre>{body}</pre></body></html>")


async def _drain(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            await websocket.receive_text()
