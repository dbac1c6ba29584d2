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


def _det(tid, x, y=100, label="person"):
    return {"label": label, "cls": 0, "conf": 0.9, "bbox": [x, y, x + 60, y + 120], "track_id": tid}


def test_a_tracked_detection_is_labelled_with_its_id() -> None:
    from visionstream.client.visualize import track_id

    image = np.zeros((480, 640, 3), np.uint8)
    plain = draw_detections(image, [{**_det(None, 100), "track_id": None}])
    tagged = draw_detections(image, [_det(17, 100)])
    assert track_id(_det(17, 1)) == 17 and track_id(_det(None, 1)) is None and track_id({"track_id": True}) is None
    # "person #17 0.90" is a wider tag than "person 0.90": more of the row above the box is painted.
    row = slice(60, 100)
    assert (tagged[row] != 0).any(axis=2).sum() > (plain[row] != 0).any(axis=2).sum()


def test_trails_follow_each_track_in_order_and_forget_the_gone() -> None:
    from visionstream.client.visualize import TrackTrails

    trails = TrackTrails(points=3, forget=2)
    for x in (0, 10, 20, 30):
        trails.update([_det(1, x), _det(None, 300)])
    assert trails.trail(1) == [(40, 160), (50, 160), (60, 160)]  # the newest 3 centres
    assert len(trails) == 1  # an unconfirmed (null) id has no trail
    for _ in range(3):
        trails.update([])
    assert trails.trail(1) == [] and len(trails) == 0


def test_a_trail_is_drawn_behind_a_moving_track() -> None:
    from visionstream.client.visualize import TrackTrails

    image = np.zeros((480, 640, 3), np.uint8)
    trails = TrackTrails()
    for x in range(0, 200, 20):
        out = draw_detections(image, [_det(5, x, y=300)], trails)
    # The centres of the earlier boxes (x + 30, y + 60) lie outside the last box: only the trail paints them.
    assert (out[360, 40:150] != 0).any(axis=1).sum() > 80
    untracked = draw_detections(image, [_det(5, 180, y=300)])
    assert not (untracked[360, 40:150] != 0).any()
