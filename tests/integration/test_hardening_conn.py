"""Round two (issue 12) on the real server: pre-auth seats and the hello deadline, event-loop floods, one stream name per connection."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import (
    EOF,
    GoodCamera,
    Wire,
    bus_jpeg,
    error_count,
    frame,
    is_bus,
    settled,
    stats,
    wait_for,
)
from visionstream.server.connection import FLOOD_CLOSE, PING_BURST
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, error_msg

TOKEN = "round-two-token"
MAX_CLIENTS = 8
MAX_PENDING = 16
HELLO_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("conn-token"), "--token", TOKEN, "--max-clients", str(MAX_CLIENTS),
                        "--max-pending", str(MAX_PENDING), "--hello-timeout", str(HELLO_TIMEOUT)) as handle:
        yield handle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    # A large send buffer: the burst's attacker reads its 100,000 replies, but a thread may lag behind.
    with running_server(tmp_path_factory.mktemp("conn"), "--send-buffer", str(64 << 20)) as handle:
        yield handle


# ------------------------------------------------------------------ item 2: pending connections hold no seat


def test_silent_sockets_hold_no_seat_and_are_closed_at_the_hello_deadline(token_server):
    """20 sockets that never send a byte (more than --max-clients and --max-pending) cannot keep a
    camera with the token out; they go after --hello-timeout, not --read-timeout (30 s)."""
    srv = token_server
    before = {c: error_count(srv, c, TOKEN) for c in ("hello_timeout", "evicted", "too_many_clients")}
    total0 = stats(srv, TOKEN)["connections_total"]
    silent = [Wire(srv.tcp_port) for _ in range(20)]
    try:

        def seen() -> bool:  # accepted, or (without the fix) refused at once
            snap = stats(srv, TOKEN)
            refused = snap["errors_by_code"].get("too_many_clients", 0) - before["too_many_clients"]
            return snap["connections_total"] - total0 + refused >= 20

        wait_for(seen, 10, "the server to see the 20 silent connections")
        t0 = time.monotonic()
        with Wire(srv.tcp_port) as cam:
            cam.hello("cam", token=TOKEN, drop=False)
            cam.send(frame("cam", 1, bus_jpeg()))
            assert is_bus(cam.recv(30))
            codes = []
            for w in silent:
                reply, eof = w.rest(timeout=10)
                assert reply["type"] == "error" and eof == EOF, reply
                codes.append(reply["code"])
            took = time.monotonic() - t0
            assert cam.ping() == []  # the camera was never disturbed
        # The camera's own connection evicted the oldest pending one too (16 may wait: 21 came).
        assert Counter(codes) == {"evicted": 5, "hello_timeout": 15}, codes
        assert took < 10 * HELLO_TIMEOUT  # closed at the hello deadline, far from the 30 s read timeout
        after = {c: error_count(srv, c, TOKEN) for c in before}
        assert after == {"hello_timeout": before["hello_timeout"] + 15, "evicted": before["evicted"] + 5,
                         "too_many_clients": before["too_many_clients"]}
        assert stats(srv, TOKEN)["pending_clients"] == 0
    finally:
        for w in silent:
            w.close()


def test_the_seat_is_checked_at_the_hello(token_server):
    """A connection that waits while the last seats fill is refused at its hello, with one error."""
    srv = token_server
    settled(srv, token=TOKEN)
    late = Wire(srv.tcp_port)  # pending: takes no seat
    seated = []
    try:
        for i in range(MAX_CLIENTS):
            w = Wire(srv.tcp_port)
            w.hello(f"seat-{i}", token=TOKEN)
            seated.append(w)
        before = error_count(srv, "too_many_clients", TOKEN)
        late.send({"type": "hello", "stream_name": "late", "token": TOKEN})
        assert late.rest() == [{"type": "error", "code": "too_many_clients",
                                "message": f"server is at its limit of {MAX_CLIENTS} clients"}, EOF]
        assert error_count(srv, "too_many_clients", TOKEN) == before + 1
        assert seated[0].ping() == []
    finally:
        late.close()
        for w in seated:
            w.close()


def test_without_a_token_the_first_message_is_the_hello(server):
    with Wire(server.tcp_port) as w:
        w.send({"type": "reboot"})  # answered, but no valid first message: still pending
        assert w.recv()["code"] == "unknown_type"
        w.send(frame("no-hello", 1, bus_jpeg()))  # a frame is a valid first message
        assert is_bus(w.recv(30))


# ------------------------------------------------------------------ item 3: floods


class Drain(threading.Thread):
    """Reads one socket to its end, keeping every message (an attacker that reads its replies)."""

    def __init__(self, w: Wire) -> None:
        super().__init__(daemon=True)
        self.w = w
        self.messages: list[Any] = []

    def run(self) -> None:
        try:
            while (msg := self.w.recv(60)) != EOF:
                self.messages.append(msg)
        except (TimeoutError, OSError):
            pass


class ByteDrain(threading.Thread):
    """Reads one socket to its end without decoding (the test's own GIL must not slow what it measures)."""

    def __init__(self, w: Wire) -> None:
        super().__init__(daemon=True)
        self.sock = w.sock
        self.chunks: list[bytes] = []
        self.size = 0

    def run(self) -> None:
        self.sock.settimeout(60)
        try:
            while data := self.sock.recv(1 << 20):
                self.chunks.append(data)
                self.size += len(data)
        except OSError:
            pass

    def messages(self) -> list[Any]:
        return FrameDecoder(limits=CLIENT_LIMITS).feed(b"".join(self.chunks))


class TimedCamera(threading.Thread):
    """Lock-step bus.jpg camera recording, per frame, the part of its round trip the server did not
    spend on the frame (receipt to result): the time its bytes and its reply waited for the event loop.
    (A flood also slows inference, which shares the two cores with the loop; that is not the loop's
    fairness and is left out.)"""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.name_ = port, name
        self.rtts: list[tuple[float, float]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Wire(self.port) as w:
                w.hello(self.name_)
                fid = 0
                while not self.halt.is_set():
                    t0 = time.monotonic()
                    w.send(frame(self.name_, fid, bus_jpeg()))
                    reply = w.recv(30)
                    assert reply["type"] == "result" and reply["frame_id"] == fid, reply
                    self.rtts.append((t0, (time.monotonic() - t0) * 1000.0 - reply["latency_ms"]))
                    fid += 1
                    time.sleep(0.01)
        except BaseException as exc:
            self.error = exc

    def worst(self, t0: float, t1: float) -> float:
        return max(ms for t, ms in self.rtts if t0 <= t <= t1)


def test_a_burst_of_tiny_messages_does_not_stall_another_camera(server):
    """100,000 empty messages in one burst are all answered (`malformed`), in turns of a few dozen: a
    camera's frames and replies, and /health, wait for the loop far less than the 0.5-2 s it took to
    handle one read of them in one go."""
    settled(server)
    n = 100_000
    before = error_count(server, "malformed")
    cam = TimedCamera(server.tcp_port, "steady")
    cam.start()
    try:
        wait_for(lambda: len(cam.rtts) >= 20 or cam.error, 30, "the camera's first results")
        reply = encode(error_msg("malformed", "empty message (length 0)"))
        with Wire(server.tcp_port) as bad, httpx.Client(timeout=30) as http:
            assert bad.ping() == []
            drain = ByteDrain(bad)
            drain.start()
            t0 = time.monotonic()
            bad.raw(b"\0\0\0\0" * n)
            health = []
            while drain.size < n * len(reply) and time.monotonic() - t0 < 60:
                h0 = time.monotonic()
                http.get(f"{server.base_url}/health").raise_for_status()
                health.append((time.monotonic() - h0) * 1000.0)
                time.sleep(0.02)
            t1 = time.monotonic()
            bad.sock.shutdown(socket.SHUT_RDWR)  # a close alone would wait for the drain's recv to return
        assert Counter(m["code"] for m in drain.messages()) == {"malformed": n}
        assert error_count(server, "malformed") == before + n
        assert cam.error is None, cam.error
        # Loose bounds (a turn is well under a millisecond): a machine shared with other work is noisy.
        assert cam.worst(t0, t1) < 200, cam.rtts
        assert max(health) < 600, health  # unfixed: 777-1,729 ms; one GC or scheduler hiccup can pass 300
    finally:
        cam.halt.set()
        cam.join(30)
    assert cam.error is None, cam.error


def notices(msgs: list[Any]) -> list[dict]:
    return [m for m in msgs if m != EOF and m.get("code") == "rate_limited"]


def test_pings_beyond_the_rate_are_counted_and_told_in_one_notice(server):
    before = error_count(server, "rate_limited")
    with Wire(server.tcp_port) as w:
        w.raw(b"".join(encode({"type": "ping", "id": i}) for i in range(100)))
        time.sleep(1.5)  # one notice interval: every refusal has been told by now
        w.send({"type": "ping", "id": "sync"})  # the bucket has refilled meanwhile
        msgs = w.recv_until(lambda m: m != EOF and m.get("id") == "sync")[:-1]
        pongs = [m["id"] for m in msgs if m["type"] == "pong"]
        refused = sum(m["refused"] for m in notices(msgs))
        assert PING_BURST <= len(pongs) < 100 and pongs == sorted(pongs)
        assert len(pongs) + refused == 100, msgs
        assert 1 <= len(notices(msgs)) <= 3  # one per interval, not one per refused ping
        assert "refused" in notices(msgs)[0]["message"]
    assert error_count(server, "rate_limited") == before + refused


def test_a_ping_flood_is_cut_off_and_other_cameras_are_served(server):
    settled(server)
    before = error_count(server, "flood")
    with GoodCamera(server.tcp_port, "flood-witness") as cam:
        with Wire(server.tcp_port) as w:
            drain = Drain(w)
            drain.start()
            # Enough to pass the limit, sent at once so the server reads all of it before it closes
            # (unread bytes would turn its close into a reset that may discard the last replies).
            w.raw(encode({"type": "ping", "id": 0}) * (2 * PING_BURST + FLOOD_CLOSE + 100))
            drain.join(30)
        msgs = drain.messages
        assert msgs[-1].get("code") == "flood", msgs[-3:]
        pongs = sum(m["type"] == "pong" for m in msgs)
        assert PING_BURST <= pongs < 2 * PING_BURST
        # The first refusal is told at once; then more than FLOOD_CLOSE before the next notice close it.
        assert notices(msgs)[-1]["refused"] == FLOOD_CLOSE + 1, notices(msgs)
        assert len(notices(msgs)) == 2
        sent_then = cam.sent
        wait_for(lambda: cam.sent >= sent_then + 3, 30, "three more good results")
    cam.check(min_results=4)
    assert error_count(server, "flood") == before + 1


# ------------------------------------------------------------------ item 5: one stream name, one connection


class Viewer(threading.Thread):
    """A /ws?stream=NAME viewer keeping the frame ids it is shown."""

    def __init__(self, api_port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.url = f"ws://127.0.0.1:{api_port}/ws?stream={name}"
        self.ids: list[int] = []
        self.halt = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with ws_connect(self.url) as ws:
            self.ready.set()
            while not self.halt.is_set():
                try:
                    self.ids.append(json.loads(ws.recv(timeout=0.2))["frame_id"])
                except TimeoutError:
                    continue


def test_a_newer_connection_with_the_same_name_replaces_the_older(server):
    """The old connection gets an answer for every frame it sent, then `stream_replaced` and EOF; /stats
    shows the new connection's counts under the name; /ws shows only the new one's frames after the switch."""
    settled(server)
    before = error_count(server, "stream_replaced")
    viewer = Viewer(server.api_port, "dup")
    viewer.start()
    assert viewer.ready.wait(10)
    bus = bus_jpeg()
    ok, png = cv2.imencode(".png", np.zeros((4096, 4096, 3), np.uint8))
    assert ok
    big = png.tobytes()
    old = Wire(server.tcp_port)
    new = None
    try:
        old.hello("dup", drop=False)
        old.send(frame("dup", 0, bus))
        assert is_bus(old.recv(30))  # shown on /ws: the name is the old connection's still
        old.send(frame("dup", 1, big))  # ~0.2 s in the lane: its result comes after the switch
        for fid in range(2, 7):  # 4 waiting, the last held back (lossless)
            old.send(frame("dup", fid, bus))

        def in_lane() -> bool:
            snap = stats(server)
            return snap["lanes_busy"] >= 1 and snap["streams"].get("dup", {}).get("received", 0) >= 6

        wait_for(in_lane, 10, "frame 1 in the lane, frames 2-5 waiting")
        new = Wire(server.tcp_port)
        new.hello("dup", drop=False)
        rest = old.rest(timeout=15)
        assert rest[-2:] == [{"type": "error", "code": "stream_replaced",
                              "message": "a newer connection carries stream 'dup' now; closing"}, EOF], rest
        answers = Counter(m["frame_id"] for m in rest if m != EOF and m["type"] in ("result", "dropped"))
        assert answers == {fid: 1 for fid in range(1, 7)}, rest  # each frame answered exactly once
        kinds = {m["frame_id"]: m.get("reason", "result") for m in rest if m != EOF and m["type"] != "error"}
        assert kinds == {1: "result", 2: "replaced", 3: "replaced", 4: "replaced", 5: "replaced", 6: "replaced"}, rest
        for fid in range(100, 105):
            new.send(frame("dup", fid, bus))
            assert is_bus(new.recv(30))
        row = settled(server, clients=1)["streams"]["dup"]
        assert (row["connected"], row["received"], row["processed"], row["dropped"]) == (True, 5, 5, 0), row
        assert error_count(server, "stream_replaced") == before + 1
        wait_for(lambda: len([i for i in viewer.ids if i >= 100]) == 5, 10, "the new frames on /ws")
        ids = viewer.ids
        first_new = next(k for k, i in enumerate(ids) if i >= 100)
        assert all(i >= 100 for i in ids[first_new:]), ids  # nothing of the old connection after the switch
        assert ids[:first_new] == [0], ids  # frame 1's result went to its sender only, not out under the name
    finally:
        viewer.halt.set()
        old.close()
        if new is not None:
            new.close()
        viewer.join(10)


def test_a_replaced_connections_frame_stuck_in_a_lane_is_dropped_after_the_grace(tmp_path, monkeypatch):
    """In-process, placeholder model: the old connection's frame is in a lane that takes 5 s. The old
    connection gets `replaced` for it after REPLACE_GRACE_S, then `stream_replaced`; when the lane
    finishes later, nothing more is sent and the frame is counted once."""
    import asyncio

    from tests.integration.test_hardening import placeholder_config, send_raw, start_in_process
    from visionstream.client.connection import connect
    from visionstream.server.connection import REPLACE_GRACE_S
    from visionstream.server.inference.backends.placeholder import PlaceholderDetector

    real_detect = PlaceholderDetector.detect
    release = threading.Event()

    def slow(self, image):
        if image.shape[:2] == (9, 9):
            release.wait(10)
        return real_detect(self, image)

    monkeypatch.setattr(PlaceholderDetector, "detect", slow)

    async def scenario():
        srv, task = await start_in_process(placeholder_config(tmp_path))
        old = await connect("127.0.0.1", srv.tcp_port, "dup", drop=False)
        await send_raw(old, "dup", 0, side=9)
        while srv.stats.workers_busy == 0:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        new = await connect("127.0.0.1", srv.tcp_port, "dup", drop=False)
        replies = []
        while (msg := await asyncio.wait_for(old.recv(), 10)) is not None:
            replies.append(msg)
        took = time.monotonic() - t0
        release.set()  # the lane finishes the frame now: its result must go nowhere
        await send_raw(new, "dup", 1)
        assert (await asyncio.wait_for(new.recv(), 10))["type"] == "result"
        await old.close()
        await new.close()
        srv.request_shutdown()
        await asyncio.wait_for(task, 10)
        return replies, took, srv

    replies, took, srv = asyncio.run(scenario())
    assert [(r["type"], r.get("frame_id"), r.get("reason") or r.get("code")) for r in replies] == [
        ("dropped", 0, "replaced"), ("error", None, "stream_replaced")]
    assert REPLACE_GRACE_S * 0.9 < took < REPLACE_GRACE_S + 3
    assert (srv.stats.total_frames, srv.stats.processed_frames, srv.stats.dropped_frames) == (2, 1, 1)
    assert srv.stats.drops == {"replaced": 1}
