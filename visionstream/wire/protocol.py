"""Wire protocol v1: length-prefixed msgpack maps, as a pure encoder/decoder (no sockets)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from visionstream.wire.errors import FrameTooLarge, InvalidMessage, MalformedMessage, ProtocolError

PROTOCOL_VERSION: Final = 1
HEADER_SIZE: Final = 4
# 16 MiB holds an uncompressed 2560x2048 BGR frame with room to spare.
DEFAULT_MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
MAX_STREAM_NAME_LEN: Final = 128
MAX_TOKEN_LEN: Final = 1024
TOKEN_ENV: Final = "VISIONSTREAM_TOKEN"  # where the server and every client look for the shared secret
MAX_IMAGE_DIM: Final = 8192
# --max-pixels default: 16 Mpx, twice 4K UHD (8.3 Mpx), above 12 MP camera sensors (see docs/RELIABILITY.md).
DEFAULT_MAX_PIXELS: Final = 1 << 24
MAX_FRAME_ID: Final = 2**63 - 1
STREAM_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
ENCODINGS: Final = frozenset({"jpeg", "png", "raw"})


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """msgpack limits, enforced while unpacking so a hostile payload cannot balloon."""

    max_str_len: int
    max_array_len: int
    max_map_len: int
    # Only str/bytes map keys (msgpack's anti-hashdos default); clients must accept the int-keyed
    # label map (`names`) that `welcome_msg` sends.
    strict_map_key: bool = True
    # Arrays + maps in one message (None: no cap). The per-container caps above do not bound their
    # number: 16 MiB of nested empty maps unpacks to ~1 GB of objects and blocks the loop for seconds.
    max_containers: int | None = None


# A server only ever needs small maps from clients; clients receive detections and label maps.
SERVER_LIMITS: Final = UnpackLimits(max_str_len=4096, max_array_len=16, max_map_len=32, max_containers=64)
CLIENT_LIMITS: Final = UnpackLimits(
    max_str_len=1 << 20, max_array_len=100_000, max_map_len=100_000, strict_map_key=False
)


def encode(msg: dict[str, Any]) -> bytes:
    """One message as bytes: 4-byte big-endian length, then the msgpack map."""
    if not isinstance(msg, dict):
        raise TypeError(f"a message must be a dict, not {type(msg).__name__}")
    payload = msgpack.packb(msg, use_bin_type=True)
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Incremental decoder: feed it bytes in any chunking, get whole messages back.

    `feed` returns, in order, a dict for each complete message and a `ProtocolError` instance for
    each complete but unusable payload (framing stays intact, so decoding continues). A length
    prefix over the limit raises `FrameTooLarge` before any payload byte is buffered; after that
    the stream is unrecoverable and every later `feed` raises the same error. Messages completed
    earlier in the same chunk are returned first, and the error is raised by the next `feed`.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        limits: UnpackLimits = SERVER_LIMITS,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._limits = limits
        self._buf = bytearray()
        self._start = 0  # bytes of `_buf` already decoded (dropped lazily, on the next append)
        self._fatal: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received and not yet decoded (a half-sent message, or messages past a `limit`)."""
        return len(self._buf) - self._start

    @property
    def failed(self) -> ProtocolError | None:
        """The fatal error, once the stream is unrecoverable (the next `feed` raises it)."""
        return self._fatal

    def feed(self, data: bytes, limit: int | None = None) -> list[dict[str, Any] | ProtocolError]:
        """Decode `data` (after what is buffered). With `limit`, at most that many messages are decoded
        and the rest stay buffered: `feed(b"", limit)` goes on, so a caller can bound the work of one
        call however many tiny messages one read holds."""
        if self._fatal is not None:
            raise self._fatal
        # Parse in place: straight from `data` when nothing is pending, so whole messages are
        # never copied into the buffer; only an undecoded tail is kept.
        if self._start < len(self._buf):
            if data:
                del self._buf[:self._start]  # one move per append, not one per message or per call
                self._start = 0
                self._buf += data
            src: bytes | bytearray = self._buf
            pos = self._start
        else:
            src = data
            pos = 0
        out: list[dict[str, Any] | ProtocolError] = []
        n = len(src)
        with memoryview(src) as view:
            while n - pos >= HEADER_SIZE and (limit is None or len(out) < limit):
                size = int.from_bytes(view[pos:pos + HEADER_SIZE], "big")
                if size > self.max_frame_bytes:
                    self._fatal = FrameTooLarge(size, self.max_frame_bytes)
                    pos = n  # nothing after a bad header can be trusted
                    if out:  # deliver what arrived intact before the bad header (chunking-independent)
                        break
                    view.release()
                    self._buf = bytearray()
                    self._start = 0
                    raise self._fatal
                end = pos + HEADER_SIZE + size
                if end > n:
                    break
                out.append(self._unpack(view[pos + HEADER_SIZE:end]))
                pos = end
        if src is self._buf:
            if pos >= n:
                self._buf = bytearray()
                self._start = 0
            else:
                self._start = pos
        elif pos < n:
            self._buf = bytearray(src[pos:])
            self._start = 0
        return out

    def _unpack(self, payload: memoryview) -> dict[str, Any] | ProtocolError:
        if not payload:
            return MalformedMessage("empty message (length 0)")
        lim = self._limits
        hooks: dict[str, Any] = {}
        if lim.max_containers is not None:
            hooks["list_hook"] = hooks["object_hook"] = _ContainerBudget(lim.max_containers)
        try:
            obj = msgpack.unpackb(
                payload,
                raw=False,
                strict_map_key=lim.strict_map_key,
                max_bin_len=self.max_frame_bytes,
                max_str_len=lim.max_str_len,
                max_array_len=lim.max_array_len,
                max_map_len=lim.max_map_len,
                max_ext_len=0,
                **hooks,
            )
        except _TooManyContainers:
            return MalformedMessage(f"payload has more than {lim.max_containers} arrays and maps")
        except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, ...)
            return MalformedMessage(f"payload is not valid msgpack: {type(exc).__name__}")
        if not isinstance(obj, dict):
            return MalformedMessage(f"payload must be a msgpack map, got {type(obj).__name__}")
        return obj


