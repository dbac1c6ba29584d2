"""Example-based tests of the wire protocol: framing, decoding limits and client-message validation."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from visionstream.wire.errors import FrameTooLarge, InvalidMessage, MalformedMessage, ProtocolError
from visionstream.wire.protocol import (
    CLIENT_LIMITS,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    MAX_FRAME_ID,
    MAX_IMAGE_DIM,
    MAX_STREAM_NAME_LEN,
    MAX_TOKEN_LEN,
    PROTOCOL_VERSION,
    SERVER_LIMITS,
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
    validate_stream_name,
    welcome_msg,
)

ALL_BYTES = bytes(range(256))  # every byte value, incl. NUL and 0xff, as "image" data


def framed(payload: bytes) -> bytes:
    """A raw payload behind a correct length prefix (to send payloads `encode` would refuse)."""
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def packed(obj: Any) -> bytes:
    return framed(msgpack.packb(obj, use_bin_type=True))


def roundtrip(msg: dict[str, Any], limits: UnpackLimits = SERVER_LIMITS) -> dict[str, Any]:
    decoder = FrameDecoder(limits=limits)
    items = decoder.feed(encode(msg))
    assert decoder.pending_bytes == 0
    assert len(items) == 1
    assert isinstance(items[0], dict), items[0]
    return items[0]


def assert_malformed(item: Any) -> None:
    assert isinstance(item, MalformedMessage), item
    assert item.code == "malformed"
    assert isinstance(item.message, str) and item.message


# --------------------------------------------------------------------------- encode / builders


class TestEncode:
    def test_header_is_big_endian_payload_length(self) -> None:
        data = encode({"type": "ping"})
        payload = msgpack.packb({"type": "ping"}, use_bin_type=True)
        assert data[:HEADER_SIZE] == len(payload).to_bytes(4, "big")
        assert data[HEADER_SIZE:] == payload

    @pytest.mark.parametrize("bad", [[1, 2], "x", b"x", 3, None, (("type", "ping"),)])
    def test_non_dict_refused(self, bad: Any) -> None:
        with pytest.raises(TypeError):
            encode(bad)

    def test_binary_uses_bin_type_not_str(self) -> None:
        # use_bin_type: image bytes must come back as bytes, never as (invalid) str
        msg = roundtrip({"type": "x", "blob": ALL_BYTES})
        assert msg["blob"] == ALL_BYTES
        assert type(msg["blob"]) is bytes


class TestBuilderRoundTrips:
    def test_hello_defaults(self) -> None:
        msg = hello_msg("cam-1")
        assert msg == {"type": "hello", "stream_name": "cam-1", "drop": True}
        assert roundtrip(msg) == msg
        assert parse_client_message(roundtrip(msg)) == Hello("cam-1", None, True)

    def test_hello_token_and_lossless(self) -> None:
        msg = hello_msg("cam_2.left", token="s3cr3t-✓", drop=False)
        assert roundtrip(msg) == msg
        assert parse_client_message(roundtrip(msg)) == Hello("cam_2.left", "s3cr3t-✓", False)

    @pytest.mark.parametrize("encoding", [None, "jpeg", "png"])
    def test_frame_compressed(self, encoding: str | None) -> None:
        image = b"\xff\xd8\xff\xe0" + ALL_BYTES * 4
        msg = frame_msg("cam", 7, image, timestamp=1_700_000_000.123456, encoding=encoding)
        assert ("encoding" in msg) is (encoding is not None)
        assert "shape" not in msg
        back = roundtrip(msg)
        assert back == msg
        assert back["image"] == image
        assert parse_client_message(back) == Frame("cam", 7, 1_700_000_000.123456, image, encoding, None)

    def test_frame_raw_with_shape(self) -> None:
        h, w = 4, 5
        image = bytes(i % 256 for i in range(h * w * 3))
        msg = frame_msg("raw_cam", MAX_FRAME_ID, image, timestamp=0.0, encoding="raw", shape=(h, w, 3))
        assert msg["shape"] == [h, w, 3]
        back = roundtrip(msg)
        assert back == msg
        frame = parse_client_message(back)
        assert frame == Frame("raw_cam", MAX_FRAME_ID, 0.0, image, "raw", (h, w, 3))
        assert isinstance(frame, Frame) and type(frame.image) is bytes

    def test_frame_bytearray_image(self) -> None:
        image = bytearray(ALL_BYTES)
        back = roundtrip(frame_msg("cam", 1, image, timestamp=1.0))  # type: ignore[arg-type]
        assert back["image"] == bytes(image)
        assert parse_client_message(back).image == bytes(image)  # type: ignore[union-attr]

    @pytest.mark.parametrize(
        "ts", [0.0, -0.0, 1e-300, 5e-324, 1.7976931348623157e308, 1_700_000_000.000001, 0.1 + 0.2, 3]
    )
    def test_frame_timestamps_exact(self, ts: float) -> None:
        back = roundtrip(frame_msg("cam", 0, b"x", timestamp=ts))
        assert back["timestamp"] == ts
        frame = parse_client_message(back)
        assert isinstance(frame, Frame)
        assert frame.timestamp == float(ts) and type(frame.timestamp) is float
        assert math.copysign(1.0, frame.timestamp) == math.copysign(1.0, ts)

    def test_unicode_strings(self) -> None:
        msg = error_msg("bad_field", "ошибка: 画像が空です 🚫 \x00 end", detail="é" * 100)
        assert roundtrip(msg) == msg

    def test_error_msg(self) -> None:
        msg = error_msg("frame_too_large", "too big", limit=10, fatal=True)
        assert msg == {"type": "error", "code": "frame_too_large", "message": "too big", "limit": 10,
                       "fatal": True}
        assert roundtrip(msg) == msg

    def test_dropped_msg(self) -> None:
        msg = dropped_msg("cam", 2**63 - 1, "queue_full")
        assert msg == {"type": "dropped", "stream_name": "cam", "frame_id": 2**63 - 1, "reason": "queue_full"}
        assert roundtrip(msg) == msg

    def test_welcome_int_keyed_names_decode_on_client(self) -> None:
        # Regression: the label map has int keys; the client decoder used to refuse them
        # (strict_map_key) so no client could ever complete a hello.
        names = {i: f"class-{i}" for i in range(80)}
        names[80] = "żółw"
        msg = welcome_msg(model="yolov8n", names=names, stream_name="cam", drop=False, imgsz=640,
                          max_frame_bytes=DEFAULT_MAX_FRAME_BYTES)
        assert msg["type"] == "welcome" and msg["protocol"] == PROTOCOL_VERSION
        back = roundtrip(msg, CLIENT_LIMITS)
        assert back == msg
        assert back["names"][0] == "class-0"
        assert all(type(k) is int for k in back["names"])

    def test_server_still_refuses_non_string_keys(self) -> None:
        (item,) = FrameDecoder().feed(encode({"type": "ping", 1: 2}))  # type: ignore[dict-item]
        assert_malformed(item)

    def test_large_float_and_int_values(self) -> None:
        msg = {"type": "x", "f": [math.inf, -math.inf, 1e308], "i": [-(2**63), 2**64 - 1, 0]}
        assert roundtrip(msg) == msg
        back = roundtrip({"type": "x", "nan": math.nan})
        assert math.isnan(back["nan"])


# --------------------------------------------------------------------------- framing / chunking


def two_messages() -> tuple[list[dict[str, Any]], bytes]:
    msgs = [hello_msg("cam", token="t"), frame_msg("cam", 1, ALL_BYTES, timestamp=12.5, encoding="jpeg")]
    return msgs, b"".join(encode(m) for m in msgs)


class TestChunking:
    def test_one_byte_at_a_time(self) -> None:
        msgs, data = two_messages()
        decoder = FrameDecoder()
        got: list[Any] = []
        for i in range(len(data)):
            items = decoder.feed(data[i : i + 1])
            got += items
            boundary = len(encode(msgs[0]))
            if i + 1 in (boundary, len(data)):
                assert len(items) == 1
                assert decoder.pending_bytes == 0
            else:
                assert items == []
                assert decoder.pending_bytes == (i + 1 if i + 1 < boundary else i + 1 - boundary)
        assert got == msgs

    def test_many_messages_in_one_chunk(self) -> None:
        msgs = [frame_msg("cam", i, bytes([i % 256]) * (i + 1), timestamp=i / 3) for i in range(50)]
        msgs.append({"type": "ping", "id": None})
        decoder = FrameDecoder()
        assert decoder.feed(b"".join(encode(m) for m in msgs)) == msgs
        assert decoder.pending_bytes == 0

    @pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 10, -1])
    def test_trailing_partial_message_kept_pending(self, cut: int) -> None:
        msgs, _ = two_messages()
        first, second = (encode(m) for m in msgs)
        cut = cut % len(second)
        decoder = FrameDecoder()
        assert decoder.feed(first + second[:cut]) == [msgs[0]]
        assert decoder.pending_bytes == cut
        assert decoder.feed(b"") == []
        assert decoder.pending_bytes == cut
        assert decoder.feed(second[cut:]) == [msgs[1]]
        assert decoder.pending_bytes == 0

    def test_partial_then_next_chunk_carries_following_messages(self) -> None:
        msgs, data = two_messages()
        third = {"type": "ping", "id": 3}
        decoder = FrameDecoder()
        assert decoder.feed(data[:-3]) == [msgs[0]]
        assert decoder.feed(data[-3:] + encode(third) + b"\x00\x00") == [msgs[1], third]
        assert decoder.pending_bytes == 2

    def test_every_two_way_split(self) -> None:
        msgs, data = two_messages()
        for cut in range(len(data) + 1):
            decoder = FrameDecoder()
            got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
            assert got == msgs, cut
            assert decoder.pending_bytes == 0

    def test_every_three_way_split_small(self) -> None:
        msgs = [{"type": "ping", "id": 1}, {"type": "ping", "id": "two"}]
        data = b"".join(encode(m) for m in msgs)
        for a in range(len(data) + 1):
            for b in range(a, len(data) + 1):
                decoder = FrameDecoder()
                got = decoder.feed(data[:a]) + decoder.feed(data[a:b]) + decoder.feed(data[b:])
                assert got == msgs, (a, b)

    @pytest.mark.parametrize("kind", [bytearray, memoryview])
    def test_accepts_bytes_like_and_copies(self, kind: type) -> None:
        msgs, data = two_messages()
        buf = bytearray(data[:10])
        decoder = FrameDecoder()
        assert decoder.feed(kind(buf)) == []
        buf[:] = b"\xff" * 10  # the decoder must have copied the data
        assert decoder.feed(kind(bytearray(data[10:]))) == msgs

    def test_empty_feed(self) -> None:
        decoder = FrameDecoder()
        assert decoder.feed(b"") == []
        assert decoder.pending_bytes == 0


# --------------------------------------------------------------------------- size limit


class TestFrameTooLarge:
    def test_raised_on_header_alone(self) -> None:
        decoder = FrameDecoder(max_frame_bytes=100)
        with pytest.raises(FrameTooLarge) as info:
            decoder.feed((101).to_bytes(4, "big"))  # no payload byte at all
        err = info.value
        assert (err.size, err.limit) == (101, 100)
        assert err.code == "frame_too_large"
        assert isinstance(err, ProtocolError)
        assert "101" in str(err) and "100" in str(err)
        assert decoder.pending_bytes == 0
        # fatal: the byte stream is unusable from here on, every later feed raises the same error
        assert decoder.failed is err
        with pytest.raises(FrameTooLarge) as again:
            decoder.feed(encode({"type": "ping", "id": 1}))
        assert again.value is err

    def test_raised_when_fourth_header_byte_arrives(self) -> None:
        decoder = FrameDecoder()
        header = (DEFAULT_MAX_FRAME_BYTES + 1).to_bytes(4, "big")
        for b in header[:3]:
            assert decoder.feed(bytes([b])) == []
        with pytest.raises(FrameTooLarge) as info:
            decoder.feed(header[3:])
        assert info.value.size == DEFAULT_MAX_FRAME_BYTES + 1
        assert info.value.limit == DEFAULT_MAX_FRAME_BYTES

    def test_max_header_value(self) -> None:
        with pytest.raises(FrameTooLarge) as info:
            FrameDecoder().feed(b"\xff\xff\xff\xff")
        assert info.value.size == 2**32 - 1

    def test_exact_limit_is_allowed(self) -> None:
        payload = msgpack.packb({"type": "x", "pad": "a" * 50})
        decoder = FrameDecoder(max_frame_bytes=len(payload))
        assert decoder.feed(framed(payload)) == [{"type": "x", "pad": "a" * 50}]
        with pytest.raises(FrameTooLarge):
            FrameDecoder(max_frame_bytes=len(payload) - 1).feed(framed(payload))

    def test_default_limit_header_waits_for_payload(self) -> None:
        decoder = FrameDecoder()
        assert decoder.feed(DEFAULT_MAX_FRAME_BYTES.to_bytes(4, "big") + b"\x00" * 10) == []
        assert decoder.pending_bytes == 14

    def test_decoder_stays_dead(self) -> None:
        decoder = FrameDecoder(max_frame_bytes=10)
        with pytest.raises(FrameTooLarge) as first:
            decoder.feed(b"\x00\x00\x00\x0b" + b"more payload bytes")
        for data in (b"", encode({"type": "ping"}), b"\x00" * 100):
            with pytest.raises(FrameTooLarge) as again:
                decoder.feed(data)
            assert again.value is first.value
            assert decoder.pending_bytes == 0

    def test_messages_before_oversized_header_are_delivered(self) -> None:
        # Regression: a complete message in the same chunk as a bad header used to be lost,
        # so the outcome depended on how TCP happened to split the stream.
        good = {"type": "ping", "id": 1}
        decoder = FrameDecoder(max_frame_bytes=64)
        assert decoder.feed(encode(good) + (65).to_bytes(4, "big") + b"junk") == [good]
        assert decoder.pending_bytes == 0
        with pytest.raises(FrameTooLarge) as info:
            decoder.feed(b"")
        assert (info.value.size, info.value.limit) == (65, 64)
        with pytest.raises(FrameTooLarge):
            decoder.feed(encode(good))


# --------------------------------------------------------------------------- malformed payloads


FOLLOW_UP = {"type": "ping", "id": "after"}


def decode_then_follow_up(bad: bytes, limits: UnpackLimits = SERVER_LIMITS) -> Any:
    """Feed a bad framed payload plus a good message; the bad one must not break the framing."""
    decoder = FrameDecoder(limits=limits)
    items = decoder.feed(bad + encode(FOLLOW_UP))
    assert len(items) == 2, items
    assert items[1] == FOLLOW_UP
    assert decoder.pending_bytes == 0
    return items[0]


class TestMalformed:
    def test_zero_length(self) -> None:
        item = decode_then_follow_up(b"\x00\x00\x00\x00")
        assert_malformed(item)
        assert "empty" in item.message

    @pytest.mark.parametrize(
        "obj", [[1, 2, 3], [], 42, -1, "hello", "", None, True, 1.5, b"bytes", [{"type": "ping"}]]
    )
    def test_non_map_payload(self, obj: Any) -> None:
        item = decode_then_follow_up(packed(obj))
        assert_malformed(item)
        assert type(obj).__name__ in item.message

    @pytest.mark.parametrize(
        "payload",
        [
            b"\xc1",  # the one byte msgpack never uses
            b"\x82\xa1a\x01",  # map of 2 with only one pair: truncated
            b"\x81\xa4type",  # key without value
            b"\xda\xff\xff",  # str16 announcing 65535 bytes, none present
            msgpack.packb({"type": "ping"}) + b"\x00",  # trailing data inside the payload
            msgpack.packb({"type": "ping"}) * 2,
            b"\x81\xa2\xff\xfe\x01",  # str key that is not UTF-8
            b"garbage!" * 5,
            ALL_BYTES,
        ],
    )
    def test_garbage_payload(self, payload: bytes) -> None:
        assert_malformed(decode_then_follow_up(framed(payload)))

    def test_ext_types_refused(self) -> None:
        ext = msgpack.packb({"type": "ping", "id": msgpack.ExtType(5, b"abc")})
        assert_malformed(decode_then_follow_up(framed(ext)))
        ts = msgpack.packb({"type": "ping", "id": msgpack.Timestamp(1, 0)}, datetime=False)
        assert_malformed(decode_then_follow_up(framed(ts)))

    @pytest.mark.parametrize("limits", [SERVER_LIMITS, CLIENT_LIMITS])
    def test_unhashable_map_key(self, limits: UnpackLimits) -> None:
        # {[1]: 1} – a map keyed by an array: strict_map_key on the server, TypeError on the client
        assert_malformed(decode_then_follow_up(framed(b"\x81\x91\x01\x01"), limits))

    def test_deep_nesting(self) -> None:
        payload = b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0"  # {"a": [[[[...]]]]} 5000 deep
        assert_malformed(decode_then_follow_up(framed(payload)))

    def test_interleaved_good_and_bad_keep_order(self) -> None:
        a, b = {"type": "ping", "id": 1}, {"type": "ping", "id": 2}
        data = encode(a) + framed(b"") + packed([1]) + encode(b) + framed(b"\xc1")
        items = FrameDecoder().feed(data)
        assert len(items) == 5
        assert items[0] == a and items[3] == b
        for i in (1, 2, 4):
            assert_malformed(items[i])

    def test_malformed_items_are_not_raised(self) -> None:
        # errors come back as list items, one byte at a time too
        decoder = FrameDecoder()
        got: list[Any] = []
        for byte in packed("not a map") + encode(FOLLOW_UP):
            got += decoder.feed(bytes([byte]))
        assert len(got) == 2
        assert_malformed(got[0])
        assert got[1] == FOLLOW_UP


class TestUnpackLimits:
    def test_server_map_key_count(self) -> None:
        n = SERVER_LIMITS.max_map_len
        ok = {f"k{i}": i for i in range(n)}
        assert decode_then_follow_up(packed(ok)) == ok
        assert_malformed(decode_then_follow_up(packed({f"k{i}": i for i in range(n + 1)})))
        # nested maps count too
        nested = {"type": "x", "m": {f"k{i}": i for i in range(n + 1)}}
        assert_malformed(decode_then_follow_up(packed(nested)))

    def test_server_string_length(self) -> None:
        n = SERVER_LIMITS.max_str_len
        assert decode_then_follow_up(packed({"type": "a" * n})) == {"type": "a" * n}
        assert_malformed(decode_then_follow_up(packed({"type": "a" * (n + 1)})))
        assert_malformed(decode_then_follow_up(packed({"a" * (n + 1): 1})))  # keys too
        # the limit is in encoded bytes: n/2 two-byte characters fit, one more does not
        assert decode_then_follow_up(packed({"t": "é" * (n // 2)})) == {"t": "é" * (n // 2)}
        assert_malformed(decode_then_follow_up(packed({"t": "é" * (n // 2 + 1)})))

    def test_server_array_length(self) -> None:
        n = SERVER_LIMITS.max_array_len
        assert decode_then_follow_up(packed({"shape": list(range(n))})) == {"shape": list(range(n))}
        assert_malformed(decode_then_follow_up(packed({"shape": list(range(n + 1))})))

    def test_client_limits_are_wider(self) -> None:
        big = {"type": "result", "dets": [[1.0, 2.0, 3.0, 4.0, 0.5, 0]] * 1000, "s": "x" * 10_000}
        big.update({f"k{i}": i for i in range(100)})
        assert decode_then_follow_up(packed(big), CLIENT_LIMITS) == big
        assert_malformed(decode_then_follow_up(packed(big), SERVER_LIMITS))

    def test_bin_header_claiming_more_than_the_frame(self) -> None:
        decoder = FrameDecoder(max_frame_bytes=64)
        payload = b"\x81\xa1a\xc6" + (65).to_bytes(4, "big") + b"\x00" * 40
        (item,) = decoder.feed(framed(payload))
        assert_malformed(item)

    def test_custom_limits(self) -> None:
        limits = UnpackLimits(max_str_len=3, max_array_len=1, max_map_len=1)
        decoder = FrameDecoder(limits=limits)
        items = decoder.feed(packed({"abc": [1]}) + packed({"abcd": 1}) + packed({"a": [1, 2]})
                             + packed({"a": 1, "b": 2}) + packed({"k": {"z": 0}}))
        assert items[0] == {"abc": [1]}
        for item in items[1:4]:
            assert_malformed(item)
        assert items[4] == {"k": {"z": 0}}


# --------------------------------------------------------------------------- parse_client_message


DELETE = object()  # marker: remove this field from the message


def good_frame(**changes: Any) -> dict[str, Any]:
    msg = frame_msg("cam", 1, b"\xff\xd8jpeg", timestamp=1.5)
    for key, value in changes.items():
        if value is DELETE:
            del msg[key]
        else:
            msg[key] = value
    return msg


def raw_frame(shape: Any, nbytes: int | None = None, **changes: Any) -> dict[str, Any]:
    if nbytes is None:
        nbytes = math.prod(shape) if isinstance(shape, (list, tuple)) else 12
    return good_frame(encoding="raw", shape=shape, image=b"\x01" * max(nbytes, 1), **changes)



class TestParseValid:
    def test_hello_minimal(self) -> None:
        assert parse_client_message({"type": "hello"}) == Hello(None, None, True)

    def test_hello_full(self) -> None:
        msg = {"type": "hello", "stream_name": "a" * MAX_STREAM_NAME_LEN, "token": "t" * MAX_TOKEN_LEN,
               "drop": False}
        assert parse_client_message(msg) == Hello("a" * 128, "t" * 1024, False)

    def test_hello_ignores_unknown_fields(self) -> None:
        assert parse_client_message({"type": "hello", "future": 1}) == Hello(None, None, True)

    def test_frame_bounds(self) -> None:
        assert parse_client_message(good_frame(frame_id=0)).frame_id == 0  # type: ignore[union-attr]
        frame = parse_client_message(good_frame(frame_id=MAX_FRAME_ID, timestamp=-5))
        assert isinstance(frame, Frame)
        assert frame.frame_id == MAX_FRAME_ID
        assert frame.timestamp == -5.0 and type(frame.timestamp) is float

    @pytest.mark.parametrize("encoding", ["jpeg", "png"])
    def test_frame_encodings(self, encoding: str) -> None:
        frame = parse_client_message(good_frame(encoding=encoding))
        assert isinstance(frame, Frame) and frame.encoding == encoding and frame.shape is None

    def test_frame_shape_ignored_unless_raw(self) -> None:
        frame = parse_client_message(good_frame(shape="whatever"))
        assert isinstance(frame, Frame) and frame.shape is None

    @pytest.mark.parametrize("shape", [[1, 1, 3], [MAX_IMAGE_DIM, 1, 3], [1, MAX_IMAGE_DIM, 3], (2, 3, 3)])
    def test_raw_shapes(self, shape: Any) -> None:
        frame = parse_client_message(raw_frame(shape))
        assert isinstance(frame, Frame)
        assert frame.shape == tuple(shape)
        assert len(frame.image) == math.prod(shape)

    @pytest.mark.parametrize("ping_id", [None, 0, "abc", [1, 2], {"k": "v"}, 1.5])
    def test_ping(self, ping_id: Any) -> None:
        assert parse_client_message({"type": "ping", "id": ping_id}) == Ping(ping_id)

    def test_ping_without_id(self) -> None:
        assert parse_client_message({"type": "ping"}) == Ping(None)

    @pytest.mark.parametrize("name", ["a", "0", "_", "A" * 128, "cam_1.left-2", "_.-", "a..b", "x-"])
    def test_valid_stream_names(self, name: str) -> None:
        assert validate_stream_name(name) == name
        assert parse_client_message(good_frame(stream_name=name)).stream_name == name  # type: ignore[union-attr]


BAD_STREAM_NAMES = [
    "", "a" * (MAX_STREAM_NAME_LEN + 1), "../x", "a/b", "a\\b", "a b", " a", "a ", ".hidden", "-x",
    "cam\n", "cam\r\n", "\ncam", "cam\x00", "ünïcode", "cam٣", "cam\t", "a:b", "a*", "%2e%2e",
]


class TestParseInvalid:
    @staticmethod
    def check(msg: dict[str, Any], code: str) -> InvalidMessage:
        with pytest.raises(InvalidMessage) as info:
            parse_client_message(msg)
        err = info.value
        assert err.code == code, (err.code, err.message)
        # not fatal: the message, framed, leaves the decoder able to deliver the next one
        decoder = FrameDecoder()
        assert decoder.feed(encode(msg) + encode({"type": "ping", "id": 1}))[-1] == {"type": "ping", "id": 1}
        assert decoder.failed is None
        assert isinstance(err, ProtocolError)
        assert err.message
        return err

    @pytest.mark.parametrize(
        ("changes", "code"),
        [
            ({"frame_id": DELETE}, "missing_field"),
            ({"frame_id": "1"}, "bad_field"),
            ({"frame_id": True}, "bad_field"),
            ({"frame_id": False}, "bad_field"),
            ({"frame_id": -1}, "bad_field"),
            ({"frame_id": -(2**63)}, "bad_field"),
            ({"frame_id": MAX_FRAME_ID + 1}, "bad_field"),
            ({"frame_id": 2**64 - 1}, "bad_field"),
            ({"frame_id": 1.0}, "bad_field"),
            ({"frame_id": None}, "bad_field"),
            ({"timestamp": DELETE}, "missing_field"),
            ({"timestamp": math.nan}, "bad_field"),
            ({"timestamp": math.inf}, "bad_field"),
            ({"timestamp": -math.inf}, "bad_field"),
            ({"timestamp": "1.5"}, "bad_field"),
            ({"timestamp": True}, "bad_field"),
            ({"timestamp": None}, "bad_field"),
            ({"timestamp": [1.5]}, "bad_field"),
            ({"image": DELETE}, "missing_field"),
            ({"image": "jpeg-as-text"}, "bad_field"),
            ({"image": ""}, "bad_field"),
            ({"image": b""}, "bad_field"),
            ({"image": [255, 216]}, "bad_field"),
            ({"image": None}, "bad_field"),
            ({"encoding": "gif"}, "bad_field"),
            ({"encoding": "JPEG"}, "bad_field"),
            ({"encoding": ""}, "bad_field"),
            ({"encoding": 1}, "bad_field"),
            ({"encoding": b"jpeg"}, "bad_field"),
            ({"stream_name": DELETE}, "missing_field"),
            ({"stream_name": 5}, "bad_field"),
            ({"stream_name": None}, "bad_field"),
            ({"stream_name": b"cam"}, "bad_field"),
        ],
    )
    def test_bad_frame_fields(self, changes: dict[str, Any], code: str) -> None:
        err = self.check(good_frame(**changes), code)
        assert next(iter(changes)) in err.message

    @pytest.mark.parametrize("name", BAD_STREAM_NAMES)
    def test_bad_stream_names(self, name: str) -> None:
        self.check(good_frame(stream_name=name), "bad_stream_name")
        self.check({"type": "hello", "stream_name": name}, "bad_stream_name")
        with pytest.raises(InvalidMessage):
            validate_stream_name(name)

    def test_validate_stream_name_non_string(self) -> None:
        for value in (None, 1, b"cam", ["cam"]):
            with pytest.raises(InvalidMessage) as info:
                validate_stream_name(value)
            assert info.value.code == "bad_field"

    def test_raw_missing_shape(self) -> None:
        self.check(good_frame(encoding="raw"), "missing_field")

    @pytest.mark.parametrize("shape", ["2x2x3", 12, {"h": 2}, None, b"\x02\x02\x03"])
    def test_raw_shape_wrong_type(self, shape: Any) -> None:
        self.check(raw_frame(shape), "bad_field")

    @pytest.mark.parametrize(
        "shape",
        [
            [2, 2], [2, 2, 3, 1], [], [12],
            ["2", 2, 3], [2.0, 2, 3], [True, 2, 3], [2, None, 3], [2, 2, 3.0],
            [0, 2, 3], [2, 0, 3], [-2, 2, 3], [2, -2, 3], [-1, -4, 3],
            [MAX_IMAGE_DIM + 1, 1, 3], [1, MAX_IMAGE_DIM + 1, 3],
            [2, 2, 1], [2, 2, 4], [2, 2, 0], [4, 1, -3],
        ],
    )
    def test_raw_shape_out_of_range(self, shape: list[Any]) -> None:
        nbytes = 12  # h*w*c may be nonsense; the shape itself must be refused
        self.check(raw_frame(shape, nbytes), "bad_shape")

    @pytest.mark.parametrize("nbytes", [1, 11, 13, 24])
    def test_raw_wrong_byte_count(self, nbytes: int) -> None:
        err = self.check(raw_frame([2, 2, 3], nbytes), "bad_shape")
        assert str(nbytes) in err.message and "12" in err.message

    @pytest.mark.parametrize(
        ("changes", "code"),
        [
            ({"stream_name": 1}, "bad_field"),
            ({"stream_name": None}, "bad_field"),
            ({"token": 123}, "bad_field"),
            ({"token": b"secret"}, "bad_field"),
            ({"token": "t" * (MAX_TOKEN_LEN + 1)}, "bad_field"),
            ({"drop": "yes"}, "bad_field"),
            ({"drop": 1}, "bad_field"),
            ({"drop": 0}, "bad_field"),
            ({"drop": None}, "bad_field"),
        ],
    )
    def test_bad_hello_fields(self, changes: dict[str, Any], code: str) -> None:
        self.check({"type": "hello", **changes}, code)

    @pytest.mark.parametrize("kind", ["nope", "Frame", "HELLO", "", " ping", "frame\n", "x" * 1000])
    def test_unknown_type(self, kind: str) -> None:
        err = self.check({"type": kind, "stream_name": "cam"}, "unknown_type")
        assert len(err.message) < 100  # the echoed type is truncated

    @pytest.mark.parametrize("kind", [None, 1, True, b"frame", ["frame"], {"t": "frame"}, 1.5])
    def test_type_not_a_string(self, kind: Any) -> None:
        self.check({"type": kind}, "missing_field")

    def test_type_missing(self) -> None:
        self.check({}, "missing_field")
        self.check({"stream_name": "cam", "frame_id": 1}, "missing_field")

    def test_decoded_then_parsed(self) -> None:
        # the realistic path: bytes -> decoder -> parser, the error is not fatal and framing goes on
        data = encode(good_frame(frame_id="7")) + encode(good_frame(frame_id=8))
        decoder = FrameDecoder()
        bad, good = decoder.feed(data)
        with pytest.raises(InvalidMessage) as info:
            parse_client_message(bad)
        assert info.value.code == "bad_field" and decoder.failed is None
        assert parse_client_message(good).frame_id == 8  # type: ignore[union-attr]


def test_decoder_limit_bounds_the_messages_one_feed_decodes():
    """feed(data, limit) decodes at most `limit` messages; feed(b"", limit) goes on where it stopped, in
    order, whatever the chunking, and a bad header after them is still raised in its turn."""
    from visionstream.wire.errors import FrameTooLarge
    from visionstream.wire.protocol import FrameDecoder, encode

    msgs = [encode({"type": "ping", "id": i}) for i in range(10)]
    data = b"".join(msgs)
    dec = FrameDecoder(max_frame_bytes=1024)
    got = dec.feed(data[:-3], 4)
    assert [m["id"] for m in got] == [0, 1, 2, 3] and dec.pending_bytes == len(data) - 3 - sum(map(len, msgs[:4]))
    got += dec.feed(b"", 4)
    got += dec.feed(data[-3:], 4)  # the tail of message 9 arrives while 8 and 9 are still buffered
    got += dec.feed(b"", 4)
    assert [m["id"] for m in got] == list(range(10)) and dec.pending_bytes == 0
    assert dec.feed(b"", 4) == []
    assert [m["id"] for m in dec.feed(msgs[0] + (2048).to_bytes(4, "big"), 1)] == [0]
    assert dec.failed is None  # not reached yet
    try:
        dec.feed(b"", 1)  # the bad header is next
    except FrameTooLarge:
        pass
    else:
        raise AssertionError("the bad header was not raised")
    assert dec.failed is not None
