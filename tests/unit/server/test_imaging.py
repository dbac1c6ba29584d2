"""Image header sniffing and decoding with refusals, plus the detector's model-free helpers (letterbox, placeholder)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import asset
from visionstream.server.inference.api import PLACEHOLDER
from visionstream.server.inference.backends.placeholder import PlaceholderDetector
from visionstream.server.inference.device import check_device
from visionstream.server.inference.imaging import DecodeError, decode_frame, jpeg_reduction, jpeg_size, png_size
from visionstream.server.inference.letterbox import LETTERBOX_FILL, letterbox
from visionstream.server.inference.models import resolve_model
from visionstream.wire.errors import ModelNotFound
from visionstream.wire.protocol import MAX_IMAGE_DIM, Frame


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def frame(image: bytes, encoding: str | None = None, shape: tuple[int, int, int] | None = None) -> Frame:
    return Frame("cam", 1, 0.0, image, encoding, shape)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h: int, w: int) -> np.ndarray:
    """A gradient: survives JPEG nearly unchanged, unlike noise."""
    image = np.full((h, w, 3), 128, np.uint8)
    image[:, :, 0] = (np.arange(w) * 255 // max(w - 1, 1)).astype(np.uint8)[None, :]
    image[:, :, 1] = (np.arange(h) * 255 // max(h - 1, 1)).astype(np.uint8)[:, None]
    return image


def decode(fr: Frame) -> np.ndarray:
    """Full-size decode: the coordinate factors back to the sent image are then exactly 1."""
    image, scale = decode_frame(fr)
    assert scale == (1.0, 1.0)
    return image


def exif_jpeg(image: np.ndarray, orientation: int) -> bytes:
    """A JPEG carrying an EXIF orientation tag (6: the viewer turns it 90 degrees clockwise)."""
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 1) \
        + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    data = encode(".jpg", image)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --------------------------------------------------------------------------- header sniffing


@pytest.mark.parametrize(("h", "w"), [(480, 640), (1, 1), (17, 33), (1080, 1920), (8, 4000)])
def test_jpeg_and_png_size_of_encoded_images(h: int, w: int) -> None:
    img = np.zeros((h, w, 3), np.uint8)
    assert jpeg_size(encode(".jpg", img)) == (w, h)
    assert jpeg_size(encode(".jpg", img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) == (w, h)  # SOF2
    assert png_size(encode(".png", img)) == (w, h)
    assert png_size(encode(".png", img[:, :, 0])) == (w, h)  # grayscale


@pytest.mark.parametrize("name", ["bus.jpg", "zidane.jpg"])
def test_jpeg_size_of_real_photos(name: str) -> None:
    data = asset(name).read_bytes()
    h, w = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert jpeg_size(data) == (w, h)
    if name == "bus.jpg":
        assert (w, h) == (810, 1080)


def test_jpeg_size_skips_app_segments_and_fill_bytes() -> None:
    data = encode(".jpg", np.zeros((30, 50, 3), np.uint8))
    exif = b"Exif\x00\x00" + bytes(200)
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    crafted = data[:2] + app1 + b"\xff\xff" + data[2:]  # APP1, then a fill byte before the next marker
    assert jpeg_size(crafted) == (50, 30)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # segment runs past the end
        b"\xff\xd8\x00\x00\x00\x00\x00\x00",  # not a marker where one must be
        b"\xff\xd8\xff\xe0\x00\x01\x00\x00",  # segment length < 2
        b"\xff\xd8\xff\xc0\x00\x11\x08\x00",  # SOF cut before its dimensions
    ],
)
def test_jpeg_size_none_when_no_readable_sof(data: bytes) -> None:
    assert jpeg_size(data) is None


def test_png_size_none_without_ihdr() -> None:
    png = encode(".png", np.zeros((4, 4, 3), np.uint8))
    assert png_size(png[:20]) is None
    assert png_size(png[:12] + b"XXXX" + png[16:]) is None


# --------------------------------------------------------------------------- decoding


def test_decode_png_is_lossless() -> None:
    img = noise(37, 53)
    out = decode(frame(encode(".png", img)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


def test_decode_grayscale_png_gives_three_channels() -> None:
    gray = noise(20, 30)[:, :, 0]
    out = decode(frame(encode(".png", gray), "png"))
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[:, :, 1], gray)


def test_decode_jpeg_is_close_to_the_original() -> None:
    img = smooth(120, 160)
    out = decode(frame(encode(".jpg", img, cv2.IMWRITE_JPEG_QUALITY, 95), "jpeg"))
    assert out.shape == (120, 160, 3)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3


def test_decode_real_photo() -> None:
    out = decode(frame(asset("bus.jpg").read_bytes()))
    assert out.shape == (1080, 810, 3)
    assert out.dtype == np.uint8


def test_decode_raw_pixels() -> None:
    img = noise(9, 7)
    out = decode(frame(img.tobytes(), "raw", (9, 7, 3)))
    np.testing.assert_array_equal(out, img)


def test_truncated_jpeg_is_refused() -> None:
    data = asset("bus.jpg").read_bytes()
    with pytest.raises(DecodeError, match="truncated JPEG"):
        decode_frame(frame(data[: len(data) // 2]))


def test_trailing_padding_after_eoi_is_tolerated() -> None:
    data = encode(".jpg", smooth(16, 16)) + bytes(100)
    assert decode(frame(data)).shape == (16, 16, 3)


@pytest.mark.parametrize("data", [b"hello, world", b"GIF89a" + bytes(100), bytes(1000), b"BM" + bytes(60)])
def test_non_image_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(DecodeError, match="neither JPEG nor PNG"):
        decode_frame(frame(data))


def test_jpeg_without_a_frame_header_is_refused() -> None:
    with pytest.raises(DecodeError, match="without a readable frame header"):
        decode_frame(frame(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xd9"))


def test_png_without_ihdr_is_refused() -> None:
    with pytest.raises(DecodeError, match="IHDR"):
        decode_frame(frame(b"\x89PNG\r\n\x1a\n" + bytes(30)))


def test_png_header_claiming_9000x9000_is_refused_before_decoding() -> None:
    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)  # 8-bit RGB, a 243 MB canvas
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) \
        + png_chunk(b"IEND", b"")
    assert png_size(data) == (9000, 9000)
    with pytest.raises(DecodeError, match=f"9000x9000 exceeds the {MAX_IMAGE_DIM}x{MAX_IMAGE_DIM} limit"):
        decode_frame(frame(data))


def test_jpeg_sof_claiming_9000x9000_is_refused_before_decoding() -> None:
    data = bytearray(encode(".jpg", smooth(16, 16)))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)  # height, width
    assert jpeg_size(bytes(data)) == (9000, 9000)
    with pytest.raises(DecodeError, match="9000x9000 exceeds"):
        decode_frame(frame(bytes(data)))


def test_wide_but_short_image_over_the_limit_is_refused() -> None:
    ihdr = struct.pack(">IIBBBBB", MAX_IMAGE_DIM + 1, 1, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    with pytest.raises(DecodeError, match="exceeds"):
        decode_frame(frame(data))


def test_zero_sized_header_is_refused() -> None:
    ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    with pytest.raises(DecodeError):
        decode_frame(frame(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)))


def test_valid_header_with_corrupt_body_is_refused() -> None:
    data = bytearray(encode(".png", noise(48, 64)))
    idat = data.find(b"IDAT")
    for k in range(idat + 8, idat + 40):
        data[k] ^= 0x55
    with pytest.raises(DecodeError, match="could not be decoded"):
        decode_frame(frame(bytes(data)))


# --------------------------------------------------------------------------- reduced-size JPEG decoding


@pytest.mark.parametrize(
    ("width", "height", "target", "factor"),
    [
        (1920, 1080, None, 1),  # no target: always full size
        (640, 480, (640, 640), 1),  # already fits the target
        (640, 480, (320, 320), 2),  # decodes straight to the 320x240 the letterbox would make
        (1920, 1080, (640, 640), 2),  # the letterbox shrinks by 3
        (1920, 1080, (320, 320), 4),  # by 6
        (3840, 2160, (320, 320), 8),
        (8000, 8000, (640, 640), 8),  # 12.5, but libjpeg stops at 1/8
        (8192, 8192, (32, 32), 8),
        (810, 1080, (320, 320), 2),  # portrait: the long side decides (3.375)
    ],
)
def test_jpeg_reduction(width: int, height: int, target: tuple[int, int] | None, factor: int) -> None:
    assert jpeg_reduction(width, height, target) == factor


@pytest.mark.parametrize(
    ("h", "w", "target", "shape"),
    [
        (1080, 1920, (1280, 1280), (1080, 1920)),
        (1080, 1920, (640, 640), (540, 960)),
        (1080, 1920, (320, 320), (270, 480)),
        (2160, 3840, (320, 320), (270, 480)),
        (751, 1001, (320, 320), (376, 501)),  # odd sizes round up in libjpeg
    ],
)
def test_reduced_jpeg_decode_and_its_coordinate_factors(
    h: int, w: int, target: tuple[int, int], shape: tuple[int, int]
) -> None:
    image, (sx, sy) = decode_frame(frame(encode(".jpg", smooth(h, w))), target)
    assert image.shape == (*shape, 3)
    assert (sx * image.shape[1], sy * image.shape[0]) == pytest.approx((w, h))
    # Never smaller than what the letterbox would make of the full image.
    gain = min(1.0, target[0] / h, target[1] / w)
    assert image.shape[0] >= int(gain * h) and image.shape[1] >= int(gain * w)


def test_reduced_decode_of_a_real_photo() -> None:
    image, scale = decode_frame(frame(asset("bus.jpg").read_bytes()), (320, 320))
    assert image.shape == (540, 405, 3)
    assert scale == (2.0, 2.0)


def test_png_and_raw_are_never_reduced() -> None:
    img = smooth(1080, 1920)
    image, scale = decode_frame(frame(encode(".png", img)), (320, 320))
    assert image.shape == (1080, 1920, 3) and scale == (1.0, 1.0)
    image, scale = decode_frame(frame(img.tobytes(), "raw", (1080, 1920, 3)), (320, 320))
    assert image.shape == (1080, 1920, 3) and scale == (1.0, 1.0)


def test_exif_turned_jpeg_reduced_decode_has_uniform_factors() -> None:
    data = exif_jpeg(smooth(300, 400), orientation=6)
    assert jpeg_size(data) == (400, 300)  # the header describes the stored, unturned pixels
    image, scale = decode_frame(frame(data), (64, 64))
    assert image.shape == (100, 75, 3)  # OpenCV applies the orientation
    assert scale == (4.0, 4.0)


def test_exif_turned_jpeg_full_decode_has_uniform_factors() -> None:
    data = exif_jpeg(smooth(300, 400), orientation=6)
    image, scale = decode_frame(frame(data))
    assert image.shape == (400, 300, 3)
    assert scale == (1.0, 1.0)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


# --------------------------------------------------------------------------- letterbox


def padded_region_check(out: np.ndarray, top: int, left: int, nh: int, nw: int) -> None:
    """Content (all zeros in) where the resized image lands, grey fill everywhere else."""
    mask = np.zeros(out.shape[:2], bool)
    mask[top:top + nh, left:left + nw] = True
    assert (out[mask] == 0).all()
    assert (out[~mask] == LETTERBOX_FILL).all()


@pytest.mark.parametrize(
    ("shape", "new_shape", "auto", "out_shape", "gain", "pad", "content"),
    [
        # 640x480 into 640: no resize, pad 80 above and below; minimal (auto) needs no padding at all.
        ((480, 640), (640, 640), False, (640, 640), 1.0, (0, 80), (480, 640)),
        ((480, 640), (640, 640), True, (480, 640), 1.0, (0, 0), (480, 640)),
        # zidane-like 1280x720: halve, pad 140 each side, or 12 to reach a stride multiple (384).
        ((720, 1280), (640, 640), False, (640, 640), 0.5, (0, 140), (360, 640)),
        ((720, 1280), (640, 640), True, (384, 640), 0.5, (0, 12), (360, 640)),
        # bus-like portrait 810x1080: pad left/right.
        ((1080, 810), (640, 640), False, (640, 640), 640 / 1080, (80, 0), (640, 480)),
        ((1080, 810), (640, 640), True, (640, 480), 640 / 1080, (0, 0), (640, 480)),
        # Odd padding: the extra pixel goes to the bottom/right.
        ((100, 300), (640, 640), False, (640, 640), 640 / 300, (0, 213), (213, 640)),
        ((100, 300), (640, 640), True, (224, 640), 640 / 300, (0, 5), (213, 640)),
        # Upscaling, and a non-square target (height, width).
        ((100, 200), (640, 640), False, (640, 640), 3.2, (0, 160), (320, 640)),
        ((480, 640), (320, 640), False, (320, 640), 320 / 480, (106, 0), (320, 427)),
        ((480, 640), (320, 640), True, (320, 448), 320 / 480, (10, 0), (320, 427)),
    ],
)
def test_letterbox_shape_gain_and_pad(
    shape: tuple[int, int],
    new_shape: tuple[int, int],
    auto: bool,
    out_shape: tuple[int, int],
    gain: float,
    pad: tuple[int, int],
    content: tuple[int, int],
) -> None:
    img = np.zeros((*shape, 3), np.uint8)
    out, g, p = letterbox(img, new_shape, auto, 32)
    assert out.shape == (*out_shape, 3)
    assert out.dtype == np.uint8
    assert g == pytest.approx(gain)
    assert p == pad
    padded_region_check(out, p[1], p[0], *content)


def test_letterbox_of_a_real_photo_keeps_the_content_where_pad_says() -> None:
    img = cv2.imread(str(asset("zidane.jpg")))
    out, gain, (padx, pady) = letterbox(img, (640, 640), False, 32)
    expected = cv2.resize(img, (640, 360), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[pady:pady + 360, padx:padx + 640], expected)
    # A point maps back to the original through (x - pad) / gain.
    assert ((640 - padx) / gain, (pady + 360 - pady) / gain) == (1280, 720)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), auto=st.booleans(),
       new_shape=st.sampled_from([(64, 64), (128, 96), (96, 160)]))
def test_letterbox_invariants(h: int, w: int, auto: bool, new_shape: tuple[int, int]) -> None:
    stride = 32
    out, gain, (padx, pady) = letterbox(np.zeros((h, w, 3), np.uint8), new_shape, auto, stride)
    oh, ow = out.shape[:2]
    if auto:
        assert oh <= new_shape[0] and ow <= new_shape[1]
        assert oh % stride == 0 and ow % stride == 0  # targets here are stride multiples
    else:
        assert (oh, ow) == new_shape
    nh, nw = max(1, round(h * gain)), max(1, round(w * gain))
    assert nh == new_shape[0] or nw == new_shape[1]  # the image touches the target on one side
    assert 0 <= pady <= oh - nh and 0 <= padx <= ow - nw
    assert abs((oh - nh) - 2 * pady) <= 1 and abs((ow - nw) - 2 * padx) <= 1  # centred
    padded_region_check(out, pady, padx, nh, nw)


# --------------------------------------------------------------------------- placeholder and helpers


def test_placeholder_detector_output() -> None:
    det = PlaceholderDetector()
    assert det.model_name == PLACEHOLDER
    assert det.names == {0: PLACEHOLDER}
    assert det.detect(np.zeros((480, 640, 3), np.uint8)) == [
        {"label": PLACEHOLDER, "cls": 0, "conf": 0.0, "bbox": [160.0, 120.0, 480.0, 360.0]}
    ]
    (box,) = det.detect(np.zeros((101, 203, 3), np.uint8))
    x1, y1, x2, y2 = box["bbox"]
    assert 0 <= x1 < x2 <= 203 and 0 <= y1 < y2 <= 101
    assert all(isinstance(v, float) for v in box["bbox"])


def test_resolve_model_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "local.pt"
    weights.write_bytes(b"x")
    assert resolve_model(str(weights), 5.0) == str(weights)
    assert resolve_model("yolov8n.yaml", 5.0) == "yolov8n.yaml"  # built from config, nothing to fetch
    for missing, timeout in (("yolov8n.pt", 0),  # 0: never try to download
                             ("missing/dir/model.pt", 5.0),  # only bare asset names are fetched
                             ("model.onnx", 5.0)):
        with pytest.raises(ModelNotFound) as caught:
            resolve_model(missing, timeout)
        assert caught.value.model == missing and "\n" not in str(caught.value)


def test_check_device_cpu_is_always_fine() -> None:
    assert check_device("cpu") is None


# ------------------------------------------------------------------ --max-pixels


def test_pixel_budget_is_checked_from_the_header_before_decoding(monkeypatch) -> None:
    from visionstream.wire.errors import TooManyPixels

    def no_decode(*_args):
        raise AssertionError("decoded despite the pixel budget")

    data = encode(".png", np.zeros((30, 40, 3), np.uint8))
    assert decode_frame(frame(data), max_pixels=1200)[0].shape == (30, 40, 3)  # the limit is inclusive
    monkeypatch.setattr(cv2, "imdecode", no_decode)
    with pytest.raises(TooManyPixels, match="40x30 = 1200 pixels exceeds the limit of 1199") as info:
        decode_frame(frame(data), max_pixels=1199)
    assert (info.value.code, info.value.width, info.value.height, info.value.limit) == ("too_many_pixels", 40, 30, 1199)
    with pytest.raises(TooManyPixels):
        decode_frame(frame(bytes(30 * 40 * 3), "raw", (30, 40, 3)), max_pixels=1199)


@pytest.mark.parametrize("sampling, samples, factor", [
    (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, 3.0, 1.5),
    (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 1.5, 1.0),
    (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, 2.0, 7 / 6),
])
def test_a_progressive_jpeg_counts_its_coefficient_buffer(sampling, samples, factor) -> None:
    from visionstream.server.inference.imaging import decode_cost, jpeg_header

    img = smooth(60, 80)
    progressive = jpeg_header(encode(".jpg", img, cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
                                     cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling))
    baseline = jpeg_header(encode(".jpg", img, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling))
    assert progressive is not None and baseline is not None
    assert (progressive.width, progressive.height, progressive.progressive, progressive.samples) == (80, 60, True, samples)
    assert not baseline.progressive and decode_cost(80, 60, baseline) == 4800
    assert decode_cost(80, 60, progressive) == int(4800 * factor)
    assert decode_cost(80, 60) == 4800  # PNG and raw: their pixels
