"""A lossless camera for the benches: keeps a window of frames outstanding, so the server is never idle for it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg


def lossless_stream(port: int, name: str, frames: Sequence[bytes], window: int, stop: Callable[[], bool],
                    results: list[float]) -> None:
    """Send `frames` (in turn) as stream `name` with `window` outstanding until `stop()`, then wait for the
    last answers; appends each result's perf_counter time to `results`."""
    sock = socket.create_connection(("127.0.0.1", port))
    dec = FrameDecoder(limits=CLIENT_LIMITS)
    sock.sendall(encode(hello_msg(name, drop=False)))
    sent = answered = 0
    pending: list[Any] = []
    try:
        while True:
            while sent - answered < window and not stop():
                sock.sendall(encode(frame_msg(name, sent, frames[sent % len(frames)], timestamp=time.time())))
                sent += 1
            if answered >= sent:
                return
            while not pending:
                data = sock.recv(1 << 16)
                if not data:
                    return
                pending.extend(dec.feed(data))
            msg = pending.pop(0)
            if msg.get("type") in ("result", "dropped"):
                answered += 1
                if msg["type"] == "result":
                    results.append(time.perf_counter())
    finally:
        sock.close()
