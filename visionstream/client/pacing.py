"""Send pacing on an absolute schedule, the one rule for a sender that fell behind, and retry pauses."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Final

# Trying again (the server after a lost connection, a live source that dropped): the first pause,
# doubling up to the cap, each with +-25 % jitter so cameras that lost one server together do not
# knock on it in lockstep.
RETRY_FIRST_DELAY: Final = 0.25
RETRY_MAX_DELAY: Final = 2.0
RETRY_JITTER: Final = 0.25


def retry_delays(first: float = RETRY_FIRST_DELAY, cap: float = RETRY_MAX_DELAY,
                 jitter: float = RETRY_JITTER) -> Iterator[float]:
    """Pauses between attempts: doubling from `first` up to `cap`, each scaled by 1 +- `jitter`."""
    delay = first
    while True:
        yield delay * random.uniform(1 - jitter, 1 + jitter)  # spreads retries; no secrecy needed
        delay = min(cap, delay * 2)


def next_due(times: Iterator[float], now: float, period: float) -> tuple[float | None, list[float]]:
    """The next slot of `times` worth sending at `now`, and the slots skipped to get there.

    A slot due `period` ago or longer is skipped rather than sent late, like a camera frame nobody
    picked up; the first one due within the last period (or later) is the next to send. None when
    `times` runs out. With Poisson gaps `period` is the mean gap.
    """
    skipped: list[float] = []
    for due in times:
        if now - due < period:
            return due, skipped
        skipped.append(due)
    return None, skipped


class PacingSchedule:
    """Send slots at absolute times start + k/fps, so rounding and slow sends never accumulate drift.

    A sender that falls behind jumps to the latest slot already due instead of sending every missed
    slot back to back: at most one late frame goes out, then the schedule is back on the grid.
    """

    def __init__(self, fps: float, start: float) -> None:
        if not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number, got {fps}")
        self.period = 1.0 / fps
        self.start = start
        self.slot = 0
        self.skipped = 0

    def due(self, slot: int | None = None) -> float:
        return self.start + (self.slot if slot is None else slot) * self.period

    def catch_up(self, now: float) -> tuple[float, int]:
        """After a gap (an outage, a source reopening): skip the slots a period or more late, the current
        one included, without counting them as pacing slips; returns (next due time, slots skipped)."""
        due, skipped = next_due(map(self.due, itertools.count(self.slot)), now, self.period)
        assert due is not None  # the grid never ends
        self.slot += len(skipped)
        return due, len(skipped)

    def advance(self, now: float) -> float:
        """Leave the current slot; returns the due time of the next one (in the past if late)."""
        due, skipped = next_due(map(self.due, itertools.count(self.slot + 1)), now, self.period)
        assert due is not None  # the grid never ends
        self.skipped += len(skipped)
        self.slot += 1 + len(skipped)
        return due
