"""Fan-out of result events to WebSocket viewers, each with its own bounded queue."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Final

from visionstream.server.stats import Stats

SENT_KEPT: Final = 256  # a sampled viewer's per-stream send times kept before old ones are forgotten


class Subscriber:
    """One viewer: a bounded queue that loses its oldest event rather than block anyone.

    With `every` (seconds, `/ws?every_ms=`) the viewer samples: at most one event per stream per `every`,
    and always the newest (one that arrives too soon is held, replaced by newer ones, and sent when its
    turn comes), so a dashboard gets each stream's latest result without every result's cost.
    """

    def __init__(self, stream: str | None, maxsize: int, every: float = 0.0) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.lost = 0
        self.every = every
        self._held: dict[str, str] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sent: dict[str, float] = {}  # stream -> loop time its last event went into the queue

    def push(self, stream: str, text: str) -> bool:
        """Queue an event; returns False when an older event had to be discarded for it."""
        if self.stream is not None and self.stream != stream:
            return True
        if self.every > 0:
            return self._sample(stream, text)
        return self._put(text)

    def _sample(self, stream: str, text: str) -> bool:
        if stream in self._timers:  # one is held already: the newer replaces it
            self._held[stream] = text
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = self._sent.get(stream, -math.inf) + self.every - now
        if wait <= 0:
            self._mark(stream, now)
            return self._put(text)
        self._held[stream] = text
        self._timers[stream] = loop.call_later(wait, self._release, stream)
        return True

    def _release(self, stream: str) -> None:
        self._timers.pop(stream, None)
        text = self._held.pop(stream, None)
        if text is not None:
            self._mark(stream, asyncio.get_running_loop().time())
            self._put(text)

    def _mark(self, stream: str, now: float) -> None:
        self._sent[stream] = now
        if len(self._sent) > SENT_KEPT:  # streams come and go: forget those whose turn has long come
            self._sent = {k: t for k, t in self._sent.items() if now - t < self.every}

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._held.clear()

    def _put(self, text: str) -> bool:
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

    def subscribe(self, stream: str | None = None, every: float = 0.0) -> Subscriber:
        sub = Subscriber(stream, self.queue_size, every)
        self.subscribers.add(sub)
        self.stats.ws_clients = len(self.subscribers)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        sub.close()
        self.stats.ws_clients = len(self.subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        if not self.subscribers:
            return  # no JSON work at all when nobody watches
        stream = event.get("stream_name", "")
        text = json.dumps(event, separators=(",", ":"))
        for sub in self.subscribers:
            if not sub.push(stream, text):
                self.stats.ws_events_dropped += 1
