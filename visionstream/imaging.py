"""Image decoding with the checks that must happen before pixels are allocated."""

from __future__ import annotations

import cv2
import numpy as np

from .protocol import MAX_IMAGE_DIM, Frame

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) are not SOFs.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
EOI_SEARCH = 1024  # cameras may pad after the end-of-image marker; allow a little


class DecodeError(ValueError):
    """The frame's bytes are not a usable image; the message goes back to the client."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, without decoding; None if not found."""
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
        seg_len = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h
        if seg_len < 2:
            return None
        i += 2 + seg_len
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def decode_frame(frame: Frame) -> np.ndarray:
    """BGR uint8 pixels of a frame; raises DecodeError with a reason fit for the client."""
    if frame.encoding == "raw":
        assert frame.shape is not None  # protocol validation guarantees it
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(frame.shape)
    data = frame.image
    if data.startswith(JPEG_MAGIC):
        size = jpeg_size(data)
        if size is None:
            raise DecodeError("JPEG without a readable frame header")
        if data.rfind(b"\xff\xd9", max(0, len(data) - EOI_SEARCH)) < 0:
            raise DecodeError("truncated JPEG (no end-of-image marker)")
    elif data.startswith(PNG_MAGIC):
        size = png_size(data)
        if size is None:
            raise DecodeError("PNG without an IHDR header")
    else:
        raise DecodeError("image is neither JPEG nor PNG (use encoding 'raw' with 'shape' for pixels)")
    w, h = size
    if not (0 < w <= MAX_IMAGE_DIM and 0 < h <= MAX_IMAGE_DIM):
        raise DecodeError(f"image of {w}x{h} exceeds the {MAX_IMAGE_DIM}x{MAX_IMAGE_DIM} limit")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DecodeError("image bytes could not be decoded")
    return image
