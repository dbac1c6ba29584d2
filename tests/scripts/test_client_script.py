"""client.py run as a user runs it, against the real server: folder, video, synthetic and failures."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import COCO_MODEL, ServerHandle, asset, free_port, require, running_server
from tests.scripts.scriptutil import (
    LineReader,
    jsonl,
    labels,
    pan_frames,
    run_script,
    start_script,
    summary,
    write_video,
)


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_folder_mode_answers_each_image_by_name(server: ServerHandle, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(asset("bus.jpg"), images / "bus.jpg")
    shutil.copy(asset("zidane.jpg"), images / "zidane.jpg")
    proc = run_script("client.py", "--mode", "1", "--folder", "images/", "--stream", "img_stream",
                      "--fps", "5", "--port", server.tcp_port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout) == {"sent": 2, "results": 2, "dropped": 0, "unanswered": 0}
    lines = jsonl(tmp_path / "results" / "img_stream.jsonl")
    by_file = {x["source"]: x for x in lines}
    assert set(by_file) == {"bus.jpg", "zidane.jpg"} and len(lines) == 2
    assert {"bus", "person"} <= labels(by_file["bus.jpg"])
    assert "person" in labels(by_file["zidane.jpg"]) and "bus" not in labels(by_file["zidane.jpg"])
    for rec in lines:
        assert rec["type"] == "result" and rec["stream_name"] == "img_stream"
        assert rec["latency_ms"] > 0 and rec["e2e_ms"] >= rec["latency_ms"] * 0.5
        assert all(len(d["bbox"]) == 4 and 0 < d["conf"] <= 1 for d in rec["detections"])
    assert (tmp_path / "logs" / "client.log").read_text().strip()


@pytest.mark.parametrize("name", ["pan.mp4", "pan.avi"])
def test_video_mode_accounts_for_every_frame(server: ServerHandle, tmp_path: Path, name: str) -> None:
    video = write_video(tmp_path / name, pan_frames(20))
    proc = run_script("client.py", "--mode", "0", "--source", video.name, "--stream", "vid1",
                      "--fps", "20", "--port", server.tcp_port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = summary(proc.stdout)
    lines = jsonl(tmp_path / "results" / "vid1.jsonl")
    # Every frame index is answered exactly once, by a result or an explicit drop notice.
    assert sorted(x["frame_index"] for x in lines) == list(range(20))
    assert all(x["type"] in ("result", "dropped") for x in lines)
    assert counts["sent"] == 20 and counts["unanswered"] == 0
    assert counts["results"] + counts["dropped"] == 20
    results = [x for x in lines if x["type"] == "result"]
    # Lossless is the default for files, so the server answers every frame with detections.
    assert len(results) == 20
    assert sum("person" in labels(x) for x in results) >= 15


def test_synthetic_summary_adds_up(server: ServerHandle, tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "2", "--stream", "syn1", "--fps", "10", "--duration", "3",
                      "--port", server.tcp_port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    c = summary(proc.stdout)
    assert 20 <= c["sent"] <= 30  # 30 slots in 3 s; a loaded box may skip a few, never add any
    assert c["sent"] == c["results"] + c["dropped"] + c["unanswered"]
    assert c["results"] > 0
    lines = jsonl(tmp_path / "results" / "syn1.jsonl")
    assert len(lines) == c["sent"] and len({x["frame_id"] for x in lines}) == c["sent"]
    assert "end-to-end ms: p50" in proc.stdout


def test_raw_encoding_without_saving(server: ServerHandle, tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "2", "--encoding", "raw", "--width", "320", "--height", "240",
                      "--stream", "raw1", "--fps", "10", "--duration", "1", "--no-save", "--quiet",
                      "--port", server.tcp_port, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    c = summary(proc.stdout)
    assert c["results"] > 0 and c["sent"] == c["results"] + c["dropped"] + c["unanswered"]
    assert not (tmp_path / "results").exists()
    assert proc.stderr == ""  # --quiet: nothing but problems on stderr


def test_help_lists_flags_with_defaults(tmp_path: Path) -> None:
    proc = run_script("client.py", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0
    for flag in ("--mode", "--source", "--folder", "--stream", "--fps", "--duration", "--host", "--port",
                 "--token", "--quality", "--encoding", "--width", "--height", "--loop", "--results-dir",
                 "--no-save", "--quiet", "--allow-drops"):
        assert flag in proc.stdout
    assert "(default: 9000)" in proc.stdout and "(default: results)" in proc.stdout


# --------------------------------------------------------------------------- failures


def test_missing_video_file(tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "0", "--source", "video.mp4", "--stream", "vid1", cwd=tmp_path)
    assert_one_line_failure(proc, "Failed to open video source video.mp4")


def test_undecodable_video_file(tmp_path: Path) -> None:
    (tmp_path / "video.mp4").write_bytes(b"\x00\x01not a video" * 100)
    proc = run_script("client.py", "--mode", "0", "--source", "video.mp4", cwd=tmp_path)
    assert_one_line_failure(proc, "Failed to open video source video.mp4")


def test_missing_camera_suggests_another_index(tmp_path: Path) -> None:
    # Index 90 rather than 0, so a developer's real webcam does not turn this into a live stream.
    proc = run_script("client.py", "--mode", "0", "--source", "90", cwd=tmp_path)
    assert_one_line_failure(proc, "Failed to open video source 90 (try --source 1")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    proc = run_script("client.py", "--mode", "1", "--folder", "images", cwd=tmp_path)
    assert_one_line_failure(proc, "contains no images")


def test_missing_folder(tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "1", "--folder", "nope", cwd=tmp_path)
    assert_one_line_failure(proc, "does not exist")


def test_no_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    proc = run_script("client.py", "--mode", "2", "--duration", "1", "--port", port, "--connect-retries", "2",
                      cwd=tmp_path)
    assert_one_line_failure(proc, f"127.0.0.1:{port} not reachable after 3 attempts")
    assert not (tmp_path / "results").exists()


def test_bad_stream_name(tmp_path: Path) -> None:
    proc = run_script("client.py", "--mode", "2", "--stream", "no spaces", cwd=tmp_path)
    assert_one_line_failure(proc, "--stream")


def test_auth_refused_and_accepted(tmp_path: Path) -> None:
    require(COCO_MODEL)
    with running_server(tmp_path, "--token", "sekret") as srv:
        proc = run_script("client.py", "--mode", "2", "--duration", "1", "--port", srv.tcp_port,
                          "--token", "wrong", cwd=tmp_path)
        assert_one_line_failure(proc, "refused")
        ok = run_script("client.py", "--mode", "2", "--duration", "1", "--port", srv.tcp_port, "--quiet",
                        cwd=tmp_path, env={"VISIONSTREAM_TOKEN": "sekret"})
        assert ok.returncode == 0, ok.stderr
        assert summary(ok.stdout)["results"] > 0


def test_ctrl_c_stops_with_a_summary(server: ServerHandle, tmp_path: Path) -> None:
    proc = start_script("client.py", "--mode", "2", "--stream", "ctrlc", "--fps", "10", "--width", "320",
                        "--height", "240", "--port", server.tcp_port, cwd=tmp_path)
    try:
        assert LineReader(proc.stderr).wait_for("streaming synthetic")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out = proc.stdout.read()
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    c = summary(out)
    assert c["sent"] > 0 and c["sent"] == c["results"] + c["dropped"] + c["unanswered"]
    assert "stopped early by the user" in out
    assert len(jsonl(tmp_path / "results" / "ctrlc.jsonl")) == c["sent"]


def test_a_replaced_client_stops_instead_of_taking_its_name_back(server: ServerHandle, tmp_path: Path) -> None:
    """Two client.py with one --stream: the newer connection wins, and the older one ends with the reason
    rather than reconnecting, which would replace the newer one in turn, back and forth."""
    first = start_script("client.py", "--mode", "2", "--stream", "twin", "--fps", "10", "--width", "320",
                         "--height", "240", "--port", server.tcp_port, cwd=tmp_path)
    try:
        assert LineReader(first.stderr).wait_for("streaming synthetic")
        time.sleep(0.5)
        (tmp_path / "b").mkdir()
        second = run_script("client.py", "--mode", "2", "--stream", "twin", "--fps", "10", "--duration", "3",
                            "--width", "320", "--height", "240", "--port", server.tcp_port, cwd=tmp_path / "b")
        first.wait(20)
        out = first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode != 0
    assert "stream_replaced" in out and "not reconnecting" in out, out
    assert summary(out)["sent"] == summary(out)["results"] + summary(out)["dropped"] + summary(out)["unanswered"]
    assert second.returncode == 0, second.stderr
    c = summary(second.stdout)
    assert c["results"] > 0 and c["unanswered"] == 0
