"""Drawing and buffering for the visualizer: boxes land on the right pixels, frames match by id."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from visionstream.client.visualize import (
    DisplayError,
    FrameBuffer,
    RateMeter,
    Viewer,
    class_color,
    draw_detections,
    draw_overlay,
    fourcc_for,
)


def test_boxes_are_drawn_on_a_copy_where_the_bbox_is() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    out = draw_detections(img, [{"label": "person", "cls": 0, "conf": 0.87, "bbox": [50, 40, 150, 90]}])
    assert not img.any()  # the sent frame stays untouched
    assert out[65, 50].any() and out[65, 150].any()  # left and right edges
    assert not out[65, 100].any()  # inside the box stays clear
    assert not out[95, 5].any()  # far from the box


def test_label_tag_goes_inside_when_the_box_touches_the_top() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    out = draw_detections(img, [{"label": "bus", "cls": 5, "conf": 0.5, "bbox": [10, 0, 190, 99]}])
    assert out[5:20, 15:40].any()


def test_malformed_and_out_of_frame_boxes_do_not_crash() -> None:
    img = np.zeros((50, 50, 3), np.uint8)
    dets = [{"bbox": [1, 2]}, {"label": "x", "bbox": [-100, -100, 500, 500]}, {"conf": None, "bbox": None}]
    out = draw_detections(img, dets)
    assert out.shape == img.shape and out.any()


def test_class_colours_are_stable_and_distinct() -> None:
    assert class_color(0) == class_color(0)
    assert len({class_color(i) for i in range(10)}) == 10
    assert class_color("weird") == class_color("weird")


def test_overlay_darkens_its_corner_only() -> None:
    img = np.full((200, 300, 3), 200, np.uint8)
    draw_overlay(img, ["fps 10.0", "e2e 40 ms"])
    assert img[2, 2].max() < 100 and (img[199, 299] == 200).all()


def test_frame_buffer_matches_by_id_and_forgets_the_oldest() -> None:
    buf = FrameBuffer(2)
    a, b, c = (np.full((1, 1, 3), v, np.uint8) for v in (1, 2, 3))
    buf.put(10, a)
    buf.put(11, b)
    buf.put(12, c)
    assert buf.evicted == 1 and len(buf) == 2
    assert buf.pop(10) is None
    assert buf.pop(12) is c and buf.pop(11) is b and buf.pop(11) is None


def test_rate_meter_over_a_window() -> None:
    now = [0.0]
    meter = RateMeter(window=2.0, clock=lambda: now[0])
    for _ in range(11):
        meter.tick()
        now[0] += 0.1
    now[0] -= 0.1
    assert meter.rate() == pytest.approx(10.0)
    now[0] += 5
    assert meter.rate() == 0.0


def test_fourcc_by_extension() -> None:
    assert fourcc_for(Path("a.mp4")) == "mp4v" and fourcc_for(Path("a.AVI")) == "MJPG"


def test_headless_viewer_writes_a_readable_video(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    viewer = Viewer(window=None, save=out, fps=5)
    for v in (0, 120, 240):
        viewer.show(np.full((48, 65, 3), v, np.uint8))  # odd width: trimmed to even
    viewer.show(np.zeros((10, 10, 3), np.uint8))  # a different size is resized to fit
    viewer.close()
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert viewer.frames_written == 4 and len(frames) == 4 and frames[0].shape == (48, 64, 3)


def test_save_into_a_missing_folder_fails_early(tmp_path: Path) -> None:
    with pytest.raises(DisplayError, match="does not exist"):
        Viewer(window=None, save=tmp_path / "nope" / "out.mp4", fps=5)


def test_window_without_a_display_says_to_use_headless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("visionstream.client.visualize.display_available", lambda: False)
    with pytest.raises(DisplayError, match="--headless"):
        Viewer(window="w", save=None, fps=5)
