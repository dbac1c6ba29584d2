"""`python -m bench.simulate`: the scheduling policy on a simulated clock, the tables in docs/BENCHMARKS.md.

A discrete-event loop drives the real `Scheduler` (and so `policy.FairShare`), no threads: frames
arrive on a trace (staggered, lockstep, random phases or Poisson gaps; equal or mixed rates; cheap
and costly streams; lossless uploads), lanes take them and finish after the stream's cost. The
property tests (tests/unit/server/test_policy.py) use the same loop.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from visionstream.server.policy import FairShare
from visionstream.server.scheduler import Job, Scheduler


@dataclass(frozen=True)
class Source:
    """One simulated camera (or, lossless, a folder upload that always has a next frame)."""

    rate: float  # frames per second (the mean, for Poisson gaps)
    cost: float  # worker seconds per frame
    phase: float = 0.0  # first frame at phase / rate
    poisson: bool = False
    lossless: bool = False


@dataclass
class Outcome:
    lanes: int
    horizon: float
    sources: Sequence[Source]
    offered: list[int]
    served: list[int]
    busy: list[float]  # worker seconds spent on each stream's frames
    waits: list[list[float]]  # per stream: receipt -> a lane took it
    drops: list[Counter] = field(default_factory=list)
    idle_lane_with_work: int = 0  # times a lane idled while a frame it may serve waited
    max_waiting: int = 0

    def share(self) -> list[float]:
        """Max-min fair shares of the lanes' worker time (seconds per second): each stream demands the
        frames it really sent (a Poisson trace sends more or fewer than its rate) x their cost, capped by
        its lane share (a lossless upload demands all of it). What a fair scheduler owes each stream."""
        cap = FairShare(self.lanes).lane_share(len(self.sources))
        demand = [cap if s.lossless else min(cap, self.offered[i] / self.horizon * s.cost)
                  for i, s in enumerate(self.sources)]
        return max_min(demand, float(self.lanes))

    def fraction(self, i: int) -> float:
        return self.busy[i] / self.horizon / self.share()[i]


def max_min(demand: Sequence[float], capacity: float) -> list[float]:
    """Water-filling: the largest equal level no stream below it can use, the rest to the others."""
    share = [0.0] * len(demand)
    left = sorted(range(len(demand)), key=lambda i: demand[i])
    while left:
        level = capacity / len(left)
        i = left[0]
        if demand[i] > level:
            for j in left:
                share[j] = level
            break
        share[i] = demand[i]
        capacity -= demand[i]
        left.pop(0)
    return share


def arrivals(src: Source, horizon: float, rng: random.Random) -> list[float]:
    if src.lossless:
        return []
    out, t = [], src.phase / src.rate
    while t < horizon:
        out.append(t)
        t += rng.expovariate(src.rate) if src.poisson else 1.0 / src.rate
    return out


def simulate(sources: Sequence[Source], lanes: int, horizon: float = 3.0, seed: int = 0,
             max_age_ms: float = 0.0, jitter: float = 0.0) -> Outcome:
    """Run the trace, then drain: every frame ends taken or dropped. `jitter` varies each frame's cost
    by up to +-jitter of its stream's."""
    rng = random.Random(seed)
    now = [0.0]
    answers: dict[int, str] = {}
    n = len(sources)
    out = Outcome(lanes, horizon, sources, [0] * n, [0] * n, [0.0] * n, [[] for _ in range(n)],
                  [Counter() for _ in range(n)])

    def on_drop(job: Job, reason: str) -> None:
        assert job.frame not in answers, f"frame {job.frame} answered twice"
        answers[job.frame] = reason
        out.drops[job.stream.key][reason] += 1

    sched = Scheduler(on_drop=on_drop, clock=lambda: now[0], lanes=lanes, max_queue=10_000,
                      max_age_ms=max_age_ms)
    streams = [sched.add_stream(i, f"s{i}", lossless=s.lossless) for i, s in enumerate(sources)]
    frame_ids = itertools.count()
    events: list[tuple[float, int, int, object]] = []  # (time, 0 = lane done / 1 = arrival, seq, what)
    seq = itertools.count()
    for i, src in enumerate(sources):
        for t in arrivals(src, horizon, rng):
            heapq.heappush(events, (t, 1, next(seq), i))
    free = lanes

    def offer(i: int) -> None:
        fid = next(frame_ids)
        out.offered[i] += 1
        sched.offer(Job(streams[i], fid, now[0]))

    def top_up_lossless() -> None:  # a folder upload: its reader sends whenever there is space
        if now[0] < horizon:
            for i, src in enumerate(sources):
                while src.lossless and sched.has_space(streams[i]):
                    offer(i)

    def fill() -> None:
        nonlocal free
        while free:
            job = sched.take()
            if job is None:
                break
            i = job.stream.key
            assert job.frame not in answers
            answers[job.frame] = "taken"
            cost = sources[i].cost * (1 + rng.uniform(-jitter, jitter))
            out.served[i] += 1
            out.busy[i] += cost
            if now[0] < horizon:  # the drain after the trace ends is no steady state
                out.waits[i].append(now[0] - job.received)
            free -= 1
            heapq.heappush(events, (now[0] + cost, 0, next(seq), (job, cost)))
            top_up_lossless()
        if free and sched.policy.pick(sched._waiting, len(sched.streams)) is not None:
            out.idle_lane_with_work += 1

    top_up_lossless()
    fill()
    while events:
        t, kind, _, what = heapq.heappop(events)
        now[0] = t
        if kind == 0:
            job, cost = what  # type: ignore[misc]
            sched.done(job, cost)
            free += 1
        else:
            offer(what)  # type: ignore[arg-type]
        top_up_lossless()
        fill()
        out.max_waiting = max(out.max_waiting, len(sched))
        for sq in streams:
            assert len(sq.jobs) <= sq.depth
    assert len(sched) == 0 and free == lanes, "frames left waiting after the drain"
    assert len(answers) == sum(out.offered), "a frame was never answered"
    return out


