"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): tiles, frames, boxes, the token."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import COCO_MODEL, ROOT, require, running_server
from tests.integration.wire import Wire, bus_jpeg, frame

TOKEN = "browser-token-for-tests"
CAMERAS = ("front-door", "yard.cam-2")


def chromium() -> str:
    """Debian's Chromium (never a downloaded browser); skips with the reason when there is none."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium found (Debian: apt-get install chromium; .ci/run installs it)")


class PacedCamera(threading.Thread):
    """A real-time camera sending bus.jpg at `fps`, reading every answer."""

    def __init__(self, port: int, name: str, fps: float = 5.0, token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.port, self.name_, self.period, self.token = port, name, 1.0 / fps, token
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        image = bus_jpeg()
        try:
            with Wire(self.port) as w:
                w.hello(self.name_, **({"token": self.token} if self.token else {}))
                fid = 0
                while not self.halt.is_set():
                    w.send(frame(self.name_, fid, image))
                    fid += 1
                    w.recv(30)
                    time.sleep(self.period)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        assert self.error is None, f"camera {self.name_} failed: {self.error!r}"


@pytest.fixture
def browser() -> Iterator:
    exe = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def screenshot_dir(tmp_path: Path) -> Path:
    """Under logs/ of the checkout (VISIONSTREAM_SCREENSHOTS overrides), so a person can look at it."""
    out = Path(os.environ.get("VISIONSTREAM_SCREENSHOTS", ROOT / "logs" / "screenshots"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        out = tmp_path
    return out


def tiles_state(page) -> dict:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.tile')].map(t => [
        t.dataset.stream, {connected: t.dataset.connected, frame: t.dataset.frameId || null,
                           natural: Number(t.querySelector('canvas.frame').dataset.width || 0),
                           painted: (() => { const c = t.querySelector('canvas.frame');
                               if (!c.width) return 0;
                               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                               let lit = 0; for (let i = 0; i < d.length; i += 4 * 97) lit += d[i] + d[i + 1] + d[i + 2] > 60;
                               return lit; })(),
                           labels: t.querySelector('canvas.boxes').dataset.labels,
                           boxes: JSON.parse(t.querySelector('canvas.boxes').dataset.boxes),
                           name: t.querySelector('.name').textContent,
                           footer: t.querySelector('footer').textContent}]))""")


def test_two_cameras_show_as_tiles_with_their_frames_and_bus_boxes(tmp_path, browser):
    require(COCO_MODEL)
    with running_server(tmp_path, "--track", "bytetrack") as srv:
        cams = [PacedCamera(srv.tcp_port, name) for name in CAMERAS]
        for c in cams:
            c.start()
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.base_url + "/")

            def ready() -> bool:
                state = tiles_state(page)
                return set(state) == set(CAMERAS) and all(
                    s["natural"] > 0 and "bus" in s["labels"].split() and "#" in s["labels"] + json.dumps(s["boxes"])
                    for s in state.values())

            page.wait_for_function("() => document.querySelectorAll('.tile canvas[data-labels~=\"bus\"]').length == 2",
                                   timeout=30_000)
            deadline = time.monotonic() + 20
            while not ready() and time.monotonic() < deadline:  # tracks are confirmed after a few frames
                time.sleep(0.2)
            state = tiles_state(page)
            assert set(state) == set(CAMERAS), state.keys()
            for name, s in state.items():
                assert s["name"] == name and s["connected"] == "true"
                assert s["natural"] == 810, f"{name}: its image did not load"
                assert s["painted"] > 100, f"{name}: its frame canvas is blank"
                bus = [b for b in s["boxes"] if b["label"] == "bus"]
                assert bus and bus[0]["conf"] > 0.5 and len(bus[0]["bbox"]) == 4
                assert bus[0]["track_id"] is not None and f"#{bus[0]['track_id']} " in bus[0]["text"]
                assert s["labels"].split().count("person") >= 3
                assert "p50" in s["footer"] and "ms" in s["footer"]
            # The server panel: live figures, and charts once the history holds two samples.
            page.wait_for_function("() => Number(document.getElementById('c-fps').dataset.points || 0) >= 2",
                                   timeout=15_000)
            assert float(page.inner_text("#m-fps")) > 0
            assert page.get_attribute("#conn", "data-state") == "live"  # the /ws connection is open
            assert page.inner_text("#m-lanes").endswith("/ 1") and "yolov8n" in page.inner_text("#model")
            shot = screenshot_dir(tmp_path) / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
            # One camera leaves: its tile greys out (it goes after /streams' gone_after_s).
            cams[0].stop()
            page.wait_for_function(f"() => document.querySelector('.tile[data-stream=\"{CAMERAS[0]}\"]')"
                                   ".dataset.connected === 'false'", timeout=10_000)
            assert tiles_state(page)[CAMERAS[1]]["connected"] == "true"
            page.wait_for_timeout(600)  # the grey-out's transition
            gone = f".tile[data-stream='{CAMERAS[0]}']"
            assert "grayscale(1)" in page.eval_on_selector(gone, "el => getComputedStyle(el).filter")
            page.screenshot(path=str(shot.with_name("dashboard-disconnected.png")), full_page=True)
            # ...and leaves once the server forgets it (/streams' gone_after_s, 30 s), the other one staying.
            page.wait_for_selector(gone, state="detached", timeout=45_000)
            assert set(tiles_state(page)) == {CAMERAS[1]}
            assert errors == [], errors
        finally:
            for c in cams:
                c.halt.set()
                c.join(30)


def test_with_a_token_the_page_shows_only_the_prompt_until_it_has_the_token(tmp_path, browser):
    require(COCO_MODEL)
    with running_server(tmp_path, "--token", TOKEN) as srv:
        cam = PacedCamera(srv.tcp_port, "guarded-cam", token=TOKEN)
        cam.start()
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(srv.base_url + "/")
            page.wait_for_selector("#prompt:not([hidden])", timeout=15_000)
            assert page.is_hidden("#app") and page.eval_on_selector_all(".tile", "els => els.length") == 0
            page.fill("#token-input", TOKEN + "-wrong")
            page.click("button[type=submit]")
            page.wait_for_selector("#token-error:not([hidden])", timeout=10_000)
            assert "refused" in page.inner_text("#token-error") and page.is_hidden("#app")
            page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-token.png"))
            page.fill("#token-input", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector(".tile[data-stream='guarded-cam'] canvas[data-labels~='bus']", timeout=30_000)
            assert page.is_hidden("#prompt")
            # ?token= works too, and leaves the address bar.
            fresh = browser.new_page()
            fresh.goto(srv.base_url + f"/?token={TOKEN}")
            fresh.wait_for_selector(".tile[data-stream='guarded-cam'] canvas[data-labels~='bus']", timeout=30_000)
            assert "token" not in fresh.url
            assert fresh.evaluate("() => document.querySelector('.tile canvas.frame').dataset.width") == "810"
        finally:
            cam.stop()
