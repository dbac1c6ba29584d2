"""500 abrupt connect/disconnect cycles against the real server leave no tasks, sockets, streams or memory behind."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import Wire, bus_jpeg, frame, settled, stats, wait_for
from visionstream.wire.protocol import encode

CYCLES = 500
WARMUP = 60
PARALLEL = 8
RECENT_STREAMS = 64  # stats.RECENT_STREAMS: disconnected streams still shown in /stats


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("churn")) as handle:
        yield handle


def one_cycle(port: int, i: int, image: bytes) -> None:
    """One misbehaving client; the kind rotates so every way of vanishing is exercised."""
    kind = i % 6
    name = f"churn-{i}"
    try:
        w = Wire(port)
    except ConnectionRefusedError:
        raise AssertionError(f"cycle {i}: server refused a connection") from None
    try:
        if kind >= 2:
            w.send({"type": "hello", "stream_name": name, "drop": kind != 4})
        if kind == 3:  # a whole frame, then vanish half-way through the next one
            w.send(frame(name, 0, image))
            w.raw(encode(frame(name, 1, image))[: len(image) // 2])
        elif kind == 4:  # lossless frames queued for a client that leaves without reading them (FIN:
            # a RST racing ahead of the data would make the kernel discard the frames unread)
            for fid in range(3):
                w.send(frame(name, fid, image))
        elif kind == 5:  # half a length prefix
            w.raw(b"\x00\x00")
    except (BrokenPipeError, ConnectionResetError):
        pass
    w.close(abort=kind in (1, 2, 3))  # RST like a dropped network, else FIN


def churn(port: int, start: int, n: int) -> None:
    image = bus_jpeg()
    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(lambda i: one_cycle(port, i, image), range(start, start + n)))


def footprint(server) -> dict[str, float]:
    proc = psutil.Process(server.proc.pid)
    snap = settled(server)
    return {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds(), "threads": proc.num_threads(),
            "tasks": snap["process"]["tasks"]}


def test_abrupt_disconnect_cycles_leak_nothing(server):
    churn(server.tcp_port, 0, WARMUP)  # first connections, first inference, allocator arenas
    base = footprint(server)
    before = stats(server)
    t0 = time.monotonic()
    churn(server.tcp_port, WARMUP, CYCLES)
    took = time.monotonic() - t0
    # "settled" (no clients, nothing in flight) can be read before the loop has run the accept callback of
    # the last connections the kernel already took: wait for the count itself, then check it exactly.
    wait_for(lambda: stats(server)["connections_total"] - before["connections_total"] >= CYCLES, 10,
             f"{CYCLES} connections counted")
    after_stats = settled(server)

    def back_to_base() -> dict[str, float] | None:
        now = footprint(server)
        return now if now["fds"] <= base["fds"] and now["tasks"] <= base["tasks"] else None

    after = wait_for(back_to_base, 10, f"sockets and tasks back to {base}")
    print(f"\n{CYCLES} cycles in {took:.1f}s; before {base}; after {after}")
    assert after_stats["connections_total"] - before["connections_total"] == CYCLES
    assert after_stats["clients"] == 0 and after_stats["in_flight"] == 0
    assert len(after_stats["streams"]) <= RECENT_STREAMS
    assert after["threads"] <= base["threads"]
    # Lossless frames of vanished clients were discarded and counted (after a FIN, the first reply
    # finds the client gone; a half-closed client would still be reading, so it is tried).
    gone = after_stats["drops_by_reason"].get("disconnected", 0) - before["drops_by_reason"].get("disconnected", 0)
    assert gone > 0
    assert after["rss_mb"] < base["rss_mb"] * 1.05, f"RSS grew {base['rss_mb']:.1f} -> {after['rss_mb']:.1f} MB"
    # Still serving.
    with Wire(server.tcp_port) as w:
        w.hello("after-churn")
        w.send(frame("after-churn", 1, bus_jpeg()))
        assert w.recv()["type"] == "result"
