"""Property tests of the wire protocol: chunking independence, round trips, validation totality."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visionstream.wire.errors import FrameTooLarge, InvalidMessage, MalformedMessage, ProtocolError
from visionstream.wire.protocol import (
    CLIENT_LIMITS,
    ENCODINGS,
    HEADER_SIZE,
    MAX_FRAME_ID,
    MAX_IMAGE_DIM,
    MAX_TOKEN_LEN,
    SERVER_LIMITS,
    STREAM_NAME_RE,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    UnpackLimits,
    dropped_msg,
    encode,
    error_msg,
    frame_msg,
    hello_msg,
    parse_client_message,
    welcome_msg,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMIT = 256  # a small max_frame_bytes so random headers are sometimes in range
INVALID_CODES = {"missing_field", "bad_field", "bad_stream_name", "bad_shape", "unknown_type"}

# --------------------------------------------------------------------------- strategies

stream_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", fullmatch=True)
frame_ids = st.integers(0, MAX_FRAME_ID)
timestamps = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53))
images = st.binary(min_size=1, max_size=300)
texts = st.text(max_size=40)


@st.composite
def frames(draw: st.DrawFn) -> tuple[dict[str, Any], Frame]:
    name, fid, ts = draw(stream_names), draw(frame_ids), draw(timestamps)
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        image = draw(st.binary(min_size=h * w * 3, max_size=h * w * 3))
        msg = frame_msg(name, fid, image, timestamp=ts, encoding="raw", shape=(h, w, 3))
        return msg, Frame(name, fid, float(ts), image, "raw", (h, w, 3))
    encoding = draw(st.sampled_from([None, "jpeg", "png"]))
    image = draw(images)
    return frame_msg(name, fid, image, timestamp=ts, encoding=encoding), Frame(
        name, fid, float(ts), image, encoding, None
    )


@st.composite
def hellos(draw: st.DrawFn) -> tuple[dict[str, Any], Hello]:
    name = draw(stream_names)
    token = draw(st.none() | st.text(max_size=MAX_TOKEN_LEN // 8))
    drop = draw(st.booleans())
    return hello_msg(name, token=token, drop=drop), Hello(name, token, drop)


ping_ids = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | texts | st.binary(max_size=20)


@st.composite
def pings(draw: st.DrawFn) -> tuple[dict[str, Any], Ping]:
    if draw(st.booleans()):
        return {"type": "ping"}, Ping(None)
    ping_id = draw(ping_ids)
    return {"type": "ping", "id": ping_id}, Ping(ping_id)


client_messages = st.one_of(frames(), hellos(), pings())

server_messages = st.one_of(
    st.builds(
        welcome_msg,
        model=texts,
        names=st.dictionaries(st.integers(0, 1000), texts, max_size=100),
        stream_name=stream_names,
        drop=st.booleans(),
    ),
    st.builds(dropped_msg, stream_names, frame_ids, texts),
    st.builds(error_msg, texts, st.text(max_size=500)),
)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=min(len(data) + 2, 40))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Arbitrary msgpack-able values (ints within msgpack's range, str-keyed maps).
msgpack_ints = st.integers(-(2**63), 2**64 - 1)
leaves = st.none() | st.booleans() | msgpack_ints | st.floats() | texts | st.binary(max_size=40)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=5),
    max_leaves=20,
)

FIELDS = ["type", "stream_name", "frame_id", "timestamp", "image", "encoding", "shape", "token", "drop", "id"]
interesting = st.one_of(
    values,
    st.sampled_from(["hello", "frame", "ping", "raw", "jpeg", "png", "", "cam", "../x", "cam\n"]),
    st.sampled_from([0, 1, -1, MAX_FRAME_ID, MAX_FRAME_ID + 1, 2**64 - 1, True, False]),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308]),
    st.lists(st.integers(-2, MAX_IMAGE_DIM + 2) | st.booleans() | st.floats(0, 10), max_size=4),
    st.just([2, 2, 3]),
    st.binary(min_size=0, max_size=15),
)


@st.composite
def client_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Dicts near the valid ones: known field names with odd values, plus random keys."""
    msg: dict[str, Any] = {}
    if draw(st.booleans()):
        base, _ = draw(client_messages)
        msg.update(base)
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            msg.pop(key, None)
        else:
            msg[key] = draw(interesting)
    msg.update(draw(st.dictionaries(texts, values, max_size=3)))
    return msg


