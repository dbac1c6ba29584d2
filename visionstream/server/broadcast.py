"""Fan-out of result events to WebSocket viewers, each with its own bounded queue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from visionstream.server.stats import Stats


class Subscriber:
    """One viewer: a bounded queue that loses its oldest event rather than block anyone."""

    def __init__(self, stream: str | None, maxsize: int) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.lost = 0

    def push(self, stream: str, text: str) -> bool:
        """Queue an event; returns False when an older event had to be discarded for it."""
        if self.stream is not None and self.stream != stream:
            return True
        lost = False
        if self.queue.full():
            self.queue.get_nowait()
            self.lost += 1
            lost = True
        self.queue.put_nowait(text)
        return not lost


class Broadcaster:
    """Publishes each result once as JSON text; inference never waits on a viewer."""

    def __init__(self, stats: Stats, queue_size: int = 256) -> None:
        self.stats = stats
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()

    def subscribe(self, stream: str | None = None) -> Subscriber:
        sub = Subscriber(stream, self.queue_size)
        self.subscribers.add(sub)
        self.stats.ws_clients = len(self.subscribers)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self.stats.ws_clients = len(self.subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        if not self.subscribers:
            return  # no JSON work at all when nobody watches
        stream = event.get("stream_name", "")
        text = json.dumps(event, separators=(",", ":"))
        for sub in self.subscribers:
            if not sub.push(stream, text):
                self.stats.ws_events_dropped += 1
