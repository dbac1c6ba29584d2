"""A throwaway X server (Xvfb) for running OpenCV's Qt windows on a machine without a display."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def virtual_display() -> Iterator[str]:
    """DISPLAY value of a fresh Xvfb (skips without Xvfb: apt-get install xvfb); stopped on exit."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb not installed (apt-get install xvfb) - needed to open a window without a display")
    # -displayfd: Xvfb picks a free display number and writes it to stdout once it accepts clients.
    proc = subprocess.Popen([xvfb, "-displayfd", "1", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        number = proc.stdout.readline().strip()
        if not number.isdigit():
            pytest.skip("Xvfb did not start")
        yield f":{number}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
