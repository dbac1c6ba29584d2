"""--infer-timeout against the real server, its detector made to hang on some frames: answered, replaced, counted."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import ROOT, running_server
from tests.integration.wire import Wire, frame, metrics, stats, wait_for

INFER_TIMEOUT = 1.0
HANG_SIDE = 7  # raw frames of 7x7 pixels hang the detector; any other size is served

# Loaded by the server process at start-up (PYTHONPATH): the placeholder detector hangs for a minute on
# 7x7 frames, the way a wedged inference runtime does, without touching the server's code.
SITECUSTOMIZE = f"""
import time
from visionstream.server.inference.backends.placeholder import PlaceholderDetector

_detect = PlaceholderDetector.detect

def _hanging(self, image):
    if image.shape[:2] == ({HANG_SIDE}, {HANG_SIDE}):
        time.sleep(60)
    return _detect(self, image)

PlaceholderDetector.detect = _hanging
"""


@pytest.fixture
def hanging_server(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    with running_server(tmp_path, "--placeholder", "--infer-timeout", str(INFER_TIMEOUT),
                        "--shutdown-grace", "1", model=tmp_path / "none.pt",
                        env={"PYTHONPATH": f"{hook}:{ROOT}"}) as handle:
        yield handle


def raw(name: str, fid: int, side: int) -> dict:
    return frame(name, fid, bytes(side * side * 3), encoding="raw", shape=[side, side, 3])


def test_a_hung_inference_is_answered_timeout_and_the_lane_replaced(hanging_server):
    """Frame 1 hangs the only lane: it is answered `timeout` after about --infer-timeout, frames after it
    are served by the fresh lane, the event is counted and logged once; the server then still stops at
    once on SIGTERM although the abandoned thread is still asleep in the detector."""
    server = hanging_server
    with Wire(server.tcp_port) as w:
        w.hello("cam", drop=False)
        w.send(raw("cam", 0, 8))
        assert w.recv()["type"] == "result"
        t0 = time.monotonic()
        for fid, side in [(1, HANG_SIDE), (2, 8), (3, 8)]:
            w.send(raw("cam", fid, side))
        replies = [w.recv(30) for _ in range(3)]
        waited = time.monotonic() - t0
    assert [(r["type"], r["frame_id"], r.get("reason")) for r in replies] == [
        ("dropped", 1, "timeout"), ("result", 2, None), ("result", 3, None)], replies
    assert "--infer-timeout" in replies[0]["message"]
    assert INFER_TIMEOUT <= waited < 30
    snap = stats(server)
    assert (snap["infer_timeouts"], snap["lanes_replaced"], snap["lanes_stuck"]) == (1, 1, 1), snap
    assert snap["drops_by_reason"] == {"timeout": 1} and snap["lanes"] == 1
    m = metrics(server)
    assert m[("visionstream_infer_timeouts_total", ())] == 1 and m[("visionstream_lanes_replaced_total", ())] == 1
    assert m[("visionstream_lanes_stuck", ())] == 1
    warnings = [ln for ln in server.log().splitlines() if "--infer-timeout" in ln]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "cam frame 1" in warnings[0], warnings

    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - t0 < 10  # not the 60 s the abandoned thread still sleeps


def test_other_streams_are_served_while_a_lane_hangs(hanging_server):
    """With two streams and one lane, the stream behind the hung frame waits at most about the timeout,
    then is served; every frame of both gets its one answer."""
    server = hanging_server
    with Wire(server.tcp_port) as bad, Wire(server.tcp_port) as good:
        bad.hello("bad", drop=False)
        good.hello("good", drop=False)
        bad.send(raw("bad", 1, HANG_SIDE))
        wait_for(lambda: stats(server)["workers_busy"], 10, "the lane to take the hanging frame")
        good.send(raw("good", 1, 8))
        assert good.recv(30)["type"] == "result"
        assert bad.recv(30)["reason"] == "timeout"
        bad.send(raw("bad", 2, 8))
        assert bad.recv(30)["type"] == "result"
