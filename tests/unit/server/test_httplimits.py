"""The HTTP listener's burst log, the descriptor budget and the flags behind them (no sockets)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from visionstream.server.config import ServerConfig, parse_config
from visionstream.server.descriptors import FD_RESERVE, LISTEN_BACKLOG, budget
from visionstream.server.httplimits import BurstLog
from visionstream.server.tls import MAX_TLS_HANDSHAKES
from visionstream.wire.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_logs_its_first_event_then_one_summary(caplog):
    clock = Clock()
    burst = BurstLog(logging.getLogger("test.burst"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "test.burst"):
        for _ in range(500):
            burst.note("connections refused", "refusing newcomers")
        burst.note("requests timed out", "a request timed out")
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["refusing newcomers",
                                                                          "a request timed out"]
        clock.t += 10.0
        burst.note("connections refused", "refusing newcomers")  # no loop here: flushes what was held
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert messages[2] == "listeners, last 10s: 500 connections refused"


def test_the_default_caps_fit_in_1024_descriptors():
    need = budget(ServerConfig())
    assert need.needed == 64 + 64 + 256 + 2 * LISTEN_BACKLOG + FD_RESERVE == 768
    assert "--max-http-clients 256" in need.describe()
    with_tls = budget(ServerConfig(tls_cert=Path("c.pem"), tls_key=Path("k.pem")))
    assert with_tls.needed == 768 + MAX_TLS_HANDSHAKES == 896


@pytest.mark.parametrize("argv, message", [
    (["--max-http-clients", "32"], "must exceed --max-ws-clients"),
    (["--http-timeout", "0"], "--http-timeout must be > 0"),
    (["--tls-cert", "a.pem"], "go together"),
    (["--tls-key", "a.key"], "go together"),
])
def test_flag_mistakes_are_one_line(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, environ={})


def test_tls_flags_parse_into_the_config():
    cfg = parse_config(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--max-http-clients", "40",
                        "--http-timeout", "2.5"], environ={})
    assert (str(cfg.tls_cert), str(cfg.tls_key), cfg.max_http_clients, cfg.http_timeout) == \
        ("c.pem", "k.pem", 40, 2.5)
