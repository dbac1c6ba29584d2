"""The scheduling policy, pure: which waiting stream a free lane serves next, and what it is charged.

The whole rule is `RULES` below (server.py --help and the README quote it; a test keeps them equal).

This is start-time fair queueing (Goyal, Vin and Cheng, SIGCOMM 1996) with each stream's queue cut
to its newest frame: it is work-conserving (a lane idles only when every waiting frame belongs to a
stream at its lane share) and max-min fair in worker time, so a stream whose frames cost 100x more
gets 1/100 of the frames, not 100x the lanes. The lane share bounds what one costly stream can hold:
with two lanes and two or more streams open it holds at most one, and the others keep the other.

Nothing here locks, sleeps or reads a clock: `Scheduler` (scheduler.py) calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol, TypeVar

RULES: Final = (
    "A free lane serves the oldest waiting frame of the stream that has used the least worker time, among "
    "the streams holding fewer than their equal share of the lanes, ceil(lanes / open streams). "
    "Each frame is charged its measured worker time (decode and inference), and a stream that starts "
    "sending again rejoins at the charge of the stream served last, so idle time banks no credit. "
    "A waiting frame is dropped only when a newer frame of its real-time stream supersedes it (lossless "
    "streams get backpressure instead) or, with --max-age-ms, when a lane reaches it older than that."
)

# Weight of the newest sample in a stream's service-time average (an EWMA): about the last five frames.
COST_WEIGHT = 0.2


class Flow(Protocol):
    """What the policy reads and keeps of one stream (scheduler.StreamQueue)."""

    lossless: bool
    work: float  # worker seconds charged so far (the stream's virtual time)
    cost: float  # EWMA of its measured worker time per frame; 0 until one was measured
    in_flight: int  # its frames in lanes now

    def head_received(self) -> float:
        """Arrival time of its oldest waiting frame."""
        ...


F = TypeVar("F", bound=Flow)


class FairShare:
    """Start-time fair queueing over streams, with a per-stream lane cap (see the module docstring)."""

    def __init__(self, lanes: int = 1) -> None:
        self.lanes = lanes
        self.vtime = 0.0  # the work of the stream served last, before its charge: never decreases

    def lane_share(self, open_streams: int) -> int:
        """Most frames one stream may have in lanes at once: ceil(lanes / open streams)."""
        return max(1, -(-self.lanes // max(1, open_streams)))

    def rejoin(self, flow: Flow) -> None:
        """`flow` had nothing waiting or in lanes and now has a frame: no credit for the idle time."""
        flow.work = max(flow.work, self.vtime)

    def pick(self, waiting: Iterable[F], open_streams: int) -> F | None:
        """The stream a free lane serves next, among streams with a frame waiting; None if every one
        of them is at its lane share."""
        share = self.lane_share(open_streams)
        best: F | None = None
        best_key = (0.0, 0.0)
        for flow in waiting:
            if flow.in_flight >= share:
                continue
            key = (flow.work, flow.head_received())
            if best is None or key < best_key:
                best, best_key = flow, key
        return best

    def start(self, flow: Flow, default_cost: float) -> float:
        """A lane took a frame of `flow`: charge it its expected cost now (so a second free lane sees
        it), to be settled in `finish`. Returns the charge."""
        self.vtime = max(self.vtime, flow.work)
        charge = flow.cost or default_cost
        flow.work += charge
        flow.in_flight += 1
        return charge

    def finish(self, flow: Flow, charged: float, seconds: float | None) -> None:
        """The frame left its lane after `seconds` of worker time (None: not measured, the estimate
        stands)."""
        flow.in_flight -= 1
        if seconds is not None:
            flow.work += seconds - charged
            flow.cost = seconds if not flow.cost else (1 - COST_WEIGHT) * flow.cost + COST_WEIGHT * seconds


def stale(lossless: bool, age: float, max_age: float) -> bool:
    """Rule 3's age limit: a real-time frame older than an explicit `max_age` (0: no limit)."""
    return max_age > 0 and not lossless and age > max_age
