"""Limits and bad input against the real server: each is refused to its sender only, counted, harmless to others."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, ROOT, require, running_server
from tests.integration.wire import (
    EOF,
    GoodCamera,
    Wire,
    bus_jpeg,
    error_count,
    frame,
    is_bus,
    metrics,
    rss_mb,
    settled,
    stats,
    wait_for,
)
from visionstream.client.connection import connect
from visionstream.server.config import ServerConfig, parse_config
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.scheduler import Scheduler
from visionstream.server.server import InferenceServer
from visionstream.wire.protocol import DEFAULT_MAX_FRAME_BYTES, MAX_IMAGE_DIM

MAX_FRAME = 1 << 20
READ_TIMEOUT = 1.0
MAX_CLIENTS = 6
SEND_BUFFER = 65536


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("hardening"),
                        "--max-frame-bytes", str(MAX_FRAME), "--read-timeout", str(READ_TIMEOUT),
                        "--max-clients", str(MAX_CLIENTS), "--send-buffer", str(SEND_BUFFER)) as handle:
        yield handle


def png(h: int, w: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((h, w, 3), np.uint8))
    assert ok
    return buf.tobytes()


def jpeg_header_only(w: int, h: int) -> bytes:
    """SOI, a baseline SOF0 announcing w x h with three components, EOI: a header, no pixels."""
    sof = b"\xff\xc0\x00\x11\x08" + h.to_bytes(2, "big") + w.to_bytes(2, "big") + b"\x03" + b"\x01\x22\x00" * 3
    return b"\xff\xd8" + sof + b"\xff\xd9"


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def ping_of_size(total: int) -> bytes:
    """A framed ping whose payload is exactly `total` bytes (padding in a bin id)."""
    base = len(msgpack.packb({"type": "ping", "id": b""}, use_bin_type=True))
    # bin8/16/32 headers are 2/3/5 bytes against the 1-byte header of an empty bin8... try each pad.
    for extra in range(0, 8):
        payload = msgpack.packb({"type": "ping", "id": b"\0" * (total - base - extra)}, use_bin_type=True)
        if len(payload) == total:
            return framed(payload)
    raise AssertionError("cannot size the ping")


def error_metric(server, code: str) -> float:
    return metrics(server).get(("visionstream_errors_total", (("code", code),)), 0.0)


def assert_counted(server, code: str, before: int, n: int = 1) -> None:
    """/stats and /metrics both count `n` more errors of `code` (the error is sent before it is read)."""
    now = error_count(server, code)
    assert now == before + n, f"errors_by_code[{code}] went {before} -> {now}, expected +{n}"
    assert error_metric(server, code) == now


# ------------------------------------------------------------------ flags


def test_help_documents_every_limit_with_safe_defaults():
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag, default in [("--max-frame-bytes", "16777216"), ("--max-clients", "64"), ("--read-timeout", "30.0"),
                          ("--send-buffer", "4194304"), ("--host", "127.0.0.1"), ("--token", "none, no authentication")]:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(flag))
        text = " ".join(out[out.index(line):out.index(line) + 600].split())  # help text wraps anywhere
        assert f"(default: {default})" in text, (flag, default)
    assert "VISIONSTREAM_TOKEN" in out
    cfg = parse_config([], environ={})
    assert (cfg.host, cfg.max_frame_bytes, cfg.max_clients, cfg.read_timeout, cfg.token) == (
        "127.0.0.1", DEFAULT_MAX_FRAME_BYTES, 64, 30.0, None)
    assert DEFAULT_MAX_FRAME_BYTES == 16 * 2**20 and MAX_IMAGE_DIM == 8192
    assert not ServerConfig().exposed and ServerConfig(host="0.0.0.0").exposed


# ------------------------------------------------------------------ --max-frame-bytes


def test_oversized_length_prefix_is_refused_before_its_payload(server):
    before = error_count(server, "frame_too_large")
    rss = rss_mb(server)
    for size in (MAX_FRAME + 1, 2**32 - 1):
        with Wire(server.tcp_port) as w:
            t0 = time.monotonic()
            w.raw(size.to_bytes(4, "big"))  # the header alone: no payload byte will ever come
            reply = w.recv(timeout=READ_TIMEOUT * 5)
            # Answered without waiting for the payload: a server that tried to read it would have
            # hit the read timeout instead.
            assert reply["type"] == "error" and reply["code"] == "frame_too_large", reply
            assert str(size) in reply["message"] and time.monotonic() - t0 < READ_TIMEOUT
            assert w.rest() == [EOF]
    assert_counted(server, "frame_too_large", before, 2)
    assert rss_mb(server) - rss < 32  # nothing near 4 GiB was reserved


def test_frame_bytes_limit_is_inclusive(server):
    with Wire(server.tcp_port) as w:
        w.raw(ping_of_size(MAX_FRAME))
        assert w.recv()["type"] == "pong"
        before = error_count(server, "frame_too_large")
        w.raw(ping_of_size(MAX_FRAME + 1)[:4096])
        assert w.recv()["code"] == "frame_too_large"
        assert w.rest() == [EOF]
    assert_counted(server, "frame_too_large", before)


def test_messages_before_an_oversized_prefix_in_the_same_packet_are_answered(server):
    with Wire(server.tcp_port) as w:
        w.raw(framed(msgpack.packb({"type": "ping", "id": "first"})) + (MAX_FRAME + 1).to_bytes(4, "big"))
        replies = w.rest()
    assert [r if r == EOF else (r["type"], r.get("id") or r.get("code")) for r in replies] == [
        ("pong", "first"), ("error", "frame_too_large"), EOF]


# ------------------------------------------------------------------ decoded size, msgpack, raw


@pytest.mark.parametrize("image, accepted", [
    (png(1, MAX_IMAGE_DIM), True),
    (png(1, MAX_IMAGE_DIM + 1), False),
    (png(MAX_IMAGE_DIM + 1, 1), False),
    (jpeg_header_only(9000, 9000), False),  # a few bytes claiming 243 MB of pixels
    (jpeg_header_only(60000, 60000), False),
], ids=["png-8192", "png-8193-wide", "png-8193-tall", "jpeg-9000", "jpeg-60000"])
def test_decoded_image_size_is_capped_from_the_header(server, image, accepted):
    before = stats(server)["drops_by_reason"].get("decode_error", 0)
    with Wire(server.tcp_port) as w:
        w.hello("sizecap")
        w.send(frame("sizecap", 1, image))
        reply = w.recv()
    assert reply["frame_id"] == 1
    if accepted:
        assert reply["type"] == "result" and reply["image_size"] == [MAX_IMAGE_DIM, 1]
    else:
        # The header check's reason: decoding was never attempted.
        assert reply["type"] == "dropped" and reply["reason"] == "decode_error", reply
        assert f"exceeds the {MAX_IMAGE_DIM}x{MAX_IMAGE_DIM} limit" in reply["message"]
        assert stats(server)["drops_by_reason"]["decode_error"] == before + 1


def container_bomb(limit: int) -> bytes:
    """A ping whose id nests arrays of 16 empty maps: within every per-container msgpack limit, yet
    ~70x larger once unpacked (1 MiB -> ~70 MB of dicts) if the number of containers is not capped."""
    level = b"\xdc\x00\x10" + b"\x80" * 16
    while len(level) * 16 + 64 < limit:
        level = b"\xdc\x00\x10" + level * 16
    copies = min(16, (limit - 64) // len(level))
    payload = (b"\x82" + msgpack.packb("type") + msgpack.packb("ping") + msgpack.packb("id")
               + b"\xdc" + copies.to_bytes(2, "big") + level * copies)
    assert limit // 2 < len(payload) <= limit
    return framed(payload)


def test_msgpack_limits_refuse_bloated_payloads(server):
    before = error_count(server, "malformed")
    with Wire(server.tcp_port) as w:
        w.raw(container_bomb(MAX_FRAME))
        w.send({"type": "ping", "id": "x" * 5000})  # a string past max_str_len
        w.send({"type": "ping", "id": list(range(17))})  # an array past max_array_len
        replies = w.ping()
        assert [r["code"] for r in replies] == ["malformed"] * 3, replies
        assert "arrays and maps" in replies[0]["message"]
    assert_counted(server, "malformed", before, 3)


def test_raw_frame_must_match_its_shape(server):
    image = np.full((4, 5, 3), 7, np.uint8).tobytes()
    with Wire(server.tcp_port) as w:
        w.hello("rawcheck")
        before = error_count(server, "bad_shape")
        w.send(frame("rawcheck", 1, image[:-1], encoding="raw", shape=(4, 5, 3)))
        w.send(frame("rawcheck", 2, image + b"\0", encoding="raw", shape=(4, 5, 3)))
        w.send(frame("rawcheck", 3, image, encoding="raw", shape=(4, 5, 3)))
        replies = [w.recv() for _ in range(3)]
    assert [(r["type"], r.get("code")) for r in replies] == [
        ("dropped", "bad_shape"), ("dropped", "bad_shape"), ("result", None)], replies
    assert "59 bytes but shape [4, 5, 3] needs 60" in replies[0]["message"]
    assert_counted(server, "bad_shape", before, 2)


# ------------------------------------------------------------------ --max-clients


def test_max_clients_refuses_the_next_connection(server):
    settled(server)
    before = error_count(server, "too_many_clients")
    wires = [Wire(server.tcp_port) for _ in range(MAX_CLIENTS)]
    try:
        for i, w in enumerate(wires):
            w.hello(f"seat-{i}")
        with Wire(server.tcp_port) as extra:
            assert extra.rest() == [{"type": "error", "code": "too_many_clients",
                                     "message": f"server is at its limit of {MAX_CLIENTS} clients"}, EOF]
        assert wires[0].ping() == []  # the seated clients are untouched
        wires.pop().close()
        settled(server, clients=MAX_CLIENTS - 1)
        with Wire(server.tcp_port) as again:  # a freed seat is usable again
            again.hello("seat-again")
    finally:
        for w in wires:
            w.close()
    assert_counted(server, "too_many_clients", before)
    settled(server)


# ------------------------------------------------------------------ --read-timeout (slowloris)


def closed_after(w: Wire, t0: float) -> tuple[dict, float]:
    reply, eof = w.rest(timeout=READ_TIMEOUT * 5)
    assert eof == EOF
    return reply, time.monotonic() - t0


def test_idle_connection_times_out(server):
    before = error_count(server, "timeout")
    with Wire(server.tcp_port) as w:
        t0 = time.monotonic()
        reply, took = closed_after(w, t0)
    assert reply["code"] == "timeout" and "sent nothing" in reply["message"]
    assert READ_TIMEOUT * 0.9 < took < READ_TIMEOUT * 3
    assert_counted(server, "timeout", before)


def test_half_sent_message_times_out(server):
    with Wire(server.tcp_port) as w:
        w.hello("half")
        t0 = time.monotonic()
        w.raw(framed(msgpack.packb({"type": "ping", "id": "x" * 100}))[:50])
        reply, took = closed_after(w, t0)
    assert reply["code"] == "timeout" and "half a message" in reply["message"]
    assert READ_TIMEOUT * 0.9 < took < READ_TIMEOUT * 3


def test_trickled_bytes_do_not_extend_the_deadline(server):
    """One byte every 0.1 s keeps the socket busy but never completes a message: still closed on time."""
    message = framed(msgpack.packb({"type": "ping", "id": "x" * 200}))
    with Wire(server.tcp_port) as w:
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < len(message) and time.monotonic() - t0 < READ_TIMEOUT * 5:
                w.raw(message[sent:sent + 1])
                sent += 1
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, took = closed_after(w, t0)
    assert reply["code"] == "timeout" and sent < len(message)
    assert took < READ_TIMEOUT * 3


def test_a_client_waiting_for_its_answers_is_not_idle(tmp_path):
    """Lock-step behind slow frames: the read deadline stops while the server still owes the client answers."""
    slow = cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16))[1].tobytes()  # the slowest decode admitted
    with running_server(tmp_path, "--placeholder", "--read-timeout", "0.3", model="none.pt") as srv, \
            Wire(srv.tcp_port) as w:
        w.hello("patient", drop=False)
        for fid in range(2):
            w.send(frame("patient", fid, slow))
        answers = [w.recv(timeout=30) for _ in range(2)]
        assert [(a["type"], a["frame_id"]) for a in answers] == [("result", 0), ("result", 1)], answers
        closed, _ = closed_after(w, time.monotonic())  # owed nothing now: the deadline runs again
        assert closed["code"] == "timeout", closed


def test_complete_messages_reset_the_deadline(server):
    with Wire(server.tcp_port) as w:
        w.hello("keepalive")
        t0 = time.monotonic()
        while time.monotonic() - t0 < READ_TIMEOUT * 3:  # three timeouts long, alive throughout
            assert w.ping() == []
            time.sleep(READ_TIMEOUT / 3)


# ------------------------------------------------------------------ strings and message types


@pytest.mark.parametrize("msg, code", [
    ({"type": "hello", "stream_name": "c" * 129}, "bad_stream_name"),
    ({"type": "hello", "stream_name": "cam\n"}, "bad_stream_name"),
    ({"type": "hello", "stream_name": "../etc/passwd"}, "bad_stream_name"),
    ({"type": "hello", "stream_name": 7}, "bad_field"),
    ({"type": "t" * 4000}, "unknown_type"),
    ({"type": "subscribe", "stream_name": "cam"}, "unknown_type"),
    ({"type": 1}, "missing_field"),
    ({"stream_name": "cam"}, "missing_field"),
], ids=["name-129", "name-newline", "name-path", "name-int", "type-4000", "type-unknown", "type-int", "type-missing"])
def test_strings_and_types_are_validated(server, msg, code):
    before = error_count(server, code)
    with Wire(server.tcp_port) as w:
        w.send(msg)
        [reply] = w.ping()
        assert reply["type"] == "error" and reply["code"] == code, reply
        assert len(reply["message"]) < 200  # a 4000-character type is not echoed back whole
        w.hello("after-a-bad-message")  # the connection carries on
    assert_counted(server, code, before)


# ------------------------------------------------------------------ bad input hurts nobody else

def bad_inputs() -> list[tuple[str, list[bytes], str, str, bool]]:
    """(id, wire bytes after a hello as 'bad', expected reply type, code or drop reason, closes)."""
    bus = bus_jpeg()
    f = frame  # frame(name, fid, image, **kw)
    enc = framed

    def m(obj) -> bytes:
        return framed(msgpack.packb(obj, use_bin_type=True))

    return [
        ("random-bytes", [b"\xde\xad\xbe\xef" + os.urandom(60)], "error", "frame_too_large", True),
        ("length-then-garbage", [enc(b"\xc1" * 8)], "error", "malformed", False),
        ("non-map", [m([1, 2, 3])], "error", "malformed", False),
        ("missing-field", [m({"type": "frame", "stream_name": "bad", "frame_id": 5, "timestamp": 0.0})],
         "dropped", "missing_field", False),
        ("wrong-type-id", [m({**f("bad", 5, b"x"), "frame_id": "five"})], "error", "bad_field", False),
        ("wrong-type-image", [m({**f("bad", 5, b"x"), "image": "not bytes"})], "dropped", "bad_field", False),
        ("not-an-image", [m(f("bad", 5, b"GIF89a, or anything but JPEG/PNG"))], "dropped", "decode_error", False),
        ("truncated-jpeg", [m(f("bad", 5, bus[: len(bus) // 2]))], "dropped", "decode_error", False),
        ("other-stream", [m(f("good-cam", 5, bus))], "dropped", "stream_mismatch", False),
        ("unknown-type", [m({"type": "reboot"})], "error", "unknown_type", False),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_is_answered_to_its_sender_only(server, case):
    _id, chunks, kind, code, closes = case
    settled(server)
    counted = "decode_error" if code == "decode_error" else code
    before = error_count(server, counted)
    with GoodCamera(server.tcp_port) as cam, Wire(server.tcp_port) as bad:
        bad.hello("bad")
        for chunk in chunks:
            bad.raw(chunk)
        reply = bad.recv()
        if kind == "error":
            assert reply["type"] == "error" and reply["code"] == code, reply
        else:
            assert reply["type"] == "dropped" and reply["frame_id"] == 5, reply
            assert reply.get("code", reply["reason"]) == code and reply["message"]
            assert reply["stream_name"] in ("bad", "good-cam")  # the name the sender used, to the sender
        if closes:
            assert bad.rest() == [EOF]
        else:
            assert bad.ping() == []  # nothing else came back, and the connection carries on
        sent_then = cam.sent
        wait_for(lambda: cam.sent >= sent_then + 3, 30, "three more good results")
    cam.check(min_results=4)
    assert_counted(server, counted, before)
    assert stats(server)["streams"]["good-cam"]["drops_by_reason"] == {}


def test_slow_consumer_is_disconnected_and_memory_stays_flat(server):
    """A camera that sends and never reads: its replies pile up to --send-buffer, then it is cut off."""
    tiny = png(8, 8)
    settled(server)
    rss0 = rss_mb(server)
    before = error_count(server, "slow_consumer")
    with GoodCamera(server.tcp_port) as cam:
        for round_ in range(3):
            w = Wire(server.tcp_port, rcvbuf=4096)
            # A long name makes every drop notice bigger, so the buffer fills in fewer frames.
            name = f"deaf-{round_}-" + "x" * 100
            w.send({"type": "hello", "stream_name": name})
            sent, t0 = 0, time.monotonic()
            try:
                while time.monotonic() - t0 < 30:
                    w.send(frame(name, sent, tiny))
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
            w.close()
            assert time.monotonic() - t0 < 30, "the deaf client was never disconnected"
            assert error_count(server, "slow_consumer") == before + round_ + 1
        cam_sent = cam.sent
        wait_for(lambda: cam.sent >= cam_sent + 3, 30, "good results after the deaf clients")
    cam.check(min_results=4)
    settled(server)
    assert rss_mb(server) - rss0 < 0.05 * rss0


def test_frames_of_a_vanished_client_are_discarded_not_processed(server):
    """With the worker busy on a slow frame, a lossless camera queues 4 frames and drops off the
    network: all 4 are counted as 'disconnected' and none reaches the model."""
    settled(server)
    big = png(4096, 4096)  # ~0.2 s to decode: the victim is gone long before the worker is free
    with Wire(server.tcp_port) as blocker:
        blocker.hello("blocker", drop=False)
        blocker.send(frame("blocker", 1, big))
        blocker.send(frame("blocker", 2, big))
        wait_for(lambda: stats(server)["workers_busy"], 5, "the worker to be busy")
        victim = Wire(server.tcp_port)
        victim.hello("victim", drop=False)
        for i in range(4):
            victim.send(frame("victim", i, bus_jpeg()))
        # Received by the server first: a RST overtaking unread bytes makes the kernel discard them.
        wait_for(lambda: stats(server)["streams"].get("victim", {}).get("received") == 4, 5, "4 victim frames")
        victim.close(abort=True)
        assert [blocker.recv(30)["type"] for _ in range(2)] == ["result", "result"]
    snap = settled(server)
    gone = snap["streams"]["victim"]
    assert not gone["connected"]
    assert (gone["received"], gone["processed"], gone["drops_by_reason"]) == (4, 0, {"disconnected": 4})


# In-process servers (placeholder model, one worker): the only way to make a lane itself fail.


def placeholder_config(tmp_path, *extra: str) -> ServerConfig:
    return parse_config(["--tcp-port", "0", "--api-port", "0", "--placeholder",
                         "--workers", "1", "--log-dir", str(tmp_path), *extra],
                        environ={})


async def start_in_process(cfg: ServerConfig) -> tuple[InferenceServer, asyncio.Task]:
    srv = InferenceServer(cfg)
    task = asyncio.create_task(srv.run())
    while not srv.stats.ready:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    return srv, task


async def send_raw(conn, name: str, fid: int, side: int = 8) -> None:
    await conn.send_frame(name, fid, np.zeros((side, side, 3), np.uint8).tobytes(), encoding="raw",
                          shape=(side, side, 3))


def one_by_one(cfg: ServerConfig, name: str, sides: list[int]) -> tuple[list[dict], InferenceServer]:
    """Send raw frames of these sizes one at a time, each awaiting its answer; then stop the server."""
    async def scenario() -> tuple[list[dict], InferenceServer]:
        srv, task = await start_in_process(cfg)
        conn = await connect("127.0.0.1", srv.tcp_port, name, drop=False)
        replies = []
        for fid, side in enumerate(sides):
            await send_raw(conn, name, fid, side)
            replies.append(await asyncio.wait_for(conn.recv(), 10))
        await conn.close()
        srv.request_shutdown()
        await asyncio.wait_for(task, 10)
        return replies, srv

    return asyncio.run(scenario())


def test_worker_survives_an_exception_on_one_frame(tmp_path, monkeypatch):
    """The failing frame gets a drop notice, the worker then goes on to answer the next frames."""
    real_detect = PlaceholderDetector.detect

    def flaky(self, image):
        if image.shape[:2] == (7, 7):
            raise RuntimeError("simulated inference crash")
        return real_detect(self, image)

    monkeypatch.setattr(PlaceholderDetector, "detect", flaky)
    replies, srv = one_by_one(placeholder_config(tmp_path), "flaky", [8, 7, 8, 8])
    assert srv.stats.errors.get("worker_crash", 0) == 0
    assert [(r["type"], r["frame_id"]) for r in replies] == [("result", 0), ("dropped", 1), ("result", 2),
                                                               ("result", 3)]
    assert replies[1]["reason"] == "inference_error" and "simulated inference crash" in replies[1]["message"]


def test_a_bug_after_inference_still_answers_the_frame(tmp_path, monkeypatch):
    """The scheduler's bookkeeping raising once (a server bug, found when an edit broke it) costs
    that frame a drop notice, not its answer, and the lane goes on."""
    real = Scheduler.done
    calls = [0]

    def buggy(self, job, seconds):
        calls[0] += 1
        if calls[0] == 2:
            raise NameError("simulated bug")
        return real(self, job, seconds)

    monkeypatch.setattr(Scheduler, "done", buggy)
    replies, _ = one_by_one(placeholder_config(tmp_path), "buggy", [8, 8, 8])
    assert [(r["type"], r["frame_id"]) for r in replies] == [("result", 0), ("dropped", 1), ("result", 2)]
    assert "simulated bug" in replies[1]["message"]


def test_inference_abandoned_at_shutdown_is_answered_once(tmp_path, monkeypatch):
    """A frame still in inference when --shutdown-grace runs out gets one `shutdown` drop notice, and
    nothing more when its lane thread finishes it later."""
    real_detect = PlaceholderDetector.detect
    release = threading.Event()

    def slow(self, image):
        release.wait(5)
        return real_detect(self, image)

    monkeypatch.setattr(PlaceholderDetector, "detect", slow)
    cfg = placeholder_config(tmp_path, "--shutdown-grace", "0.3")

    async def scenario() -> tuple[list[dict], InferenceServer]:
        srv, task = await start_in_process(cfg)
        conn = await connect("127.0.0.1", srv.tcp_port, "slow", drop=False)
        await send_raw(conn, "slow", 0)
        while srv.stats.workers_busy == 0:
            await asyncio.sleep(0.01)
        srv.request_shutdown()
        replies = []
        while (msg := await asyncio.wait_for(conn.recv(), 10)) is not None:
            replies.append(msg)
        await asyncio.wait_for(task, 10)
        release.set()  # the lane now finishes the frame; its result must go nowhere
        await asyncio.sleep(0.2)
        await conn.close()
        return replies, srv

    replies, srv = asyncio.run(scenario())
    assert [(r["type"], r.get("frame_id"), r.get("reason") or r.get("code")) for r in replies] == [
        ("dropped", 0, "shutdown"), ("error", None, "shutdown")]
    assert srv.stats.processed_frames == 0 and srv.stats.dropped_frames == 1


def test_normal_client_still_served_after_all_of_the_above(server):
    with Wire(server.tcp_port) as w:
        w.hello("final", drop=False)
        w.send(frame("final", 1, bus_jpeg()))
        assert is_bus(w.recv())
    assert "without --token" not in server.log()  # loopback bind: no exposure warning
