"""client.py --save-annotated against the real server: annotated images for a folder, a video otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from tests.helpers import COCO_MODEL, ServerHandle, asset, require, running_server
from tests.scripts.scriptutil import jsonl, pan_frames, read_video, run_script, summary, write_video


def test_folder_gives_one_annotated_image_per_input(server: ServerHandle, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(asset("bus.jpg"), images / "bus.jpg")
    shutil.copy(asset("zidane.jpg"), images / "zidane.jpg")
    proc = run_script("client.py", "--port", server.tcp_port, "--mode", "1", "--folder", "images",
                      "--stream", "annfolder", "--fps", "5", "--quiet", "--save-annotated", "annotated",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "annotated:     2 image(s) in annotated" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "annotated").iterdir()) == ["bus.jpg", "zidane.jpg"]
    results = {r["source"]: r for r in jsonl(tmp_path / "results" / "annfolder.jsonl")}
    for name in ("bus.jpg", "zidane.jpg"):
        before = cv2.imread(str(images / name))
        after = cv2.imread(str(tmp_path / "annotated" / name))
        assert after is not None and after.shape == before.shape
        diff = np.abs(before.astype(int) - after.astype(int)).max(axis=2) > 100
        # The drawing sits on the boxes' outlines: nearly every changed pixel is near one of them.
        near = np.zeros_like(diff)
        dets = [d for d in results[name]["detections"] if d["conf"] > 0.25]
        assert dets, results[name]
        for d in dets:
            x1, y1, x2, y2 = (round(v) for v in d["bbox"])
            ring = np.zeros_like(diff)
            ring[max(0, y1 - 60):y2 + 8, max(0, x1 - 8):x2 + 8] = True  # outline plus the tag above it
            ring[y1 + 60:y2 - 8, x1 + 8:x2 - 8] = False  # the inside of a box (below a tag put inside it)
            near |= ring
        assert diff.sum() > 500, f"{name}: nothing drawn"
        assert (diff & near).sum() / diff.sum() > 0.95, f"{name}: changes away from the boxes"


def test_video_gives_an_annotated_video_with_every_frame(server: ServerHandle, tmp_path: Path) -> None:
    frames = pan_frames(15)
    write_video(tmp_path / "pan.mp4", frames, fps=12)
    proc = run_script("client.py", "--port", server.tcp_port, "--source", "pan.mp4", "--fps", "30",
                      "--quiet", "--save-annotated", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout)["results"] == 15
    out = tmp_path / "out" / "pan.mp4"  # named after the stream, which defaults to the file's stem
    assert "annotated:     15 frame(s) in out/pan.mp4" in proc.stdout
    cap = cv2.VideoCapture(str(out))
    assert cap.get(cv2.CAP_PROP_FPS) == 12  # the source's fps, not the sending rate
    cap.release()
    annotated, original = read_video(out), read_video(tmp_path / "pan.mp4")
    assert len(annotated) == len(original) == 15
    drawn = sum((np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 120).sum() > 150
                for a, b in zip(annotated, original))
    assert drawn >= 14, f"only {drawn} of 15 frames carry boxes"


def test_synthetic_frames_are_written_too(server: ServerHandle, tmp_path: Path) -> None:
    proc = run_script("client.py", "--port", server.tcp_port, "--mode", "2", "--stream", "noise",
                      "--fps", "10", "--max-frames", "6", "--width", "320", "--height", "240", "--quiet",
                      "--save-annotated", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frames = read_video(tmp_path / "out" / "noise.mp4")
    assert len(frames) == summary(proc.stdout)["sent"] == 6
    assert frames[0].shape == (240, 320, 3)


def test_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    write_video(tmp_path / "v.avi", pan_frames(2))
    proc = run_script("client.py", "--source", "v.avi", "--save-annotated", "taken", "--port", "9",
                      "--connect-retries", "0", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --save-annotated taken: cannot create the folder "
                                                "(File exists)"]


def test_tracked_ids_reach_the_results_file_and_the_annotated_video(tmp_path: Path) -> None:
    """With the server's --track, the JSONL keeps each detection's track_id and the video draws `#id`."""
    require(COCO_MODEL)
    img = cv2.resize(cv2.imread(str(asset("zidane.jpg"))), (960, 540))
    frames = [img[i // 4:i // 4 + 360, i * 4:i * 4 + 640].copy() for i in range(30)]  # people move steadily
    write_video(tmp_path / "walk.avi", frames, fps=10)
    with running_server(tmp_path / "srv", "--track", "bytetrack") as srv:
        proc = run_script("client.py", "--port", srv.tcp_port, "--source", "walk.avi", "--fps", "30", "--quiet",
                          "--save-annotated", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [r for r in jsonl(tmp_path / "results" / "walk.jsonl") if r.get("type") == "result"]
    assert len(results) == 30
    ids = [d.get("track_id") for r in results[5:] for d in r["detections"] if d["label"] == "person"]
    assert ids and sum(isinstance(i, int) for i in ids) >= 0.8 * len(ids), ids
    assert len(read_video(tmp_path / "out" / "walk.mp4")) == 30
