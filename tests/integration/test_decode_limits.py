"""--max-pixels against the real server: decode bombs are refused from their header, counted, harmless to others."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, ROOT, require, running_server
from tests.integration.wire import GoodCamera, Wire, error_count, frame, metrics, rss_mb, settled, stats
from visionstream.server.config import parse_config
from visionstream.wire.protocol import DEFAULT_MAX_PIXELS

SMALL = 2000 * 2000  # the second server's --max-pixels: small images stand in for big ones


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def zeros_png(h: int, w: int, channels: int = 3, dtype: type = np.uint8) -> bytes:
    return encode(".png", np.zeros((h, w, channels), dtype))


def progressive_jpeg(h: int, w: int, sampling: int) -> bytes:
    return encode(".jpg", np.zeros((h, w, 3), np.uint8), cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("bombs")) as handle:
        yield handle


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("small"), "--max-pixels", str(SMALL)) as handle:
        yield handle


def answer(server, image: bytes, **kw) -> dict:
    with Wire(server.tcp_port) as w:
        w.hello("limits", drop=False)
        w.send(frame("limits", 1, image, **kw))
        reply = w.recv(30)
    assert reply["frame_id"] == 1, reply
    return reply


def assert_refused(reply: dict, w: int, h: int, limit: int) -> None:
    assert (reply["type"], reply["reason"], reply.get("code")) == ("dropped", "decode_error", "too_many_pixels"), reply
    assert f"{w}x{h}" in reply["message"] and str(limit) in reply["message"] and "--max-pixels" in reply["message"]


def test_help_and_config_state_the_limits():
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag, default in [("--max-pixels", str(DEFAULT_MAX_PIXELS)), ("--infer-timeout", "10.0")]:
        at = out.index(next(ln for ln in out.splitlines() if ln.strip().startswith(flag)))
        assert f"(default: {default})" in out[at:at + 600], (flag, default)
    cfg = parse_config([], environ={})
    assert cfg.max_pixels == DEFAULT_MAX_PIXELS == 1 << 24 and DEFAULT_MAX_PIXELS > 2 * 3840 * 2160
    assert cfg.infer_timeout == 10.0
    for bad in (["--max-pixels", "0"], ["--max-pixels", str(8193 * 8192)], ["--infer-timeout", "-1"]):
        run = subprocess.run([sys.executable, str(ROOT / "server.py"), *bad], capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (bad, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1 and bad[0] in run.stderr


def test_the_issues_png_bomb_is_refused_from_its_header_beside_a_good_camera(default_server):
    """Ten 8192x8192 PNGs of zeros (~200 KB each; ~0.9 s and ~380 MB each to decode) while a camera
    streams: each is refused before decoding, counted, and the camera keeps every result."""
    bomb = zeros_png(8192, 8192)
    settled(default_server)
    before = error_count(default_server, "too_many_pixels")
    rss = rss_mb(default_server)
    with GoodCamera(default_server.tcp_port) as cam, Wire(default_server.tcp_port) as w:
        w.hello("bomber", drop=False)
        for fid in range(10):
            w.send(frame("bomber", fid, bomb))
        replies = [w.recv(30) for _ in range(10)]
    cam.check()
    for reply in replies:
        assert_refused(reply, 8192, 8192, DEFAULT_MAX_PIXELS)
    assert rss_mb(default_server) - rss < 100  # one decode of it alone would have held ~380 MB
    assert error_count(default_server, "too_many_pixels") == before + 10
    assert metrics(default_server)[("visionstream_errors_total", (("code", "too_many_pixels"),))] == before + 10


def test_an_image_at_the_default_limit_is_served(default_server):
    reply = answer(default_server, zeros_png(4096, 4096))
    assert reply["type"] == "result" and reply["image_size"] == [4096, 4096], reply


@pytest.mark.parametrize("make, w, h, accepted", [
    (lambda: zeros_png(2000, 2000), 2000, 2000, True),
    (lambda: zeros_png(2000, 2001), 2001, 2000, False),
    (lambda: zeros_png(2001, 2000), 2000, 2001, False),
    (lambda: zeros_png(2000, 2000, 4, np.uint16), 2000, 2000, True),  # 16-bit RGBA costs no more memory
    (lambda: encode(".jpg", np.zeros((2000, 2000, 3), np.uint8)), 2000, 2000, True),
    (lambda: progressive_jpeg(2000, 2000, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420), 2000, 2000, True),
    # 4:4:4 progressive: its coefficient buffer makes it cost 1.5x its pixels.
    (lambda: progressive_jpeg(2000, 2000, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), 2000, 2000, False),
    (lambda: progressive_jpeg(1600, 1600, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), 1600, 1600, True),
], ids=["png-at-limit", "png-wider", "png-taller", "png16-rgba", "jpeg", "jpeg-prog-420", "jpeg-prog-444",
        "jpeg-prog-444-smaller"])
def test_max_pixels_counts_what_a_decode_costs(small_server, make, w, h, accepted):
    before = error_count(small_server, "too_many_pixels")
    reply = answer(small_server, make())
    if accepted:
        assert reply["type"] == "result" and reply["image_size"] == [w, h], reply
        assert error_count(small_server, "too_many_pixels") == before
    else:
        assert_refused(reply, w, h, SMALL)
        assert error_count(small_server, "too_many_pixels") == before + 1


def test_raw_frames_obey_max_pixels(small_server):
    before = error_count(small_server, "too_many_pixels")
    for (h, w), accepted in [((2000, 2000), True), ((2001, 2000), False)]:
        reply = answer(small_server, bytes(h * w * 3), encoding="raw", shape=[h, w, 3])
        if accepted:
            assert reply["type"] == "result", reply
        else:
            assert_refused(reply, w, h, SMALL)
    assert error_count(small_server, "too_many_pixels") == before + 1
    assert stats(small_server)["errors_by_code"].get("decode_error", 0) == 0  # its own code, not lumped in
