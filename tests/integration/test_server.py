"""The real server subprocess with the real COCO model: detections, control plane, streams."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import cv2
import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import COCO_MODEL, FALL_MODEL, asset, require, running_server
from tests.integration.wire import EOF, Wire, frame, is_bus
from visionstream.client.connection import Connection


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("server"), workers=2) as handle:
        yield handle


def bus_jpeg() -> bytes:
    return asset("bus.jpg").read_bytes()


async def exchange(port: int, stream: str, frames: list[dict], *, drop: bool = True, hello: bool = True,
                   timeout: float = 60.0) -> list[dict]:
    """Send frames (kwargs for send_frame) then collect one answer per frame."""
    conn = await Connection.open("127.0.0.1", port)
    try:
        if hello:
            await conn.hello(stream, drop=drop)
        for i, frame in enumerate(frames):
            await conn.send_frame(stream, frame.pop("frame_id", i), **frame)
        answers = []
        while len(answers) < len(frames):
            msg = await asyncio.wait_for(conn.recv(), timeout)
            assert msg is not None, "server closed the connection early"
            answers.append(msg)
        return answers
    finally:
        await conn.close()


def labels(result: dict) -> list[str]:
    return [d["label"] for d in result["detections"]]


def check_bus(result: dict, width: int = 810, height: int = 1080) -> None:
    assert result["type"] == "result", result
    names = labels(result)
    assert "bus" in names
    assert names.count("person") >= 3
    bus = next(d for d in result["detections"] if d["label"] == "bus")
    x1, y1, x2, y2 = bus["bbox"]
    # The bus spans most of the photo's width in the lower-middle part: pixels of the sent image,
    # not of the 320x320 letterbox the model saw.
    assert x2 - x1 > 0.8 * width and 0.15 * height < y1 < 0.3 * height and 0.6 * height < y2 <= height
    for d in result["detections"]:
        bx1, by1, bx2, by2 = d["bbox"]
        assert 0 <= bx1 < bx2 <= width and 0 <= by1 < by2 <= height
        assert 0 < d["conf"] <= 1 and isinstance(d["cls"], int)


def test_bus_jpeg_gets_bus_and_people(server):
    [result] = asyncio.run(exchange(server.tcp_port, "bus_jpeg", [{"image": bus_jpeg()}]))
    check_bus(result)
    assert result["stream_name"] == "bus_jpeg" and result["frame_id"] == 0
    assert set(result["timings"]) == {"queue_ms", "decode_ms", "infer_ms"}
    assert result["latency_ms"] >= result["timings"]["infer_ms"] > 0


def test_raw_encoding_matches_jpeg(server):
    image = cv2.imread(str(asset("bus.jpg")))
    frames = [{"image": image.tobytes(), "encoding": "raw", "shape": image.shape}]
    [result] = asyncio.run(exchange(server.tcp_port, "bus_raw", frames))
    check_bus(result)


def test_png_and_resized_frame_coordinates_follow_the_sent_image(server):
    image = cv2.resize(cv2.imread(str(asset("bus.jpg"))), (405, 540))
    _ok, png = cv2.imencode(".png", image)
    [result] = asyncio.run(exchange(server.tcp_port, "bus_png", [{"image": png.tobytes()}]))
    check_bus(result, width=405, height=540)


def test_frame_without_hello_opens_a_realtime_stream(server):
    [result] = asyncio.run(exchange(server.tcp_port, "no_hello", [{"image": bus_jpeg()}], hello=False))
    check_bus(result)


def test_lossless_stream_gets_every_frame(server):
    frames = [{"image": bus_jpeg()} for _ in range(25)]
    answers = asyncio.run(exchange(server.tcp_port, "lossless", frames, drop=False))
    assert [a["type"] for a in answers] == ["result"] * 25
    assert sorted(a["frame_id"] for a in answers) == list(range(25))


def test_half_closed_client_still_gets_every_answer(server):
    """A client that sends its frames, then shuts down its sending side and reads: every frame is
    answered before the server closes (they used to be discarded as `disconnected`)."""
    image = bus_jpeg()
    with Wire(server.tcp_port) as w:
        w.hello("halfclose", drop=False)
        for fid in range(4):
            w.send(frame("halfclose", fid, image))
        w.sock.shutdown(socket.SHUT_WR)
        replies = w.recv_until(lambda m: m is EOF, timeout=20)
    assert replies[-1] is EOF  # two workers: results in the order they finish
    assert sorted((m["type"], m["frame_id"]) for m in replies[:-1]) == [("result", fid) for fid in range(4)]
    assert all(is_bus(m) for m in replies[:-1])


def test_realtime_burst_answers_every_frame_with_result_or_superseded(server):
    frames = [{"image": bus_jpeg()} for _ in range(25)]
    answers = asyncio.run(exchange(server.tcp_port, "burst", frames, drop=True))
    assert sorted(a["frame_id"] for a in answers) == list(range(25))
    kinds = {(a["type"], a.get("reason")) for a in answers}
    # No age limit by default: only a newer frame of the same stream replaces a waiting one.
    assert kinds <= {("result", None), ("dropped", "superseded")}
    results = [a for a in answers if a["type"] == "result"]
    # The newest frame is never the one dropped (workers may finish out of order, hence max).
    assert results and max(r["frame_id"] for r in results) == 24


def test_two_streams_each_get_only_their_own_results(server):
    async def both():
        return await asyncio.gather(
            exchange(server.tcp_port, "left", [{"image": bus_jpeg()} for _ in range(6)], drop=False),
            exchange(server.tcp_port, "right", [{"image": bus_jpeg()} for _ in range(6)], drop=False),
        )

    left, right = asyncio.run(both())
    assert {a["stream_name"] for a in left} == {"left"}
    assert {a["stream_name"] for a in right} == {"right"}
    assert len(left) == len(right) == 6


def test_health_and_stats_counters_add_up(server):
    asyncio.run(exchange(server.tcp_port, "counted", [{"image": bus_jpeg()} for _ in range(5)], drop=False))
    health = httpx.get(f"{server.base_url}/health").json()
    assert health == {"status": "ok", "model": "yolov8n_int8_openvino_model", "ready": True}
    stats = httpx.get(f"{server.base_url}/stats").json()
    for key in ("total_frames", "processed_frames", "dropped_frames", "last_latency_ms", "fps", "queue_size",
                "cpu", "ram", "workers_busy", "clients", "uptime_s", "model", "device", "drops_by_reason",
                "latency_ms", "streams"):
        assert key in stats, key
    assert stats["total_frames"] == stats["processed_frames"] + stats["dropped_frames"] + stats["in_flight"]
    assert stats["processed_frames"] >= 5
    assert set(stats["latency_ms"]) >= {"p50", "p95", "p99"}
    assert stats["streams"]["counted"]["processed"] == 5
    assert stats["streams"]["counted"]["connected"] is False
    assert sum(stats["drops_by_reason"].values()) == stats["dropped_frames"]


def test_metrics_parse_as_prometheus(server):
    asyncio.run(exchange(server.tcp_port, "metered", [{"image": bus_jpeg()}]))
    text = httpx.get(f"{server.base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["visionstream_frames_processed"].type == "counter"
    processed = next(s.value for s in families["visionstream_frames_processed"].samples
                     if s.name == "visionstream_frames_processed_total")
    assert processed >= 1
    assert families["visionstream_latency_seconds"].type == "histogram"
    assert "visionstream_queue_size" in families


def test_websocket_receives_results(server):
    async def run():
        url = f"ws://127.0.0.1:{server.api_port}/ws?stream=watched"
        async with websockets.connect(url) as ws:
            await asyncio.sleep(0.2)  # the subscription is registered once the handshake is done
            await exchange(server.tcp_port, "unwatched", [{"image": bus_jpeg()}])
            await exchange(server.tcp_port, "watched", [{"image": bus_jpeg(), "frame_id": 7}])
            return json.loads(await asyncio.wait_for(ws.recv(), 30))

    event = asyncio.run(run())
    assert event["stream_name"] == "watched" and event["frame_id"] == 7
    check_bus(event)


def test_websocket_viewers_beyond_the_limit_are_refused(tmp_path):
    """--max-ws-clients 1: a second viewer gets close code 1013 with the reason, the first keeps its
    feed, and the seat frees up when the first leaves."""
    with running_server(tmp_path, "--max-ws-clients", "1") as srv:
        url = f"ws://127.0.0.1:{srv.api_port}/ws"

        async def run() -> tuple[int | None, str, dict, dict]:
            async with websockets.connect(url) as first:
                await asyncio.sleep(0.2)
                async with websockets.connect(url) as second:
                    with pytest.raises(websockets.ConnectionClosed):
                        await asyncio.wait_for(second.recv(), 5)
                    code, reason = second.close_code, second.close_reason
                await exchange(srv.tcp_port, "seen", [{"image": bus_jpeg(), "frame_id": 3}])
                event = json.loads(await asyncio.wait_for(first.recv(), 30))
            await asyncio.sleep(0.2)
            async with websockets.connect(url) as third:  # the first one's seat
                await asyncio.sleep(0.2)
                await exchange(srv.tcp_port, "seen", [{"image": bus_jpeg(), "frame_id": 4}])
                later = json.loads(await asyncio.wait_for(third.recv(), 30))
            return code, reason, event, later

        code, reason, event, later = asyncio.run(run())
        snap = httpx.get(f"http://127.0.0.1:{srv.api_port}/stats").json()
    assert code == 1013 and "limit of 1 viewers" in reason
    assert (event["frame_id"], later["frame_id"]) == (3, 4)
    assert snap["errors_by_code"].get("too_many_viewers") == 1


def test_openapi_docs_are_served(server):
    assert httpx.get(f"{server.base_url}/docs").status_code == 200
    assert "/stats" in httpx.get(f"{server.base_url}/openapi.json").json()["paths"]


def test_pytorch_fall_model_finds_standing_people(tmp_path):
    with running_server(tmp_path, model=require(FALL_MODEL), imgsz=640) as srv:
        [result] = asyncio.run(exchange(srv.tcp_port, "fall", [{"image": bus_jpeg()}], timeout=120))
    assert result["type"] == "result"
    assert labels(result).count("Normal") >= 3
    assert "Fall" not in labels(result)


def test_yolov8n_yaml_runs_end_to_end(tmp_path):
    with running_server(tmp_path, model="yolov8n.yaml", imgsz=320) as srv:
        [result] = asyncio.run(exchange(srv.tcp_port, "yaml", [{"image": bus_jpeg()}], timeout=120))
        health = httpx.get(f"{srv.base_url}/health").json()
    assert result["type"] == "result" and isinstance(result["detections"], list)
    assert health["model"] == "yolov8n.yaml"


def test_placeholder_flag_starts_in_placeholder_mode(tmp_path):
    with running_server(tmp_path, "--placeholder", model=tmp_path / "nope.pt") as srv:
        health = httpx.get(f"{srv.base_url}/health").json()
        stats = httpx.get(f"{srv.base_url}/stats").json()
        [result] = asyncio.run(exchange(srv.tcp_port, "ph", [{"image": bus_jpeg()}]))
        conn_welcome = asyncio.run(_welcome(srv.tcp_port))
        log = srv.log()
    assert health["model"] == "placeholder" and health["ready"] is True
    assert stats["model"] == "placeholder"
    assert conn_welcome["model"] == "placeholder"
    assert labels(result) == ["placeholder"]
    assert "PLACEHOLDER MODE" in log


async def _welcome(port: int) -> dict:
    conn = await Connection.open("127.0.0.1", port)
    try:
        return await conn.hello("greeter")
    finally:
        await conn.close()


def test_default_model_name_offline_falls_back_quickly(tmp_path):
    # yolov8n.pt is not on disk here and the machine is offline: start anyway, within seconds.
    with running_server(tmp_path, model="yolov8n.pt", timeout=60) as srv:
        assert httpx.get(f"{srv.base_url}/health").json()["model"] == "placeholder"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux-only")
def test_inference_threads_yield_to_the_event_loop(server):
    """--worker-nice (10 by default): the lanes and the OpenVINO threads they start run nicer than the
    main thread, whose event loop reads frames and writes replies."""
    [bus] = asyncio.run(exchange(server.tcp_port, "nice", [{"image": bus_jpeg()}]))
    check_bus(bus)
    pid = server.proc.pid
    nice = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        nice[int(tid)] = (int(fields[16]), int(fields[11]) + int(fields[12]))  # nice, utime + stime
    assert nice[pid][0] == 0
    busy = [n for tid, (n, cpu) in nice.items() if tid != pid and cpu > 0]
    assert busy.count(10) >= 2, nice  # at least the two lanes (and their OpenVINO threads)
