"""Dashboard cost: saturation throughput on 8 streams with the page open (Chromium, or replayed) vs closed, in turns."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

import psutil

from bench.lossless import lossless_stream
from visionstream.loadtest.serverproc import COCO_MODEL, start_server


def bus_jpeg() -> bytes:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    assert spec is not None and spec.origin is not None
    return (Path(spec.origin).parent / "assets" / "bus.jpg").read_bytes()


class _Replay:
    """The page's own traffic from a plain client, as a browser on another machine sends it (app.js): /ws sampled
    at the page's frame interval, latest.jpg for the tiles in turn at FRAMES_PER_S, /streams, /stats and
    /stats/history every 2 s. What the server does for an open page, without the page's rendering on its cores."""

    FRAMES_PER_S: Final = 4  # app.js FRAMES_PER_S
    POLL_S: Final = 2.0  # app.js STREAMS_EVERY_MS, STATS_EVERY_MS

    def __init__(self, base_url: str, streams: int) -> None:
        self.base_url, self.streams = base_url, streams
        self.halt = threading.Event()
        self.requests = 0
        self.ws_messages = 0
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _Replay:
        self._threads = [threading.Thread(target=fn, daemon=True) for fn in (self._http, self._ws)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for t in self._threads:
            t.join(10)

    def _http(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            names = [s["name"] for s in client.get("/streams").json()["streams"]]
            next_poll = 0.0
            i = 0
            while not self.halt.wait(1 / self.FRAMES_PER_S):
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.POLL_S
                    names = [s["name"] for s in client.get("/streams").json()["streams"]] or names
                    client.get("/stats")
                    client.get("/stats/history")
                    self.requests += 3
                if names:
                    client.get(f"/streams/{names[i % len(names)]}/latest.jpg")
                    self.requests += 1
                    i += 1

    def _ws(self) -> None:
        from websockets.sync.client import connect

        every_ms = max(250, round(1000 * self.streams / self.FRAMES_PER_S))  # app.js frameInterval()
        url = self.base_url.replace("http", "ws", 1) + f"/ws?every_ms={every_ms}"
        with connect(url) as ws:
            while not self.halt.is_set():
                try:
                    ws.recv(timeout=0.5)
                    self.ws_messages += 1
                except TimeoutError:
                    pass


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    p.add_argument("--rounds", type=int, default=4, help="closed/open pairs, alternating (order flips each round)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds measured per window")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds after opening or closing the page, unmeasured")
    p.add_argument("--streams", type=int, default=8, help="lossless streams of bus.jpg, each keeping 2 frames out")
    p.add_argument("--browser-nice", type=int, default=0,
                   help="niceness of the browser's processes (0: as a person would run it; the lanes run at "
                        "--worker-nice 10, so on a box without idle cores a nice-0 browser is served first)")
    p.add_argument("--viewer", choices=("browser", "replay"), default="browser",
                   help="browser: the page in headless Chromium on this machine (its rendering shares the cores); "
                        "replay: the page's requests from a plain client, as a browser on another machine costs "
                        "the server")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    a = p.parse_args(argv)
    names = ("chromium", "chromium-browser", "google-chrome")
    exe = None if a.viewer == "replay" else next((x for x in (shutil.which(n) for n in names) if x), None)
    if exe is None and a.viewer == "browser":
        print("no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not COCO_MODEL.exists():
        print(f"{COCO_MODEL} not found (VISIONSTREAM_MODELS)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed (pip install -r requirements-dev.txt)", file=sys.stderr)
        return 2
    image = bus_jpeg()
    runs: dict[str, list[float]] = {"closed": [], "open": []}
    browser_cpu: list[float] = []  # cores the browser used while the page was open
    server_cpu: dict[str, list[float]] = {"closed": [], "open": []}
    with tempfile.TemporaryDirectory() as tmp, \
            start_server(Path(tmp), model=str(COCO_MODEL), imgsz=320) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"]) if exe else None
        if a.browser_nice and browser is not None:  # renderers started later are forked from these, and inherit it
            for proc in _browser_processes():
                with contextlib.suppress(psutil.Error):
                    proc.nice(a.browser_nice)
        halt = threading.Event()
        results: list[float] = []
        threads = [threading.Thread(target=lossless_stream, args=(
            srv.tcp_port, f"cam{i}", [image], 2, halt.is_set, lambda _msg: results.append(time.perf_counter())))
                   for i in range(a.streams)]
        for t in threads:
            t.start()
        try:
            for r in range(a.rounds):
                for mode in (["closed", "open"] if r % 2 == 0 else ["open", "closed"]):
                    page = None
                    replay: _Replay | None = None
                    if mode == "open" and browser is None:
                        replay = _Replay(srv.base_url, a.streams).__enter__()
                    elif mode == "open" and browser is not None:
                        page = browser.new_page(viewport={"width": 1600, "height": 1000})
                        page.goto(srv.base_url + "/")
                        page.wait_for_function(
                            f"() => document.querySelectorAll('.tile[data-frame-id]').length >= {a.streams}",
                            timeout=60_000)
                    time.sleep(a.warmup)
                    procs = _tree(srv.proc.pid)
                    browser_procs = _browser_processes()  # renderers come and go with pages: counted now
                    s0, b0 = _cpu_seconds(procs), _cpu_seconds(browser_procs)
                    t0 = time.perf_counter()
                    time.sleep(a.duration)
                    t1 = time.perf_counter()
                    s1, b1 = _cpu_seconds(procs), _cpu_seconds(browser_procs)
                    fps = sum(1 for x in list(results) if t0 <= x <= t1) / (t1 - t0)
                    runs[mode].append(round(fps, 2))
                    server_cpu[mode].append(round((s1 - s0) / (t1 - t0), 3))
                    extra = ""
                    if page is not None:
                        browser_cpu.append(round((b1 - b0) / (t1 - t0), 3))
                        tiles = page.evaluate("() => document.querySelectorAll('.tile').length")
                        extra = f", browser {browser_cpu[-1]:.2f} cores, {tiles} tiles"
                        page.close()
                    if replay is not None:
                        replay.__exit__(None)
                        extra = f", {replay.requests} requests, {replay.ws_messages} /ws messages"
                    print(f"round {r + 1}: page {mode:6s} {fps:7.1f} results/s (server {server_cpu[mode][-1]:.2f} "
                          f"cores{extra})", flush=True)
        finally:
            halt.set()
            for t in threads:
                t.join(60)
            if browser is not None:
                browser.close()
    pairs = [o / c for o, c in zip(runs["open"], runs["closed"], strict=True)]
    out = {"runs": runs, "ratio_per_round": [round(x, 4) for x in pairs], "ratio_median": statistics.median(pairs),
           "throughput_cost_pct": round(100 * (1 - statistics.median(pairs)), 1),
           "server_cores": server_cpu, "browser_cores_open": browser_cpu, "streams": a.streams,
           "browser_nice": a.browser_nice, "viewer": a.viewer}
    print(f"open/closed throughput: median ratio {out['ratio_median']:.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in pairs)}), cost {out['throughput_cost_pct']} %")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


def _browser_processes() -> list[psutil.Process]:
    """Chromium's processes: ours are our descendants (below Playwright's driver)."""
    me = psutil.Process()
    return [c for c in me.children(recursive=True) if "chrom" in c.name().lower()]


if __name__ == "__main__":
    sys.exit(main())
