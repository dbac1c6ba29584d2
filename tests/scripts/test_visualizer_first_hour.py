"""client_visualizer.py as a new user meets it: a window at the frame's size without Qt warnings, results
saved like client.py, and a run that would show and save nothing refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServerHandle
from tests.scripts.scriptutil import clean_env, jsonl, pan_frames, run_script, write_video
from tests.scripts.xdisplay import virtual_display

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Xvfb is X11-only")


def test_headless_without_save_is_refused(tmp_path: Path) -> None:
    write_video(tmp_path / "pan.avi", pan_frames(2))
    proc = run_script("client_visualizer.py", "--source", "pan.avi", "--headless", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "client_visualizer.py: error: --headless shows no window: add --save FILE.mp4 for the annotated "
        "video (client.py streams for results only)"]
    assert not (tmp_path / "results").exists()


def test_results_are_saved_like_client_py(server: ServerHandle, tmp_path: Path) -> None:
    write_video(tmp_path / "pan.avi", pan_frames(6))
    proc = run_script("client_visualizer.py", "--port", server.tcp_port, "--stream", "vizres",
                      "--source", "pan.avi", "--fps", "20", "--headless", "--save", "out.mp4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [r for r in jsonl(tmp_path / "results" / "vizres.jsonl") if r.get("type") == "result"]
    assert sorted(r["frame_id"] for r in records) == list(range(6))
    assert "results file:  results/vizres.jsonl" in proc.stdout


@linux_only
def test_window_run_prints_no_qt_warnings(server: ServerHandle, tmp_path: Path) -> None:
    write_video(tmp_path / "pan.avi", pan_frames(8, size=320))
    with virtual_display() as display:
        proc = run_script("client_visualizer.py", "--port", server.tcp_port, "--stream", "vizwin",
                          "--source", "pan.avi", "--fps", "20", cwd=tmp_path, timeout=90,
                          env={"DISPLAY": display, "WAYLAND_DISPLAY": "", "QT_QPA_FONTDIR": "",
                               "QT_LOGGING_RULES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "drawn:         8 frame(s)" in proc.stdout
    assert "QFontDatabase" not in proc.stderr and "qt." not in proc.stderr.lower(), proc.stderr


@linux_only
def test_window_opens_at_the_frame_size(tmp_path: Path) -> None:
    # In a child process: Qt binds to one display per process, the one set when it starts.
    code = textwrap.dedent("""
        import numpy as np, cv2
        from visionstream.client.visualize import Viewer
        v = Viewer(window="w", save=None, fps=10)
        v.show(np.zeros((480, 640, 3), np.uint8))
        for _ in range(20):
            v.poll_quit()
        print(*cv2.getWindowImageRect("w")[2:])
        v.close()
    """)
    with virtual_display() as display:
        env = clean_env({"DISPLAY": display, "PYTHONPATH": str(ROOT)})
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["640", "480"]  # a bare WINDOW_NORMAL opens at 320x240
