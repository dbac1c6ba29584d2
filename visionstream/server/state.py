"""What a connection may use of the server (as uvicorn's protocols get a ServerState, not the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from visionstream.server.config import ServerConfig
from visionstream.server.scheduler import Scheduler
from visionstream.server.stats import Stats
from visionstream.server.tracking import TrackerSettings


@dataclass
class ServerState:
    """Shared by every connection; the server fills in the model's facts once it has loaded it."""

    config: ServerConfig
    stats: Stats
    scheduler: Scheduler
    names: dict[int, str] = field(default_factory=dict)  # class id -> label, for the welcome
    imgsz: list[int] = field(default_factory=list)  # the model's input (h, w), for the welcome
    tracker: TrackerSettings | None = None  # --track: each stream gets its own tracker built from it
    stopping: bool = False  # shutdown has begun: readers stop
