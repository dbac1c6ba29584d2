"""Thousands of malformed messages over many connections to the real server; a normal camera is served throughout."""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import httpx
import msgpack
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import (
    EOF,
    GoodCamera,
    Wire,
    bus_jpeg,
    metrics,
    rss_mb,
    settled,
    stats,
)

SEED = int(os.environ.get("VISIONSTREAM_FUZZ_SEED", "20261124"))
CONNECTIONS = 300
MESSAGES_PER_CONNECTION = (10, 30)  # inclusive range: ~6,000 messages in all
PARALLEL = 12
READ_TIMEOUT = 5.0  # long enough that waiting for a worker's answers never looks idle
REPLY_KINDS = {"welcome", "error", "dropped", "result", "pong"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("fuzz"), "--read-timeout", str(READ_TIMEOUT)) as handle:
        yield handle


def _encoded(ext: str, h: int, w: int) -> bytes:
    ok, buf = cv2.imencode(ext, np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


SMALL_PNG = _encoded(".png", 8, 8)
SMALL_JPEG = _encoded(".jpg", 16, 16)
HUGE_JPEG_HEADER = (b"\xff\xd8\xff\xc0\x00\x11\x08" + (9000).to_bytes(2, "big") * 2 + b"\x03"
                    + b"\x01\x22\x00" * 3 + b"\xff\xd9")


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def packed(obj: Any) -> bytes:
    return framed(msgpack.packb(obj, use_bin_type=True))


class Fuzzer:
    """Builds one connection's worth of hostile traffic from a seeded RNG."""

    def __init__(self, rng: random.Random, conn: int) -> None:
        self.rng = rng
        self.names = [f"fz{conn}-{k}" for k in range(3)]
        self.used: set[str] = set()  # every stream name this connection put on the wire

    def _note(self, msg: dict[str, Any]) -> dict[str, Any]:
        if isinstance(msg.get("stream_name"), str):
            self.used.add(msg["stream_name"])
        return msg

    def junk_value(self) -> Any:
        r = self.rng
        return r.choice([None, True, -1, 2**63, 2**64 - 1, -(2**63), 3.5, math.nan, math.inf, "", "x" * r.randint(1, 300),
                         r.randbytes(r.randint(0, 40)), [1, 2, 3], {"a": 1}, [[[]]], "\u202e\u0000\n"])

    def image(self) -> tuple[bytes, dict[str, Any]]:
        r = self.rng
        choice = r.randrange(11)
        if choice == 0:
            return r.randbytes(r.randint(1, 500)), {}
        if choice == 1:
            return SMALL_JPEG[: r.randint(3, len(SMALL_JPEG) - 3)], {}  # truncated JPEG
        if choice == 2:
            return b"\x89PNG\r\n\x1a\n" + r.randbytes(r.randint(0, 100)), {}
        if choice == 3:
            return b"\xff\xd8\xff" + r.randbytes(r.randint(0, 100)), {}
        if choice == 4:
            return HUGE_JPEG_HEADER, {}
        if choice == 5:
            return SMALL_PNG, {}
        if choice == 6:
            return SMALL_JPEG, {"encoding": r.choice(["jpeg", "png"])}
        if choice == 7:
            h, w = r.randint(1, 8), r.randint(1, 8)
            n = h * w * 3 + r.choice([0, 0, -1, 1, 7])
            return r.randbytes(max(n, 1)), {"encoding": "raw", "shape": [h, w, 3]}
        if choice == 8:
            return b"", {}
        if choice == 9:
            return r.randbytes(10), {"encoding": "raw", "shape": self.rng.choice([[1, 2], [0, 4, 3], [2, 2, 4], [9000, 1, 3],
                                                                                   ["a", 1, 3], [True, 1, 3]])}
        return r.randbytes(10), {"encoding": r.choice(["gif", "", "RAW", 5])}

    def frame(self, name: str) -> dict[str, Any]:
        r = self.rng
        image, extra = self.image()
        msg: dict[str, Any] = {"type": "frame", "stream_name": name, "frame_id": r.randint(0, 10**6),
                               "timestamp": time.time(), "image": image, **extra}
        mutation = r.randrange(6)
        if mutation == 0:
            del msg[r.choice(["stream_name", "frame_id", "timestamp", "image", "type"])]
        elif mutation == 1:
            msg[r.choice(["stream_name", "frame_id", "timestamp", "image", "encoding", "shape"])] = self.junk_value()
        elif mutation == 2:
            msg[self.rng.choice(["x", "frame", "\u00e9t\u00e9"])] = self.junk_value()  # unknown keys
        return self._note(msg)

    def message(self) -> bytes:
        r = self.rng
        kind = r.randrange(12)
        if kind == 0:  # a correct length around random payload bytes
            return framed(r.randbytes(r.randint(1, 200)))
        if kind == 1:  # well-formed msgpack that is not a map
            return packed(r.choice([1, "frame", [1, 2], None, b"\x00", 2.5, [{"type": "frame"}]]))
        if kind == 2:  # beyond the msgpack limits
            return packed(r.choice([{"type": "ping", "id": "x" * 5000}, {"type": "ping", "id": list(range(40))},
                                    {f"k{i}": i for i in range(40)}, {"type": "ping", "id": [[[[[[]]]]]] * 16},
                                    {1: "int key", "type": "ping"}]))
        if kind == 3:
            return packed({"type": self.junk_value() if r.random() < 0.5 else r.choice(["Frame", "pong", "result", "x" * 400])})
        if kind == 4:
            return packed(self._note({"type": "hello",
                                      "stream_name": r.choice([*self.names, "bad name", "-x", "a" * 200,
                                                               self.junk_value()]),
                                      "drop": r.choice([True, False, "yes", None]), "token": r.choice(["t", 5, None])}))
        if kind == 5:
            return packed({"type": "ping", "id": self.junk_value()})
        if kind == 6:  # a frame of a name this connection did not open (or a bad name)
            return packed(self.frame(r.choice([*self.names, "", "../x", "n" * 129])))
        return packed(self.frame(self.names[0]))  # mostly frames of the connection's own stream

    def ending(self) -> tuple[str, bytes]:
        r = self.rng
        kind = r.choice(["close", "close", "rst", "too_large", "half", "random"])
        if kind == "too_large":
            return kind, r.randint(16 * 2**20 + 1, 2**32 - 1).to_bytes(4, "big") + r.randbytes(r.randint(0, 100))
        if kind == "half":
            whole = packed(self.frame(self.names[0]))
            return kind, whole[: r.randint(1, len(whole) - 1)]
        if kind == "random":
            return kind, r.randbytes(r.randint(1, 300))
        return kind, b""


@dataclass
class Outcome:
    messages: int = 0
    replies: Counter = field(default_factory=Counter)  # by error code / drop reason / type
    problems: list[str] = field(default_factory=list)


def classify(msg: dict[str, Any]) -> str:
    if msg["type"] == "error":
        return msg["code"]
    if msg["type"] == "dropped":
        return msg.get("code", msg["reason"])
    return msg["type"]


def one_connection(port: int, conn: int) -> Outcome:
    rng = random.Random(SEED * 100_003 + conn)
    fz = Fuzzer(rng, conn)
    out = Outcome()
    body = b"".join(fz.message() for _ in range(rng.randint(*MESSAGES_PER_CONNECTION)))
    if rng.random() < 0.5:  # half the connections say hello first (sometimes lossless)
        body = packed({"type": "hello", "stream_name": fz.names[0], "drop": rng.random() < 0.7}) + body
    out.messages = len(list(msg for msg in _split(body)))
    ending, tail = fz.ending()
    with Wire(port) as w:
        w.raw(body)
        replies = w.ping(ident=f"sync-{conn}", timeout=30)
        # Frames answered by a worker (results, decode errors, supersedes) may come after the pong.
        while len(replies) < out.messages:
            msg = w.recv(timeout=30)
            if msg == EOF:
                out.problems.append(f"conn {conn}: closed after {len(replies)}/{out.messages} answers")
                break
            replies.append(msg)
        allowed = {*fz.used, ""}
        for msg in replies:
            if msg.get("type") not in REPLY_KINDS:
                out.problems.append(f"conn {conn}: unexpected {msg}")
            elif "stream_name" in msg and msg["stream_name"] not in allowed and msg["type"] != "welcome":
                out.problems.append(f"conn {conn}: got another stream's message {msg}")
            out.replies[classify(msg)] += 1
        if len(replies) != out.messages:
            out.problems.append(f"conn {conn}: {out.messages} messages, {len(replies)} answers")
        try:
            if tail:
                w.raw(tail)
            if ending == "too_large":
                rest = w.rest(timeout=10)
                if [classify(m) if m != EOF else m for m in rest] != ["frame_too_large", EOF]:
                    out.problems.append(f"conn {conn}: oversized prefix answered with {rest}")
                out.replies["frame_too_large"] += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        w.close(abort=ending == "rst")
    return out


def _split(body: bytes):
    i = 0
    while i < len(body):
        n = int.from_bytes(body[i:i + 4], "big")
        yield body[i + 4:i + 4 + n]
        i += 4 + n


def test_live_fuzz_leaves_server_healthy_and_other_streams_untouched(server):
    rss0 = rss_mb(server)
    errors0 = Counter(stats(server)["errors_by_code"])
    t0 = time.monotonic()
    with GoodCamera(server.tcp_port, "fuzz-good") as cam, ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(lambda c: one_connection(server.tcp_port, c), range(CONNECTIONS)))
        sent_during = cam.sent
    took = time.monotonic() - t0
    messages = sum(o.messages for o in outcomes)
    replies = sum((o.replies for o in outcomes), Counter())
    problems = [p for o in outcomes for p in o.problems]
    print(f"\nfuzz seed {SEED}: {messages} messages over {CONNECTIONS} connections in {took:.1f}s; "
          f"good camera {sent_during} frames; answers {dict(replies.most_common())}")
    assert not problems, problems[:10]
    assert messages >= 2000

    # The server is healthy and the good camera got every result, identical, and nothing else.
    health = httpx.get(f"{server.base_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["ready"] is True
    cam.check(min_results=10)
    snap = settled(server)
    assert snap["streams"]["fuzz-good"]["drops_by_reason"] == {}
    assert snap["errors_by_code"].get("internal", 0) == 0 and snap["errors_by_code"].get("worker_crash", 0) == 0

    # Every kind of hostile input was exercised, and every error a fuzzer saw was counted, in /stats
    # and /metrics alike.
    for code in ("malformed", "missing_field", "bad_field", "bad_stream_name", "unknown_type", "unexpected_hello",
                 "stream_mismatch", "bad_shape", "frame_too_large", "decode_error"):
        assert replies[code] > 0, f"the fuzz never produced {code}"
    counted = Counter(snap["errors_by_code"]) - errors0
    for code, seen in replies.items():
        if code not in REPLY_KINDS and code not in ("superseded", "stale", "queue_full"):
            assert counted[code] >= seen, f"{code}: fuzzers saw {seen}, server counted {counted[code]}"
    prom = metrics(server)
    for code, n in snap["errors_by_code"].items():
        assert prom[("visionstream_errors_total", (("code", code),))] == n
    assert rss_mb(server) < rss0 * 1.10, "fuzzing grew the server's memory"

    # A fresh normal client still gets bus.jpg detected.
    with Wire(server.tcp_port) as w:
        w.hello("after-fuzz")
        w.send({"type": "frame", "stream_name": "after-fuzz", "frame_id": 1, "timestamp": time.time(),
                "image": bus_jpeg()})
        result = w.recv()
    assert result["type"] == "result" and "bus" in [d["label"] for d in result["detections"]]
