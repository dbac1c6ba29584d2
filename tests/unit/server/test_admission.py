"""Admission: pending connections hold no seat, the oldest pending is evicted, one connection per stream name."""

from __future__ import annotations

from visionstream.server.admission import Admission
from visionstream.server.ratelimit import TokenBucket
from visionstream.server.stats import Stats


class Conn:
    def __init__(self, key: int) -> None:
        self.key = key
        self.evicted = self.replaced = False

    def evict(self) -> None:
        self.evicted = True

    def replace(self) -> None:
        self.replaced = True


def admission(max_clients: int = 2, max_pending: int = 3) -> Admission:
    return Admission(Stats(model="m", device="cpu", workers=1), max_clients=max_clients, max_pending=max_pending)


def test_pending_connections_hold_no_seat_and_the_oldest_is_evicted():
    adm = admission()
    conns = [Conn(k) for k in range(5)]
    for c in conns:
        adm.admit(c)
    assert [c.evicted for c in conns] == [True, True, False, False, False]
    assert list(adm.pending) == [2, 3, 4] and adm.stats.pending_clients == 3 and not adm.full
    assert adm.seat(conns[2]) and adm.seat(conns[3]) and adm.full
    assert not adm.seat(conns[4])  # no seat left: refused at its hello
    assert adm.seat(conns[2])  # seated already
    adm.release(conns[3], None)
    assert not adm.full and adm.seat(conns[4]) and adm.stats.pending_clients == 0


def test_a_name_belongs_to_its_newest_connection():
    adm = admission()
    a, b, c = Conn(1), Conn(2), Conn(3)
    adm.claim("cam", a)
    adm.claim("other", c)
    adm.claim("cam", b)
    assert a.replaced and not b.replaced and not c.replaced and adm.names["cam"] is b
    adm.release(a, "cam")  # the replaced connection going does not free the newer one's name
    assert adm.names["cam"] is b
    adm.release(b, "cam")
    assert "cam" not in adm.names


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 100.0  # never more than the burst saved up
    assert sum(bucket.take() for _ in range(10)) == 3


def test_the_new_flags_have_their_documented_defaults_and_are_checked():
    import pytest

    from visionstream.server.config import build_parser, parse_config
    from visionstream.wire.errors import ConfigError

    cfg = parse_config([], environ={})
    assert (cfg.hello_timeout, cfg.max_pending) == (5.0, 64)
    text = " ".join(build_parser().format_help().split())
    assert "--hello-timeout HELLO_TIMEOUT seconds a new connection has" in text and "(default: 5.0)" in text
    assert "--max-pending MAX_PENDING connections that have not yet said hello" in text and "(default: 64)" in text
    for flag in ("--hello-timeout", "--max-pending"):
        with pytest.raises(ConfigError, match=flag):
            parse_config([flag, "0"], environ={})
