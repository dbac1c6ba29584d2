"""The README's "Python API" examples, run as written against the real server, and detect()'s errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.helpers import ROOT, ServerHandle, asset, free_port
from tests.scripts.scriptutil import clean_env


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_four_examples() -> None:
    assert len(readme_examples()) == 4


@pytest.mark.parametrize("index", range(4))
def test_readme_example_runs(server: ServerHandle, tmp_path: Path, index: int) -> None:
    shutil.copy(asset("bus.jpg"), tmp_path / "bus.jpg")
    code = readme_examples()[index].replace("9000", str(server.tcp_port))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=90, check=False, env=clean_env({"PYTHONPATH": str(ROOT)}))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if index == 0:
        assert re.search(r"^bus 0\.\d\d \[\d+, \d+, \d+, \d+\]$", out, re.M), out
        assert len(re.findall(r"^person ", out, re.M)) >= 3, out
    elif index == 1:
        m = re.fullmatch(r"(\d+) detections; (\d+) mirrored\n", out)
        assert m and int(m.group(1)) >= 4 and int(m.group(2)) >= 4, out
    elif index == 2:
        assert [line.split()[:2] for line in out.splitlines()] == [["0", "result"], ["1", "result"],
                                                                    ["2", "result"]], out
        assert all(int(line.split()[2]) >= 4 for line in out.splitlines())
    else:
        assert "frames sent:   5" in out and "results:       5" in out, out


def test_detect_accepts_an_array_bytes_and_a_path(server: ServerHandle) -> None:
    from visionstream import DetectClient

    path = asset("zidane.jpg")
    with DetectClient(port=server.tcp_port) as client:
        answers = [client.detect(path), client.detect(path.read_bytes()), client.detect(cv2.imread(str(path)))]
    for dets in answers:
        assert sum(d["label"] == "person" and d["conf"] > 0.5 for d in dets) >= 2, dets


def test_detect_errors_are_client_errors(server: ServerHandle, tmp_path: Path) -> None:
    from visionstream import detect
    from visionstream.api import ClientError

    with pytest.raises(ClientError, match="not reachable"):
        detect(asset("bus.jpg"), port=free_port())
    with pytest.raises(ClientError, match="cannot read image"):
        detect(tmp_path / "missing.jpg", port=server.tcp_port)
    with pytest.raises(ClientError, match="did not detect"):
        detect(b"not an image", port=server.tcp_port)