def cameras(n: int, rate: float, cost: float, shape: str, rng: random.Random) -> list[Source]:
    phases = {"stagger": [k / n for k in range(n)], "lockstep": [0.0] * n,
              "random": [rng.random() for _ in range(n)], "poisson": [rng.random() for _ in range(n)]}[shape]
    return [Source(rate, cost, ph, poisson=shape == "poisson") for ph in phases]


def mixed(load: float, shape: str, lanes: int = 2, cost: float = 0.007) -> list[Source]:
    """Rates 5:20:60:150 twice over, scaled to `load` x the lanes' capacity."""
    base = [5, 20, 60, 150] * 2
    scale = load * lanes / cost / sum(base)
    rng = random.Random(3)
    return [Source(r * scale, cost, rng.random(), poisson=shape == "poisson") for r in base]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--horizon", type=float, default=12.0, help="simulated seconds per trace")
    p.add_argument("--cost", type=float, default=0.007, help="worker seconds per frame")
    p.add_argument("--jitter", type=float, default=0.2, help="each frame's cost varies by up to +-this fraction")
    args = p.parse_args(argv)
    lanes = 2
    print(f"2 lanes of {args.cost * 1000:g} ms (+-{args.jitter:.0%}), {args.horizon:g} s per trace: the worst stream's "
          "fraction of its max-min fair share, lanes busy, wait p50/p99 (ms)")
    for shape in ("stagger", "random", "lockstep", "poisson"):
        for n, load in [(8, 2.0), (32, 2.0), (64, 2.0), (8, 1.0), (8, 0.5)]:
            rate = load * lanes / args.cost / n
            out = simulate(cameras(n, rate, args.cost, shape, random.Random(n)), lanes, horizon=args.horizon,
                           seed=n, jitter=args.jitter)
            waits = sorted(w for ws in out.waits for w in ws)
            worst = min(out.fraction(i) for i in range(n))
            print(f"{shape:<9}{n:>3} x {load:>4.0%}  fair {worst:5.2f}  busy {sum(out.busy) / out.horizon:4.2f}  "
                  f"wait {1000 * waits[len(waits) // 2]:6.1f} / {1000 * waits[int(0.99 * (len(waits) - 1))]:6.1f}")
    for shape in ("random", "poisson"):
        for load in (1.0, 2.0):
            sources = mixed(load, shape, lanes, args.cost)
            out = simulate(sources, lanes, horizon=args.horizon, seed=5, jitter=args.jitter)
            print(f"mix 5:20:60:150 {shape:<8}{load:>4.0%}  fair " + " ".join(f"{out.fraction(i):.2f}"
                                                                          for i in range(len(sources))))
    for label, rate in (("30 fps", 30.0), ("80 % of capacity", 0.8 * lanes / args.cost / 4)):
        cams = [Source(rate, args.cost, k / 4) for k in range(4)]
        out = simulate([Source(2, 1.07), *cams], lanes, horizon=args.horizon)
        print(f"1.07 s frames at 2 fps + 4 cameras at {label}: heavy stream {out.busy[0] / out.horizon:.2f} lanes, "
              f"cameras served {sum(out.served[1:])} of {sum(out.offered[1:])}, fair "
              + " ".join(f"{out.fraction(i):.2f}" for i in range(5)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
