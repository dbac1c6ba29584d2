"""Send pacing: the absolute schedule, and the skip rule the client and the load generator share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visionstream.client.pacing import PacingSchedule, next_due

# --------------------------------------------------------------------------- pacing


def test_schedule_is_absolute() -> None:
    s = PacingSchedule(10, start=100.0)
    assert s.due() == 100.0
    # Sends that each finish a little late never push later slots back.
    assert s.advance(100.03) == pytest.approx(100.1)
    assert s.advance(100.13) == pytest.approx(100.2)
    assert s.due(50) == pytest.approx(105.0)
    assert s.skipped == 0


def test_a_late_sender_skips_ahead_instead_of_bursting() -> None:
    s = PacingSchedule(10, start=0.0)
    nxt = s.advance(0.35)  # slot 0 took 3.5 periods: slots 1 and 2 are gone, slot 3 is due now
    assert s.slot == 3 and nxt == pytest.approx(0.3) and s.skipped == 2
    assert s.advance(0.36) == pytest.approx(0.4)  # back on the grid: no second late frame


def test_schedule_rejects_bad_fps() -> None:
    for fps in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            PacingSchedule(fps, 0.0)


@given(
    fps=st.floats(0.5, 120),
    costs=st.lists(st.floats(0, 2.0), min_size=1, max_size=60),
)
def test_schedule_properties(fps: float, costs: list[float]) -> None:
    """Whatever each send costs: slots only move forward, stay on the grid, and are never >1 period late."""
    s = PacingSchedule(fps, start=0.0)
    now = 0.0
    for cost in costs:
        now = max(now, s.due()) + cost  # wait for the slot, then spend `cost` sending
        prev = s.slot
        due = s.advance(now)
        assert s.slot > prev
        assert due == pytest.approx(s.slot / fps)
        assert due > now - s.period - 1e-9
    assert s.skipped == s.slot - len(costs)


def test_next_due_skips_slots_a_period_late_and_sends_the_rest() -> None:
    times = iter([0.0, 0.1, 0.2, 0.3, 0.4])
    assert next_due(times, 0.25, 0.1) == (0.2, [0.0, 0.1])  # due a period ago or longer: skipped
    assert next_due(times, 0.25, 0.1) == (0.3, [])  # not yet due: the caller waits for it
    assert next_due(times, 9.0, 0.1) == (None, [0.4])  # the schedule ran out
