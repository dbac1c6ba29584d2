"""A few minutes of the server's vital signs, sampled every few seconds, for the dashboard's small charts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import psutil

from visionstream.server.stats import Stats

SAMPLE_EVERY_S: Final = 2.0
HISTORY_S: Final = 300.0  # five minutes: 150 samples of a dozen numbers, always
SAMPLES: Final = int(HISTORY_S / SAMPLE_EVERY_S)


class History:
    """Samples `Stats.snapshot()` on its own clock, so the charts have history when a page opens.

    CPU comes from psutil's cumulative times, differenced here: psutil's `cpu_percent(None)` measures
    since its previous call from anyone, and /stats calls it too.
    """

    def __init__(self, stats: Stats, every: float = SAMPLE_EVERY_S, samples: int = SAMPLES,
                 clock: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self.every = every
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=samples)
        self._proc = psutil.Process()
        self._last: tuple[float, Any, Any, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sample()  # primes the CPU and counter deltas
        self._task = asyncio.create_task(self._run(), name="history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.sample()

    def sample(self) -> dict[str, Any] | None:
        """Append one sample (None the first time: rates need two)."""
        now = self.clock()
        snap = self.stats.snapshot()
        system, proc = psutil.cpu_times(), self._proc.cpu_times()
        last = self._last
        self._last = (now, system, proc, snap["processed_frames"], snap["dropped_frames"])
        if last is None:
            return None
        t0, system0, proc0, processed0, dropped0 = last
        dt = max(now - t0, 1e-6)
        total = sum(system) - sum(system0)
        idle = (system.idle + getattr(system, "iowait", 0.0)) - (system0.idle + getattr(system0, "iowait", 0.0))
        lat = snap["latency_ms"]
        sample = {
            "t": round(now, 3),
            "fps": round((snap["processed_frames"] - processed0) / dt, 2),
            "drops_per_s": round((snap["dropped_frames"] - dropped0) / dt, 2),
            "p50_ms": lat.get("p50"),
            "p99_ms": lat.get("p99"),
            "queue": snap["queue_size"],
            "lanes_busy": snap["lanes_busy"],
            "lanes": snap["lanes"],
            "cpu": round(100.0 * (1.0 - idle / total), 1) if total > 0 else None,
            # percent of one core, as top shows a process (up to 100 x cores)
            "process_cpu": round(100.0 * (proc.user + proc.system - proc0.user - proc0.system) / dt, 1),
            "ram": snap["ram"],
            "rss_mb": snap["process"]["rss_mb"],
            "streams": sum(1 for s in snap["streams"].values() if s["connected"]),
        }
        self.samples.append(sample)
        return sample

    def to_dict(self) -> dict[str, Any]:
        return {"every_s": self.every, "span_s": self.every * (self.samples.maxlen or 0),
                "samples": list(self.samples)}
