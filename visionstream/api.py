"""The Python API for embedding: `detect(image)` in one call, `DetectClient` to reuse one connection."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path
from typing import Any, Final

import numpy as np

from visionstream.client.connection import Connection, connect
from visionstream.client.sources import encode_frame
from visionstream.wire.errors import ClientError

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9000
DEFAULT_TIMEOUT: Final = 30.0  # seconds for one answer; a first frame on a cold CPU model can take a few
Image = np.ndarray | bytes | str | Path

__all__ = ["ClientError", "DetectClient", "Image", "detect"]


def _payload(image: Image) -> bytes:
    """JPEG/PNG bytes for the frame message: bytes as given, a path's file, an array encoded as JPEG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read image {image}: {exc.strerror or exc}") from None
    if isinstance(image, np.ndarray):
        try:
            return encode_frame(image, "jpeg", quality=95)[0]
        except ValueError as exc:
            raise ClientError(str(exc)) from None
    raise ClientError(f"image must be a BGR numpy array, JPEG/PNG bytes or a path, not {type(image).__name__}")


class DetectClient:
    """A synchronous client holding one connection (lossless stream) for many `detect` calls.

    with DetectClient(port=9000) as client:
        for path in paths:
            print(client.detect(path))
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, token: str | None = None,
                 stream: str | None = None, tls: ssl.SSLContext | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.token, self.tls = host, port, token, tls
        # A name of its own: two clients on one name would take the stream from each other.
        self.stream = stream or f"api-{uuid.uuid4().hex[:8]}"
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._conn: Connection | None = None
        self._next_id = 0
        self.welcome: dict[str, Any] | None = None

    def detect(self, image: Image) -> list[dict[str, Any]]:
        """The detections for one image: dicts with bbox [x1, y1, x2, y2] in pixels, conf, cls and label.
        Raises ClientError when the server cannot be reached, refuses the frame or does not answer."""
        return self._loop.run_until_complete(self._detect(_payload(image)))

    async def _detect(self, payload: bytes) -> list[dict[str, Any]]:
        if self._conn is None:
            # drop=False: an API call wants its answer, not a real-time drop.
            self._conn = await connect(self.host, self.port, self.stream, token=self.token, drop=False,
                                       retries=1, tls=self.tls)
            self.welcome = self._conn.welcome
        frame_id, self._next_id = self._next_id, self._next_id + 1
        try:
            await self._conn.send_frame(self.stream, frame_id, payload)
            while True:
                msg = await asyncio.wait_for(self._conn.recv(), self.timeout)
                if msg is None:
                    raise ClientError("server closed the connection")
                if msg.get("frame_id") != frame_id:
                    continue  # pongs, notices, a late answer to an earlier timed-out call
                if msg.get("type") == "result":
                    return list(msg.get("detections") or [])
                reason = msg.get("reason") or f"{msg.get('code')}: {msg.get('message')}"
                raise ClientError(f"server did not detect on the image ({msg.get('type')}: {reason})")
        except asyncio.TimeoutError:
            await self._drop_connection()
            raise ClientError(f"no answer from {self.host}:{self.port} within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self._drop_connection()
            raise ClientError(f"connection to {self.host}:{self.port} lost ({exc or type(exc).__name__})") \
                from None

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._drop_connection())
            self._loop.close()

    def __enter__(self) -> DetectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect(image: Image, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
           tls: ssl.SSLContext | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Detections for one image (BGR numpy array, JPEG/PNG bytes or a path) from a running server.

    One connection per call; use DetectClient for many images.
    """
    with DetectClient(host, port, token=token, tls=tls, timeout=timeout) as client:
        return client.detect(image)