@st.composite
def stream_pieces(draw: st.DrawFn) -> bytes:
    """One piece of a byte stream: a valid message, a framed junk payload, or raw junk."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return encode(draw(client_messages)[0])
    if kind == 1:
        payload = draw(st.binary(max_size=SMALL_LIMIT))
        return len(payload).to_bytes(HEADER_SIZE, "big") + payload
    if kind == 2:  # msgpack that is valid but maybe not a map / over the limits
        payload = msgpack.packb(draw(values), use_bin_type=True)
        return len(payload).to_bytes(HEADER_SIZE, "big") + payload
    if kind == 3:  # an oversized (or barely fitting) length prefix
        size = draw(st.integers(SMALL_LIMIT - 2, 2**32 - 1))
        return size.to_bytes(HEADER_SIZE, "big") + draw(st.binary(max_size=20))
    return draw(st.binary(max_size=60))


byte_streams = st.one_of(
    st.binary(max_size=600),
    st.lists(stream_pieces(), max_size=8).map(b"".join),
)

# --------------------------------------------------------------------------- helpers


def normalize(item: Any) -> Any:
    """Exceptions do not compare equal; compare their class and data instead.

    Decoded maps compare by repr, because a NaN inside one never equals itself.
    """
    if isinstance(item, ProtocolError):
        return (type(item).__name__, item.code, item.message, getattr(item, "size", None),
                getattr(item, "limit", None))
    return repr(item)


def run(chunks: list[bytes], limit: int, limits: UnpackLimits = SERVER_LIMITS) -> tuple[list[Any], Any, int]:
    """Feed chunks until the decoder raises; flush with b'' so a deferred error surfaces.

    Returns (normalized items, normalized error or None, pending bytes).
    """
    decoder = FrameDecoder(max_frame_bytes=limit, limits=limits)
    items: list[Any] = []
    error = None
    try:
        for chunk in [*chunks, b""]:
            got = decoder.feed(chunk)
            for item in got:
                assert isinstance(item, (dict, MalformedMessage)), item
            items += got
    except ProtocolError as exc:
        assert isinstance(exc, FrameTooLarge)  # the only error feed raises
        assert exc.size > exc.limit == limit
        error = exc
        assert decoder.pending_bytes == 0
        try:  # and it stays dead
            decoder.feed(b"\x00\x00\x00\x00")
        except FrameTooLarge as again:
            assert again is exc
        else:
            raise AssertionError("decoder accepted data after FrameTooLarge")
    return [normalize(i) for i in items], normalize(error), decoder.pending_bytes


# --------------------------------------------------------------------------- properties


@FUZZ
@given(data=byte_streams, draw=st.data())
def test_arbitrary_bytes_chunking_independent(data: bytes, draw: st.DataObject) -> None:
    whole = run([data], SMALL_LIMIT)
    assert run(draw.draw(chunkings(data)), SMALL_LIMIT) == whole
    assert run([data[i : i + 1] for i in range(len(data))], SMALL_LIMIT) == whole


@FUZZ
@given(data=byte_streams, draw=st.data())
def test_arbitrary_bytes_default_limits_and_client_limits(data: bytes, draw: st.DataObject) -> None:
    for limit, limits in ((16 * 1024 * 1024, SERVER_LIMITS), (SMALL_LIMIT, CLIENT_LIMITS)):
        assert run(draw.draw(chunkings(data)), limit, limits) == run([data], limit, limits)


@FUZZ
@given(pairs=st.lists(client_messages, min_size=1, max_size=6), draw=st.data())
def test_valid_client_messages_round_trip_any_chunking(
    pairs: list[tuple[dict[str, Any], Frame | Hello | Ping]], draw: st.DataObject
) -> None:
    data = b"".join(encode(msg) for msg, _ in pairs)
    decoder = FrameDecoder()
    got: list[Any] = []
    for chunk in draw.draw(chunkings(data)):
        got += decoder.feed(chunk)
    assert decoder.pending_bytes == 0
    assert got == [msg for msg, _ in pairs]
    assert [parse_client_message(m) for m in got] == [parsed for _, parsed in pairs]


@FUZZ
@given(msgs=st.lists(server_messages, min_size=1, max_size=4), draw=st.data())
def test_server_messages_round_trip_on_client(msgs: list[dict[str, Any]], draw: st.DataObject) -> None:
    data = b"".join(encode(m) for m in msgs)
    decoder = FrameDecoder(limits=CLIENT_LIMITS)
    got: list[Any] = []
    for chunk in draw.draw(chunkings(data)):
        got += decoder.feed(chunk)
    assert got == msgs
    assert decoder.pending_bytes == 0


@FUZZ
@given(pair=client_messages, cut=st.integers(0, 10_000))
def test_trailing_partial_message_pending(pair: tuple[dict[str, Any], Any], cut: int) -> None:
    first, second = encode({"type": "ping", "id": 0}), encode(pair[0])
    cut %= len(second)
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:cut]) == [{"type": "ping", "id": 0}]
    assert decoder.pending_bytes == cut
    assert decoder.feed(second[cut:]) == [pair[0]]
    assert decoder.pending_bytes == 0


def check_parse(msg: dict[str, Any]) -> None:
    try:
        result = parse_client_message(msg)
    except InvalidMessage as exc:
        assert type(exc) is InvalidMessage  # the in-band refusal, never a framing error
        assert exc.code in INVALID_CODES
        assert isinstance(exc.message, str) and exc.message
        return
    assert isinstance(result, (Hello, Frame, Ping))
    if isinstance(result, Frame):
        assert msg["type"] == "frame"
        assert STREAM_NAME_RE.fullmatch(result.stream_name)
        assert type(result.frame_id) is int and 0 <= result.frame_id <= MAX_FRAME_ID
        assert type(result.timestamp) is float and math.isfinite(result.timestamp)
        assert type(result.image) is bytes and result.image
        assert result.encoding is None or result.encoding in ENCODINGS
        if result.encoding == "raw":
            assert result.shape is not None
            h, w, c = result.shape
            assert c == 3 and 1 <= h <= MAX_IMAGE_DIM and 1 <= w <= MAX_IMAGE_DIM
            assert h * w * c == len(result.image)
        else:
            assert result.shape is None
    elif isinstance(result, Hello):
        assert msg["type"] == "hello"
        assert result.stream_name is None or STREAM_NAME_RE.fullmatch(result.stream_name)
        assert result.token is None or (isinstance(result.token, str) and len(result.token) <= MAX_TOKEN_LEN)
        assert type(result.drop) is bool
    else:
        assert msg["type"] == "ping"


@FUZZ
@given(msg=st.dictionaries(texts | st.sampled_from(FIELDS), values, max_size=8))
def test_parse_arbitrary_dicts(msg: dict[str, Any]) -> None:
    check_parse(msg)


@FUZZ
@given(msg=client_dicts())
def test_parse_near_valid_dicts(msg: dict[str, Any]) -> None:
    check_parse(msg)


@FUZZ
@given(msg=client_dicts())
def test_parse_after_wire_trip(msg: dict[str, Any]) -> None:
    # bytes -> decoder -> parser: either refused by the decoder's limits or parsed/refused cleanly
    decoder = FrameDecoder()
    item, after = decoder.feed(encode(msg) + encode({"type": "ping", "id": 1}))
    assert after == {"type": "ping", "id": 1} and decoder.failed is None  # framing survives either way
    if isinstance(item, MalformedMessage):
        return
    assert isinstance(item, dict)
    check_parse(item)
