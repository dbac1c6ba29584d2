"""Image decoding with the checks that must happen before pixels are allocated."""

from __future__ import annotations

from typing import Final, NamedTuple

import cv2
import numpy as np

from visionstream.wire.errors import DecodeError, TooManyPixels
from visionstream.wire.protocol import DEFAULT_MAX_PIXELS, MAX_IMAGE_DIM, Frame

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) are not SOFs.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
EOI_SEARCH = 1024  # cameras may pad after the end-of-image marker; allow a little
# Progressive SOFs: libjpeg keeps every DCT coefficient of the whole image (2 bytes per sample) until the last scan.
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Peak bytes one decode holds per decoded pixel of a plain image (OpenCV's BGR result and one working
# copy of it, whatever the PNG's bit depth or channels); --max-pixels x this bounds a decode.
DECODE_BYTES_PER_PIXEL: Final = 6


class JpegHeader(NamedTuple):
    width: int
    height: int
    progressive: bool
    samples: float  # component samples per pixel (3 for 4:4:4 colour, 1.5 for 4:2:0, 1 for grey)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, without decoding; None if not found."""
    header = jpeg_header(data)
    return None if header is None else (header.width, header.height)


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The first SOF segment's size, kind and sampling, without decoding; None if not found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any SOF: no size to be had
            return None
        seg_len = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return JpegHeader(w, h, marker in _PROGRESSIVE, _samples(data[i + 9:i + 2 + seg_len]))
        if seg_len < 2:
            return None
        i += 2 + seg_len
    return None


def _samples(sof: bytes) -> float:
    """Samples per pixel from a SOF's component list (count, then id, HxV sampling, table per component)."""
    if not sof:
        return 3.0
    comps = [(sof[k] >> 4, sof[k] & 0x0F) for k in range(2, min(len(sof), 1 + 3 * sof[0]), 3)]
    comps = [(h, v) for h, v in comps if h and v]
    if not comps:
        return 3.0
    hmax, vmax = max(h for h, _ in comps), max(v for _, v in comps)
    return sum(h * v for h, v in comps) / (hmax * vmax)


def decode_cost(width: int, height: int, jpeg: JpegHeader | None = None) -> int:
    """Pixels a decode costs against --max-pixels: its pixels, scaled up for a progressive JPEG by what
    its coefficient buffer holds beyond a plain decode (4:4:4 colour 1.5x, CMYK about 1.8x)."""
    pixels = width * height
    if jpeg is None or not jpeg.progressive:
        return pixels
    per_pixel = max(DECODE_BYTES_PER_PIXEL, 3 + 2 * jpeg.samples)
    return int(pixels * per_pixel / DECODE_BYTES_PER_PIXEL)


def png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(width: int, height: int, target: tuple[int, int] | None) -> int:
    """Largest JPEG DCT scale-down (1, 2, 4, 8) that is no smaller than the letterbox's own resize.

    The model letterboxes into `target` (h, w) anyway, shrinking by min(th/h, tw/w); decoding at up
    to that factor smaller costs a fraction of a full decode and loses nothing the model would have
    seen (the letterbox then shrinks less, never enlarges). A 640x480 frame at imgsz 320 decodes
    straight to the 320x240 the model gets; a 1080p one at 1/4.
    """
    if target is None:
        return 1
    room = max(height / target[0], width / target[1])  # 1 / the letterbox's gain
    factor = 1
    while factor * 2 <= room and factor < 8:
        factor *= 2
    return factor


def decode_frame(frame: Frame, target: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[np.ndarray, tuple[float, float]]:
    """BGR pixels of a frame and the (x, y) factors from their coordinates to the sent image's.

    `target` (h, w) lets a large JPEG decode at a reduced size. Raises DecodeError with a
    reason fit for the client (TooManyPixels, from the header, when its decode would cost more than
    `max_pixels`).
    """
    if frame.encoding == "raw":
        assert frame.shape is not None  # protocol validation guarantees it
        h, w = frame.shape[:2]
        if h * w > max_pixels:  # nothing to decode, but the letterbox and model still pay for them
            raise TooManyPixels(w, h, h * w, max_pixels)
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape), (1.0, 1.0)
    data = frame.image
    factor = 1
    jpeg = None
    size: tuple[int, int] | None
    if data.startswith(JPEG_MAGIC):
        jpeg = jpeg_header(data)
        if jpeg is None:
            raise DecodeError("JPEG without a readable frame header")
        if data.rfind(b"\xff\xd9", max(0, len(data) - EOI_SEARCH)) < 0:
            raise DecodeError("truncated JPEG (no end-of-image marker)")
        size = jpeg.width, jpeg.height
        factor = jpeg_reduction(size[0], size[1], target)
    elif data.startswith(PNG_MAGIC):
        size = png_size(data)
        if size is None:
            raise DecodeError("PNG without an IHDR header")
    else:
        raise DecodeError("image is neither JPEG nor PNG (use encoding 'raw' with 'shape' for pixels)")
    w, h = size
    if not (w and h):
        raise DecodeError(f"image header says {w}x{h} pixels")
    if not (w <= MAX_IMAGE_DIM and h <= MAX_IMAGE_DIM):
        raise DecodeError(f"image of {w}x{h} exceeds the {MAX_IMAGE_DIM}x{MAX_IMAGE_DIM} limit")
    # Counted at full size even when a JPEG decodes reduced: a progressive one still holds every
    # coefficient, and --full-decode must not change what is accepted.
    if (cost := decode_cost(w, h, jpeg)) > max_pixels:
        raise TooManyPixels(w, h, cost, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED[factor])
    if image is None:
        raise DecodeError("image bytes could not be decoded")
    ih, iw = image.shape[:2]
    if (ih > iw) != (h > w):  # EXIF orientation turned it; the header had it unturned
        w, h = h, w
    return image, (w / iw, h / ih)
