"""Access control on the real server: token on TCP hello, /ws, /stats and /metrics; /health open; bind warning."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.helpers import COCO_MODEL, require, running_server
from tests.integration.wire import EOF, Wire, bus_jpeg, error_count, frame, is_bus, wait_for
from visionstream.server import auth as auth_module
from visionstream.server.config import TOKEN_ENV, parse_config

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(COCO_MODEL)
    # From the environment, as a deployment would pass it (the flag is checked by parse_config below).
    with running_server(tmp_path_factory.mktemp("access"), env={TOKEN_ENV: TOKEN}) as handle:
        yield handle


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_comes_from_flag_or_environment():
    assert parse_config([], environ={TOKEN_ENV: "env"}).token == "env"
    assert parse_config(["--token", "flag"], environ={TOKEN_ENV: "env"}).token == "flag"
    assert parse_config([], environ={TOKEN_ENV: ""}).token is None


def test_token_is_compared_in_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    assert auth_module.token_ok("abc", "abc") and not auth_module.token_ok("abc", "abd") and not auth_module.token_ok("abc", None)
    assert calls == [(b"abc", b"abc"), (b"abc", b"abd")]
    assert auth_module.token_ok(None, None) and auth_module.token_ok(None, "anything")


@pytest.mark.parametrize("first, code", [
    ({"type": "hello", "stream_name": "cam"}, "auth_failed"),
    ({"type": "hello", "stream_name": "cam", "token": TOKEN + "x"}, "auth_failed"),
    ({"type": "hello", "stream_name": "cam", "token": TOKEN[:-1]}, "auth_failed"),
    (frame("cam", 1, b"\xff\xd8\xff"), "auth_required"),
    ({"type": "ping", "id": 1}, "auth_required"),
    ({"type": "frame"}, "missing_field"),
], ids=["no-token", "longer-token", "prefix-token", "frame-first", "ping-first", "garbage-first"])
def test_tcp_client_without_the_token_gets_one_error_then_is_closed(server, first, code):
    before = error_count(server, code, TOKEN)
    with Wire(server.tcp_port) as w:
        w.send(first)
        try:  # anything after the refusal must never be processed
            w.send(frame("cam", 2, bus_jpeg()))
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = w.rest()
    assert [r if r == EOF else (r["type"], r["code"]) for r in replies] == [("error", code), EOF]
    assert error_count(server, code, TOKEN) == before + 1
    if code == "auth_failed":
        assert "refused: wrong token" in server.log()


def test_tcp_client_with_the_token_is_served(server):
    with Wire(server.tcp_port) as w:
        w.hello("cam", token=TOKEN, drop=False)
        w.send(frame("cam", 1, bus_jpeg()))
        assert is_bus(w.recv())


def test_health_stays_open_but_stats_and_metrics_need_the_token(server):
    base = server.base_url
    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["ready"] is True
    for path in ("/stats", "/metrics"):
        for headers, params in [({}, {}), (auth("wrong"), {}), ({}, {"token": "wrong"}),
                                ({"Authorization": TOKEN}, {})]:  # not a Bearer credential
            r = httpx.get(f"{base}{path}", headers=headers, params=params, timeout=10)
            assert r.status_code == 401, (path, headers, params)
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}{path}", headers=auth(), timeout=10).status_code == 200
        assert httpx.get(f"{base}{path}", params={"token": TOKEN}, timeout=10).status_code == 200
    assert httpx.get(f"{base}/stats", headers=auth(), timeout=10).json()["errors_by_code"]["auth"] >= 8


async def ws_result(url: str, port: int, **kw) -> dict:
    """Open /ws, stream one bus.jpg frame over TCP, return the event the viewer got."""
    async with websockets.connect(url, open_timeout=10, **kw) as ws:
        def send_frame() -> None:
            with Wire(port) as w:
                w.hello("ws-cam", token=TOKEN)
                w.send(frame("ws-cam", 1, bus_jpeg()))
                assert w.recv()["type"] == "result"
        await asyncio.to_thread(send_frame)
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_websocket_needs_the_token(server):
    url = f"ws://127.0.0.1:{server.api_port}/ws"
    for bad in (url, f"{url}?token=wrong"):
        with pytest.raises(InvalidStatus) as info:
            asyncio.run(ws_result(bad, server.tcp_port))
        assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        asyncio.run(ws_result(url, server.tcp_port, additional_headers=auth("wrong")))
    assert is_bus(asyncio.run(ws_result(f"{url}?token={TOKEN}", server.tcp_port)))
    assert is_bus(asyncio.run(ws_result(url, server.tcp_port, additional_headers=auth())))


def test_loopback_bind_with_token_logs_no_exposure_warning(server):
    assert "without --token" not in server.log()


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_binding_beyond_loopback_without_token_warns(tmp_path, token):
    # Placeholder mode (no model) starts in about a second; the warning comes before any model work.
    args = ["--host", "0.0.0.0", "--placeholder"] + (["--token", token] if token else [])
    with running_server(tmp_path, *args, model=tmp_path / "absent.pt") as srv:
        wait_for(lambda: "ready:" in srv.log(), 10, "the ready line")
        logged = srv.log()
        log_file = (tmp_path / "logs" / "server.log").read_text()
    warning = "listening on 0.0.0.0 without --token"
    if token is None:
        assert warning in logged and warning in log_file and "WARNING" in log_file
    else:
        assert warning not in logged