class _TooManyContainers(Exception):
    pass


class _ContainerBudget:
    """msgpack hook counting finished arrays/maps; raising aborts unpacking before more are built."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers
        return obj


# --------------------------------------------------------------------------- client -> server


@dataclass(frozen=True, slots=True)
class Hello:
    stream_name: str | None
    token: str | None
    drop: bool  # False: lossless, backpressure instead of drops


@dataclass(frozen=True, slots=True)
class Frame:
    stream_name: str
    frame_id: int
    timestamp: float
    image: bytes
    encoding: str | None  # None: sniff JPEG/PNG
    shape: tuple[int, int, int] | None


@dataclass(frozen=True, slots=True)
class Ping:
    id: Any


ClientMessage = Hello | Frame | Ping


def _field(msg: dict[str, Any], name: str, kinds: type | tuple[type, ...], required: bool = True) -> Any:
    if name not in msg:
        if required:
            raise InvalidMessage(f"missing field '{name}'", code="missing_field")
        return None
    value = msg[name]
    # bool is an int subclass; a frame_id of True is a bug on the client, not an id.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidMessage(f"field '{name}' has type bool", code="bad_field")
    if not isinstance(value, kinds):
        raise InvalidMessage(f"field '{name}' has type {type(value).__name__}", code="bad_field")
    return value


def validate_stream_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidMessage(f"stream_name must be a string, got {type(name).__name__}", code="bad_field")
    if not STREAM_NAME_RE.fullmatch(name):  # not .match: its '$' also matches before a final '\n'
        raise InvalidMessage(
            "stream_name must be 1-128 characters of letters, digits, '_', '.', '-' "
            "and must not start with '.' or '-'",
            code="bad_stream_name",
        )
    return name


def parse_client_message(msg: dict[str, Any]) -> ClientMessage:
    """Validate one decoded map from a client; raises `InvalidMessage` with a precise reason."""
    kind = msg.get("type")
    if kind == "frame":
        return _parse_frame(msg)
    if kind == "hello":
        name = _field(msg, "stream_name", str, required=False)
        token = _field(msg, "token", str, required=False)
        drop = _field(msg, "drop", bool, required=False)
        if token is not None and len(token) > MAX_TOKEN_LEN:
            raise InvalidMessage("token too long", code="bad_field")
        return Hello(
            stream_name=None if name is None else validate_stream_name(name),
            token=token,
            drop=True if drop is None else drop,
        )
    if kind == "ping":
        return Ping(id=msg.get("id"))
    if not isinstance(kind, str):
        raise InvalidMessage("missing or non-string field 'type'", code="missing_field")
    raise InvalidMessage(f"unknown message type '{kind[:32]}'", code="unknown_type")


def _parse_frame(msg: dict[str, Any]) -> Frame:
    name = validate_stream_name(_field(msg, "stream_name", str))
    frame_id = _field(msg, "frame_id", int)
    if not 0 <= frame_id <= MAX_FRAME_ID:
        raise InvalidMessage(f"frame_id must be in [0, 2^63), got {frame_id}", code="bad_field")
    timestamp = float(_field(msg, "timestamp", (int, float)))
    if not math.isfinite(timestamp):
        raise InvalidMessage("timestamp must be finite", code="bad_field")
    image = _field(msg, "image", (bytes, bytearray))
    if not image:
        raise InvalidMessage("image is empty", code="bad_field")
    encoding = _field(msg, "encoding", str, required=False)
    if encoding is not None and encoding not in ENCODINGS:
        raise InvalidMessage(f"encoding must be one of {sorted(ENCODINGS)}", code="bad_field")
    shape = None
    if encoding == "raw":
        shape = _parse_shape(_field(msg, "shape", (list, tuple)))
        if len(image) != shape[0] * shape[1] * shape[2]:
            raise InvalidMessage(
                f"raw image has {len(image)} bytes but shape {list(shape)} needs "
                f"{shape[0] * shape[1] * shape[2]}",
                code="bad_shape",
            )
    return Frame(name, frame_id, timestamp, bytes(image), encoding, shape)


def _parse_shape(shape: list[Any]) -> tuple[int, int, int]:
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        raise InvalidMessage("shape must be [height, width, 3] integers", code="bad_shape")
    h, w, c = shape
    if c != 3 or not (0 < h <= MAX_IMAGE_DIM and 0 < w <= MAX_IMAGE_DIM):
        raise InvalidMessage(
            f"shape must be [h, w, 3] with 1 <= h, w <= {MAX_IMAGE_DIM}, got {list(shape)}",
            code="bad_shape",
        )
    return h, w, c


# --------------------------------------------------------------------------- server -> client


def welcome_msg(*, model: str, names: dict[int, str], stream_name: str, drop: bool, **extra: Any) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": PROTOCOL_VERSION,
        "model": model,
        "names": names,
        "stream_name": stream_name,
        "drop": drop,
        **extra,
    }


def result_msg(stream_name: str, frame_id: int, detections: list[dict[str, Any]], *, latency_ms: float,
               timings: dict[str, float], timestamp: float | None, image_size: tuple[int, int],
               server_time: float) -> dict[str, Any]:
    return {"type": "result", "stream_name": stream_name, "frame_id": frame_id, "detections": detections,
            "latency_ms": latency_ms, "timings": timings, "timestamp": timestamp, "image_size": list(image_size),
            "server_time": server_time}


def dropped_msg(stream_name: str, frame_id: int, reason: str) -> dict[str, Any]:
    return {"type": "dropped", "stream_name": stream_name, "frame_id": frame_id, "reason": reason}


def error_msg(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


def frame_msg(
    stream_name: str,
    frame_id: int,
    image: bytes,
    *,
    timestamp: float,
    encoding: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """The client-side builder of a frame message (so clients never spell fields by hand)."""
    msg: dict[str, Any] = {
        "type": "frame",
        "stream_name": stream_name,
        "frame_id": frame_id,
        "timestamp": timestamp,
        "image": image,
    }
    if encoding is not None:
        msg["encoding"] = encoding
    if shape is not None:
        msg["shape"] = list(shape)
    return msg


def hello_msg(stream_name: str, *, token: str | None = None, drop: bool = True) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "hello", "stream_name": stream_name, "drop": drop}
    if token is not None:
        msg["token"] = token
    return msg
