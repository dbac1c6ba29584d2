"""A bench camera: keeps a window of frames outstanding (the server is never idle for it), or paces them."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from visionstream.wire.errors import ProtocolError
from visionstream.wire.protocol import CLIENT_LIMITS, FrameDecoder, encode, frame_msg, hello_msg


def lossless_stream(port: int, name: str, frames: Sequence[bytes], window: int, stop: Callable[[], bool],
                    on_result: Callable[[dict[str, Any]], None], fps: float = 0.0) -> None:
    """Send `frames` (in turn) as lossless stream `name` until `stop()`, with at most `window` outstanding, as
    fast as answers come (`fps` 0) or paced at `fps`; then wait for the last answers. Calls `on_result(msg)`
    for each result."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dec = FrameDecoder(limits=CLIENT_LIMITS)
    sock.sendall(encode(hello_msg(name, drop=False)))
    sent = answered = 0
    next_at = time.perf_counter()
    try:
        while True:
            now = time.perf_counter()
            while not stop() and sent - answered < window and (not fps or now >= next_at):
                sock.sendall(encode(frame_msg(name, sent, frames[sent % len(frames)], timestamp=time.time())))
                sent += 1
                next_at += 1.0 / fps if fps else 0.0
            if answered >= sent and stop():
                return
            # paced with room in the window: wake for the next send; else wait for an answer
            sock.settimeout(max(0.001, next_at - time.perf_counter()) if fps and sent - answered < window else 60)
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                return
            for msg in dec.feed(data):
                if isinstance(msg, ProtocolError):  # the server's bytes do not parse: the bench's figures are void
                    raise msg
                if msg.get("type") in ("result", "dropped"):
                    answered += 1
                    if msg["type"] == "result":
                        on_result(msg)
    finally:
        sock.close()
