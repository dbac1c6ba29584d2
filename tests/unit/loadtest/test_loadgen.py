"""Load generator: the pure schedule (phases, Poisson gaps), then against a scripted in-process server:
pacing, reply accounting, summary, per-stream lossless hellos, backpressure, failures."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket

import numpy as np
import pytest

from visionstream.client.connection import ClientError
from visionstream.loadtest.loadgen import (
    LiveCounters,
    LoadGenerator,
    Phase,
    StreamSpec,
    make_payload,
    parse_size,
    phase_offset,
    prepare_payloads,
    send_times,
)
from visionstream.loadtest.report import summarize
from visionstream.wire.protocol import FrameDecoder, dropped_msg, encode, error_msg, welcome_msg


def payload():
    img = np.full((48, 64, 3), 127, np.uint8)
    return make_payload(img, "grey", None)


# --------------------------------------------------------------------------- the schedule (pure)


def first(times, count: int) -> list[float]:
    return list(itertools.islice(times, count))


def test_stagger_starts_stream_k_of_n_at_k_over_n_of_its_period():
    for k in range(4):
        assert phase_offset(Phase.STAGGER, k, 4, 0.1) == pytest.approx(k / 4 * 0.1)
        assert list(send_times(Phase.STAGGER, k, 4, 10.0, 1.0)) == pytest.approx(
            [k / 4 * 0.1 + i * 0.1 for i in range(10)])
    # The default of LoadGenerator and measure(): today's schedule.
    assert LoadGenerator("h", 1, [StreamSpec("a", 1.0, payload())]).phase is Phase.STAGGER


def test_lockstep_puts_every_streams_slot_i_at_the_same_instant():
    schedules = [list(send_times("lockstep", k, 5, 8.0, 2.0)) for k in range(5)]
    assert all(sched == schedules[0] for sched in schedules)
    assert schedules[0][0] == 0.0 and len(schedules[0]) == 16
    assert [phase_offset(Phase.LOCKSTEP, k, 5, 0.125) for k in range(5)] == [0.0] * 5


def test_random_phases_lie_within_one_period_and_follow_the_seed():
    offsets = [phase_offset(Phase.RANDOM, k, 50, 0.2, seed=7) for k in range(50)]
    assert all(0.0 <= o < 0.2 for o in offsets)
    assert len(set(offsets)) == 50  # each stream its own draw
    assert offsets == [phase_offset(Phase.RANDOM, k, 50, 0.2, seed=7) for k in range(50)]
    assert offsets != [phase_offset(Phase.RANDOM, k, 50, 0.2, seed=8) for k in range(50)]
    # Spread over the period, not bunched at one end (50 uniform draws: mean 0.1 +- 0.008 sd).
    assert 0.07 < sum(offsets) / 50 < 0.13
    # A stream's offset depends on (seed, k) only, not on how many streams run beside it.
    assert phase_offset(Phase.RANDOM, 3, 4, 0.2, seed=7) == offsets[3]
    times = list(send_times(Phase.RANDOM, 3, 50, 5.0, 1.0, seed=7))
    assert times == pytest.approx([offsets[3] + i * 0.2 for i in range(5)])


def test_poisson_gaps_are_exponential_with_mean_one_over_fps_and_reproducible():
    times = first(send_times(Phase.LOCKSTEP, 0, 1, 20.0, math.inf, poisson=True, seed=1), 2001)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.10)
    # Exponential, not periodic: standard deviation about the mean, many gaps far below it.
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.15)
    assert (gaps < 0.25 / 20).mean() > 0.15  # P(gap < mean / 4) = 22 %
    assert times == first(send_times(Phase.LOCKSTEP, 0, 1, 20.0, math.inf, poisson=True, seed=1), 2001)
    assert times != first(send_times(Phase.LOCKSTEP, 0, 1, 20.0, math.inf, poisson=True, seed=2), 2001)
    # One generator per stream: stream 1's arrivals are not stream 0's.
    assert times[1:50] != first(send_times(Phase.LOCKSTEP, 1, 2, 20.0, math.inf, poisson=True, seed=1), 50)[1:]


def test_poisson_starts_at_the_phase_offset_and_stays_within_the_duration():
    lock = first(send_times(Phase.LOCKSTEP, 2, 4, 10.0, math.inf, poisson=True, seed=3), 100)
    stag = first(send_times(Phase.STAGGER, 2, 4, 10.0, math.inf, poisson=True, seed=3), 100)
    # The phase only moves the stream's arrival pattern: the same gaps, half a period later.
    assert stag == pytest.approx([t + 0.05 for t in lock])
    cut = list(send_times(Phase.STAGGER, 2, 4, 10.0, 3.0, poisson=True, seed=3))
    assert cut == [t for t in stag if t < 3.0] and len(cut) < 100


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError):
        list(send_times("sideways", 0, 1, 1.0, 1.0))
    with pytest.raises(ValueError):
        list(send_times(Phase.STAGGER, 0, 1, 0.0, 1.0))
    with pytest.raises(ValueError):
        phase_offset(Phase.STAGGER, 2, 2, 1.0)
    with pytest.raises(ValueError):
        LoadGenerator("h", 1, [StreamSpec("a", 1.0, payload())], seed=-1)


# --------------------------------------------------------------------------- against a scripted server


class ScriptedServer:
    """Answers like the real server, by frame id: drops every 5th, ignores id 7, duplicates id 3."""

    def __init__(self, *, refuse_hello: bool = False, delay: float = 0.002, lossless_pause: float = 0.0) -> None:
        self.refuse_hello = refuse_hello
        self.delay = delay
        self.lossless_pause = lossless_pause  # stop reading a lossless stream's socket this long after hello
        self.frames = 0
        self.hello_drop: dict[str, bool] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        try:
            while data := await reader.read(1 << 16):
                for msg in dec.feed(data):
                    await self.answer(msg, writer)
        finally:
            writer.close()

    async def answer(self, msg, writer) -> None:
        if msg["type"] == "hello":
            if self.refuse_hello:
                writer.write(encode(error_msg("auth", "missing or wrong token")))
            else:
                writer.write(encode(welcome_msg(model="m", names={0: "a"}, stream_name=msg["stream_name"],
                                                drop=msg["drop"])))
                self.hello_drop[msg["stream_name"]] = msg["drop"]
                if not msg["drop"] and self.lossless_pause:
                    await writer.drain()
                    await asyncio.sleep(self.lossless_pause)  # not reading: the client's sends back up
            return
        self.frames += 1
        fid, name = msg["frame_id"], msg["stream_name"]
        await asyncio.sleep(self.delay)
        if fid == 7:
            return
        if fid % 5 == 4:
            writer.write(encode(dropped_msg(name, fid, "superseded")))
            return
        reply = {"type": "result", "stream_name": name, "frame_id": fid, "timestamp": msg["timestamp"],
                 "detections": [{"label": "a"}], "latency_ms": 1.5,
                 "timings": {"queue_ms": 0.1, "decode_ms": 0.4, "infer_ms": 1.0}}
        writer.write(encode(reply))
        if fid == 3:
            writer.write(encode(reply))


async def serve(server: ScriptedServer):
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_paced_streams_and_every_reply_accounted_for():
    async def main():
        scripted = ScriptedServer()
        srv, port = await serve(scripted)
        async with srv:
            specs = [StreamSpec("a", 20.0, payload()), StreamSpec("b", 10.0, payload())]
            gen = LoadGenerator("127.0.0.1", port, specs)
            return await gen.run(1.0, grace=0.5), scripted

    result, scripted = asyncio.run(main())
    s = summarize(result)
    a, b = s["per_stream"]
    # Absolute schedule: exactly duration * fps frames, none early, none missed.
    assert (a["sent"], b["sent"]) == (20, 10)
    assert scripted.frames == 30
    assert a["missed_slots"] == 0 and b["missed_slots"] == 0
    # ids 4, 9, 14, 19 dropped; 7 never answered; 3 answered twice (counted once, flagged).
    assert a["dropped"] == 4 and a["drops_by_reason"] == {"superseded": 4}
    assert a["unanswered"] == 1 and a["results"] == 15
    assert a["duplicate_replies"] == 1
    assert b["dropped"] == 2 and b["unanswered"] == 1 and b["results"] == 7
    assert s["unanswered"] == 2 and s["sent"] == s["results"] + s["dropped"] + s["unanswered"]
    assert s["integrity"]["timestamp_mismatches"] == 0
    assert s["offered_fps"] == 30.0
    assert s["sent_fps"] == pytest.approx(30.0, rel=0.05)
    assert s["latency_ms"]["count"] == 22 and 0 < s["latency_ms"]["p50"] < 200
    assert s["server_timings_ms"]["infer_ms"]["p50"] == 1.0
    assert sum(r["sent"] for r in s["per_second"]) == 30
    # Stream "a" sends twice as fast: its results arrive at about twice the rate.
    assert a["achieved_fps"] == pytest.approx(15.0, abs=2.0)
    assert 0 < s["grace_used_s"] < 0.6  # waited for the outstanding frame 7, then gave up


def test_sender_skips_slots_instead_of_bursting_when_it_falls_behind():
    async def main():
        srv, port = await serve(ScriptedServer())
        async with srv:
            gen = LoadGenerator("127.0.0.1", port, [StreamSpec("a", 50.0, payload())])
            task = asyncio.create_task(gen.run(1.0, grace=0.3))
            await asyncio.sleep(0.3)
            import time

            time.sleep(0.3)  # block the event loop like a stalled client would
            return await task

    s = summarize(asyncio.run(main()))
    st = s["per_stream"][0]
    assert st["missed_slots"] >= 10
    assert st["sent"] + st["missed_slots"] == 50
    # No burst: no second in the run saw more frames sent than one second's worth plus one.
    assert max(r["sent"] for r in s["per_second"]) <= 51


def test_unreachable_server_raises_client_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused

    gen = LoadGenerator("127.0.0.1", port, [StreamSpec("a", 5.0, payload())], connect_retries=0)
    with pytest.raises(ClientError, match="not reachable"):
        asyncio.run(gen.run(0.5))


def test_refused_hello_raises_client_error():
    async def main():
        srv, port = await serve(ScriptedServer(refuse_hello=True))
        async with srv:
            gen = LoadGenerator("127.0.0.1", port, [StreamSpec("a", 5.0, payload())] * 2, token="x")
            await gen.run(0.5)

    with pytest.raises(ClientError, match="refused hello"):
        asyncio.run(main())


def test_payloads_default_to_real_photos_at_camera_size():
    pay = prepare_payloads()
    assert [p.label for p in pay] == ["bus.jpg", "zidane.jpg"]
    assert all(p.shape == (480, 640, 3) and p.data[:2] == b"\xff\xd8" for p in pay)
    raw = prepare_payloads(size=(32, 16), synthetic=True, encoding="raw")
    assert raw[0].shape == (16, 32, 3) and len(raw[0].data) == 16 * 32 * 3
    assert raw[0].send_kwargs() == {"encoding": "raw", "shape": (16, 32, 3)}


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size("native") is None
    for bad in ("640", "0x10", "ax b", "640x480x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_stop_ends_sending_early_and_still_collects_replies():
    async def main():
        srv, port = await serve(ScriptedServer())
        async with srv:
            gen = LoadGenerator("127.0.0.1", port, [StreamSpec("a", 20.0, payload())])
            task = asyncio.create_task(gen.run(30.0, grace=0.5))
            await asyncio.sleep(0.5)
            gen.stop()
            return await asyncio.wait_for(task, 5.0)

    result = asyncio.run(main())
    s = summarize(result)
    assert s["interrupted"] and result.send_window < 1.0
    assert 8 <= s["sent"] <= 12
    assert s["unanswered"] == 1  # only the frame the scripted server never answers (id 7)
    assert s["sent_fps"] == pytest.approx(20.0, rel=0.25)  # rates over the time actually sent


def test_poisson_lockstep_run_sends_exactly_the_precomputed_schedule():
    async def main():
        srv, port = await serve(ScriptedServer())
        async with srv:
            specs = [StreamSpec("a", 20.0, payload()), StreamSpec("b", 20.0, payload())]
            gen = LoadGenerator("127.0.0.1", port, specs, phase=Phase.LOCKSTEP, poisson=True, seed=5)
            return await gen.run(1.0, grace=0.5)

    s = summarize(asyncio.run(main()))
    planned = [len(list(send_times(Phase.LOCKSTEP, k, 2, 20.0, 1.0, poisson=True, seed=5))) for k in range(2)]
    assert planned != [20, 20]  # seed 5 gives Poisson counts, not the periodic 20 per second
    assert [p["sent"] + p["missed_slots"] for p in s["per_stream"]] == planned
    assert s["backpressure_slots"] == 0
    assert (s["phase"], s["poisson"], s["seed"]) == ("lockstep", True, 5)


def test_lossless_per_stream_sets_that_streams_hello():
    async def main(drop: bool):
        scripted = ScriptedServer()
        srv, port = await serve(scripted)
        async with srv:
            specs = [StreamSpec("default", 5.0, payload()), StreamSpec("ll", 5.0, payload(), lossless=True),
                     StreamSpec("rt", 5.0, payload(), lossless=False)]
            gen = LoadGenerator("127.0.0.1", port, specs, drop=drop)
            return summarize(await gen.run(0.2, grace=0.3)), scripted.hello_drop

    s, hellos = asyncio.run(main(drop=True))
    assert hellos == {"default": True, "ll": False, "rt": True}
    assert [p["lossless"] for p in s["per_stream"]] == [False, True, False]
    assert s["lossless_streams"] == 1
    s, hellos = asyncio.run(main(drop=False))
    assert hellos == {"default": False, "ll": False, "rt": True}
    assert s["lossless_streams"] == 2


def test_slots_due_while_blocked_by_backpressure_are_not_counted_as_missed():
    # Raw 640x480 frames, about 0.9 MB each, and a server that stops reading the lossless stream for
    # 1.5 s: once the socket buffers (a few MB) are full, the sender waits inside send_frame.
    big = make_payload(np.zeros((480, 640, 3), np.uint8), "black", None, encoding="raw")

    async def main():
        srv, port = await serve(ScriptedServer(lossless_pause=1.5))
        async with srv:
            specs = [StreamSpec("ll", 20.0, big, lossless=True), StreamSpec("rt", 20.0, payload())]
            gen = LoadGenerator("127.0.0.1", port, specs)
            return summarize(await gen.run(2.0, grace=3.0))

    s = asyncio.run(main())
    ll, rt = s["per_stream"]
    assert ll["lossless"] and not rt["lossless"]
    assert ll["backpressure_slots"] >= 5, ll
    assert ll["missed_slots"] == 0 and rt["missed_slots"] == 0 and rt["backpressure_slots"] == 0
    assert ll["sent"] + ll["backpressure_slots"] == 40 and rt["sent"] == 40
    assert ll["unanswered"] == 1  # frame 7, which the scripted server never answers
    assert s["backpressure_slots"] == ll["backpressure_slots"]


def test_live_counters_rate_and_p95_over_the_recent_window() -> None:
    live = LiveCounters(window=2.0)
    assert live.recent(0.5) == (0.0, None)
    for i, lat in enumerate([10.0, 20.0, 30.0, 40.0]):
        live.add_result(0.1 * (i + 1), lat)
    rate, p95 = live.recent(1.0)  # one second into the run: a one-second window so far
    assert rate == pytest.approx(4.0) and p95 == pytest.approx(38.5)  # the shared linear percentile
    assert live.recent(2.35) == (pytest.approx(0.5), 40.0)  # only the result at 0.4 s is inside
    assert live.results == 4
