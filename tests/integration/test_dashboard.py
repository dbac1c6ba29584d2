"""The dashboard's endpoints on the real server: /streams, latest.jpg (bytes as sent), the page, the token."""

from __future__ import annotations

import re
import time

import cv2
import httpx
import numpy as np
import pytest

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import Wire, bus_jpeg, frame, is_bus, wait_for

TOKEN = "dash-token-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("dashboard")) as handle:
        yield handle


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("dashboard-token"), "--token", TOKEN) as handle:
        yield handle


def streams(server, **kw) -> dict:
    r = httpx.get(f"{server.base_url}/streams", timeout=10, **kw)
    r.raise_for_status()
    return {s["name"]: s for s in r.json()["streams"]}


def send_one(w: Wire, name: str, fid: int, image: bytes, **kw) -> dict:
    w.send(frame(name, fid, image, **kw))
    msg = w.recv(30)
    assert msg["type"] == "result", msg
    return msg


def test_latest_jpg_is_the_jpeg_the_client_sent_and_streams_lists_it(server):
    bus = bus_jpeg()
    with Wire(server.tcp_port) as w:
        w.hello("dash-jpeg", drop=False)
        for fid in range(3):
            assert is_bus(send_one(w, "dash-jpeg", fid, bus))
        r = httpx.get(f"{server.base_url}/streams/dash-jpeg/latest.jpg", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == bus and r.headers["x-frame-id"] == "2"
        assert r.headers["cache-control"] == "no-store"
        s = streams(server)["dash-jpeg"]
        assert s["connected"] is True and s["lossless"] is True and s["last_frame_id"] == 2
        assert s["received"] == s["processed"] == 3 and s["dropped"] == 0 and s["image_size"] == [810, 1080]
        assert s["detections"] >= 4 and s["latency_ms"]["p50"] > 0 and s["drops_by_reason"] == {}


@pytest.mark.parametrize("kind", ["raw", "png"])
def test_raw_and_png_frames_come_back_as_one_jpeg_of_the_same_picture(server, kind):
    img = cv2.imdecode(np.frombuffer(bus_jpeg(), np.uint8), cv2.IMREAD_COLOR)
    name = f"dash-{kind}"
    with Wire(server.tcp_port) as w:
        w.hello(name, drop=False)
        if kind == "raw":
            msg = send_one(w, name, 7, img.tobytes(), encoding="raw", shape=list(img.shape))
        else:
            msg = send_one(w, name, 7, cv2.imencode(".png", img)[1].tobytes())
        assert is_bus(msg)
        first = httpx.get(f"{server.base_url}/streams/{name}/latest.jpg", timeout=10)
        again = httpx.get(f"{server.base_url}/streams/{name}/latest.jpg", timeout=10)
    assert first.status_code == 200 and first.content.startswith(b"\xff\xd8\xff")
    assert again.content == first.content and first.headers["x-frame-id"] == "7"
    back = cv2.imdecode(np.frombuffer(first.content, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == img.shape
    assert float(np.abs(back.astype(np.int16) - img.astype(np.int16)).mean()) < 6.0  # the same picture


def test_unknown_stream_is_a_404_with_a_reason(server):
    r = httpx.get(f"{server.base_url}/streams/nobody-here/latest.jpg", timeout=10)
    assert r.status_code == 404 and r.json() == {"detail": "no frame of stream 'nobody-here'"}


def test_a_stream_that_left_is_listed_disconnected_with_its_frame(server):
    with Wire(server.tcp_port) as w:
        w.hello("dash-gone")
        send_one(w, "dash-gone", 0, bus_jpeg())
    gone = wait_for(lambda: (s := streams(server).get("dash-gone")) and not s["connected"] and s, 10,
                    "dash-gone listed as disconnected")
    assert gone["last_frame_id"] == 0 and gone["processed"] == 1
    assert httpx.get(f"{server.base_url}/streams/dash-gone/latest.jpg", timeout=10).status_code == 200


def test_the_page_is_served_from_the_package_and_loads_nothing_from_outside(server):
    r = httpx.get(f"{server.base_url}/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assets = re.findall(r'(?:href|src)="([^"]+)"', r.text)
    assert sorted(assets) == ["/dashboard/app.js", "/dashboard/favicon.svg", "/dashboard/style.css"]
    bodies = [r.text]
    for path in assets:
        a = httpx.get(f"{server.base_url}{path}", timeout=10)
        assert a.status_code == 200, path
        bodies.append(a.text)
    for body in bodies:
        body = re.sub(r'xmlns="[^"]+"', "", body)  # an SVG's namespace names, it loads nothing
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.I), "an outside address"
        assert "@import" not in body


def test_history_fills_and_openapi_documents_the_new_endpoints(server):
    spec = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert "image/jpeg" in paths["/streams/{name}/latest.jpg"]["get"]["responses"]["200"]["content"]
    assert "404" in paths["/streams/{name}/latest.jpg"]["get"]["responses"]
    assert "StreamsReply" in paths["/streams"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert "/stats/history" in paths and "/" in paths
    info = spec["components"]["schemas"]["StreamInfo"]["properties"]
    assert {"name", "connected", "lossless", "last_frame_id", "drops_by_reason", "fps"} <= set(info)

    def two_samples():
        h = httpx.get(f"{server.base_url}/stats/history", timeout=10).json()
        return len(h["samples"]) >= 2 and h

    h = wait_for(two_samples, 10, "two history samples")
    assert h["every_s"] == 2.0 and h["span_s"] == 300.0
    last = h["samples"][-1]
    assert last["lanes"] >= 1 and 0 <= last["ram"] <= 100 and last["rss_mb"] > 0 and last["t"] <= time.time()


def test_with_a_token_the_data_needs_it_and_the_page_does_not(guarded):
    base = guarded.base_url
    with Wire(guarded.tcp_port) as w:
        w.hello("dash-guarded", token=TOKEN)
        send_one(w, "dash-guarded", 0, bus_jpeg())
        for path in ("/streams", "/streams/dash-guarded/latest.jpg", "/streams/nobody/latest.jpg", "/stats/history"):
            r = httpx.get(base + path, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert httpx.get(base + path, params={"token": TOKEN + "x"}, timeout=10).status_code == 401
        assert httpx.get(base + "/", timeout=10).status_code == 200  # the page asks for the token itself
        assert httpx.get(base + "/dashboard/app.js", timeout=10).status_code == 200
        assert "dash-guarded" in streams(guarded, headers={"Authorization": f"Bearer {TOKEN}"})
        assert "dash-guarded" in streams(guarded, params={"token": TOKEN})
        r = httpx.get(base + "/streams/dash-guarded/latest.jpg", headers={"X-Token": TOKEN}, timeout=10)
        assert r.status_code == 200 and r.content == bus_jpeg()
