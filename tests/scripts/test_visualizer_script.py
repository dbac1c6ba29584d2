"""client_visualizer.py run headless against the real server: the saved video carries the boxes."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ServerHandle, asset
from tests.scripts.scriptutil import jsonl, pan_frames, read_video, run_script, summary, write_video


def edge_hit_ratio(before: np.ndarray, after: np.ndarray, bbox: list[float]) -> float:
    """Share of a box's left and right edge pixels that the drawing changed strongly."""
    h, w = before.shape[:2]
    x1, y1, x2, y2 = (round(v) for v in bbox)
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
    ys = np.arange(max(y1, 80) + 2, min(y2, h - 1) - 2)  # below the overlay, away from the corners
    if len(ys) < 10:
        return 1.0  # too short to judge
    diff = np.abs(before.astype(int) - after.astype(int)).max(axis=2)
    # Compression blurs a 2-pixel line by a pixel either way; the line must show within +-1 px.
    hits = [max(diff[y, max(x - 1, 0):x + 2].max() for x in (x1,)) > 60 for y in ys]
    hits += [max(diff[y, max(x - 1, 0):x + 2].max() for x in (x2,)) > 60 for y in ys]
    return sum(hits) / len(hits)


def test_headless_save_draws_each_frames_own_boxes(server: ServerHandle, tmp_path: Path) -> None:
    src = write_video(tmp_path / "pan.mp4", pan_frames(20))
    proc = run_script("client_visualizer.py", "--host", "127.0.0.1", "--port", server.tcp_port,
                      "--stream-name", "viz", "--source", src.name, "--fps", "20", "--headless",
                      "--save", "out.mp4", "--results-dir", "results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "saved 20 to out.mp4" in proc.stdout
    original, annotated = read_video(src), read_video(tmp_path / "out.mp4")
    # Lossless is the default for a file, so every frame comes back and is drawn, in order.
    assert len(annotated) == len(original) == 20
    assert annotated[0].shape == original[0].shape
    changed = 0
    for before, after in zip(original, annotated):
        diff = np.abs(before.astype(int) - after.astype(int)).max(axis=2)
        diff[:80, :200] = 0  # ignore the fps/latency overlay in the corner
        # Box lines and label tags are saturated colours: far beyond what re-encoding changes.
        if (diff > 120).sum() > 150:
            changed += 1
    assert changed >= 18, f"only {changed} of 20 frames carry drawn boxes"

    # Each frame shows its own result's boxes: the edges of frame i's boxes are drawn on frame i. The pan
    # moves the scene ~10 px per frame, so boxes from a neighbouring frame would miss these edges.
    results = {r["frame_id"]: r for r in jsonl(tmp_path / "results" / "viz.jsonl")}
    assert sorted(results) == list(range(20))
    ratios = []
    for i, (before, after) in enumerate(zip(original, annotated)):
        persons = [d for d in results[i]["detections"] if d["label"] == "person" and d["conf"] > 0.5]
        ratios += [edge_hit_ratio(before, after, d["bbox"]) for d in persons]
    assert ratios and float(np.median(ratios)) > 0.8, ratios


def test_folder_of_mixed_sizes_and_results_file(server: ServerHandle, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(asset("bus.jpg"), images / "a_bus.jpg")
    shutil.copy(asset("zidane.jpg"), images / "b_zidane.jpg")
    proc = run_script("client_visualizer.py", "--port", server.tcp_port, "--stream", "vizfolder",
                      "--source", "images", "--fps", "5", "--headless", "--save", "out.avi",
                      "--results-dir", "results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frames = read_video(tmp_path / "out.avi")
    assert len(frames) == 2 and frames[0].shape == frames[1].shape == (1080, 810, 3)
    assert len(jsonl(tmp_path / "results" / "vizfolder.jsonl")) == 2  # frames; the run line is skipped


def test_duration_ends_a_looping_source(server: ServerHandle, tmp_path: Path) -> None:
    src = write_video(tmp_path / "pan.avi", pan_frames(5))
    started = time.monotonic()
    proc = run_script("client_visualizer.py", "--port", server.tcp_port, "--source", src.name, "--loop",
                      "--fps", "10", "--duration", "1.5", "--headless", "--save", "out.mp4", "--quiet",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    assert 8 <= summary(proc.stdout)["sent"] <= 15  # 15 slots in 1.5 s; a busy box may skip some


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="display detection is X11/Wayland-specific")
def test_window_without_display_asks_for_headless(tmp_path: Path) -> None:
    src = write_video(tmp_path / "pan.avi", pan_frames(2))
    proc = run_script("client_visualizer.py", "--source", src.name, cwd=tmp_path,
                      env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: no display available (DISPLAY is not set); "
                                                "run with --headless"]


def test_bad_source(tmp_path: Path) -> None:
    proc = run_script("client_visualizer.py", "--source", "missing.mp4", "--headless", "--save", "o.mp4",
                      cwd=tmp_path)
    assert proc.returncode == 1
    assert "Failed to open video source missing.mp4" in proc.stderr and "Traceback" not in proc.stderr
