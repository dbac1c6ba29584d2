"""Load-test maths: percentiles, Jain fairness, knee detection, per-second buckets and the run summary."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from visionstream.measure import percentile, window_rate

PERCENTILES = (50, 95, 99)


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50/p95/p99 and max of a list of milliseconds (None fields when empty)."""
    data = sorted(values)
    out: dict[str, float | int | None] = {"count": len(data)}
    out["mean"] = sum(data) / len(data) if data else None
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(data, q)
    out["max"] = data[-1] if data else None
    return out


def jain_index(values: Iterable[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets all.

    None when there is nothing to compare (no values, or every value is zero).
    """
    xs = [float(v) for v in values]
    if any(x < 0 for x in xs):
        raise ValueError("Jain's index is defined for non-negative allocations")
    sq = sum(x * x for x in xs)
    if not xs or sq == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sq)


def find_knee(offered: Sequence[float], achieved: Sequence[float], min_gain: float = 0.05) -> int | None:
    """Index of the saturation point of a load ramp, or None if throughput never stopped growing.

    The knee is the first step after which raising the offered load no longer raised the achieved
    throughput by at least `min_gain` (relative): the lowest load that already gets (nearly) all
    the throughput there is, so its latency is the price of saturation without needless queueing.
    A step that did not raise the offered load is no evidence either way.
    """
    if len(offered) != len(achieved):
        raise ValueError("offered and achieved must have the same length")
    for i in range(len(achieved) - 1):
        if offered[i + 1] <= offered[i]:
            continue
        if achieved[i + 1] <= achieved[i] * (1.0 + min_gain):
            return i
    return None


def bucket_index(t: float, width: float = 1.0) -> int:
    return math.floor(t / width) if t >= 0 else -1


def per_second(
    sent_times: Sequence[float],
    answers: Sequence[tuple[float, str, float | None]],
    duration: float,
    width: float = 1.0,
) -> list[dict[str, Any]]:
    """Rows of sent/results/dropped counts and latency percentiles per time bucket.

    `answers` holds (time answered, "result" or "dropped", latency ms or None). Rows cover
    [0, duration) plus any later bucket in which answers arrived (the grace period).
    """
    n = max(math.ceil(duration / width), 1)
    last = max([bucket_index(t, width) for t, _, _ in answers] + [n - 1])
    sent = Counter(bucket_index(t, width) for t in sent_times)
    results: dict[int, list[float]] = defaultdict(list)
    dropped: Counter[int] = Counter()
    for t, kind, lat in answers:
        b = bucket_index(t, width)
        if kind == "result" and lat is not None:
            results[b].append(lat)
        elif kind == "dropped":
            dropped[b] += 1
    rows = []
    for b in range(last + 1):
        lats = results.get(b, [])
        row: dict[str, Any] = {
            "t": round(b * width, 6),
            "sent": sent.get(b, 0),
            "results": len(lats),
            "dropped": dropped.get(b, 0),
            "fps": len(lats) / width,
        }
        for q in PERCENTILES:
            row[f"p{q}"] = percentile(lats, q)
        row["max"] = max(lats) if lats else None
        rows.append(row)
    return rows


def fairness(per_stream: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Jain index over achieved fps: all streams, normalised by demand, and per equal-demand group.

    Raw achieved fps is only comparable between streams that offered the same rate, so streams
    are also grouped by offered fps (e.g. the seven 2 fps cameras beside one greedy 60 fps one).
    """
    achieved = [s["achieved_fps"] for s in per_stream]
    ratios = [s["achieved_fps"] / s["offered_fps"] for s in per_stream if s["offered_fps"] > 0]
    groups: dict[float, list[float]] = defaultdict(list)
    for s in per_stream:
        groups[round(float(s["offered_fps"]), 6)].append(s["achieved_fps"])
    return {
        "jain_all": jain_index(achieved),
        "jain_normalized": jain_index(ratios),
        "jain_by_offered_fps": {
            f"{rate:g}": {"streams": len(v), "jain": jain_index(v)} for rate, v in sorted(groups.items())
        },
    }


def parse_stream_fps(spec: str) -> list[float]:
    """Per-stream rates from "60,2x7" style specs: comma-separated RATE or RATExCOUNT items."""
    rates: list[float] = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        rate_s, sep, count_s = item.partition("x")
        try:
            rate = float(rate_s)
            count = int(count_s) if sep else 1
        except ValueError:
            raise ValueError(
                f"bad stream rate {raw.strip()!r}: use RATE or RATExCOUNT, e.g. 60,2x7"
            ) from None
        if not (rate > 0 and math.isfinite(rate)) or count < 1:
            raise ValueError(f"bad stream rate {raw.strip()!r}: rate must be > 0 and count >= 1")
        rates.extend([rate] * count)
    if not rates:
        raise ValueError("no stream rates given")
    return rates


# --------------------------------------------------------------------------- run summary


def summarize(run: Any) -> dict[str, Any]:
    """JSON-ready summary of a `loadgen.RunResult`.

    Every frame counts towards sent/results/drops/unanswered. Latency and throughput cover the
    measured window only: frames sent after `warmup`, replies that arrived before the sending time
    was over (replies in the grace period would otherwise inflate the rate of a short run). Latency
    leaves out each real-time stream's last frame (see below).
    """
    # Frames are scheduled in [0, duration); a sender that lagged past that stretches the window.
    start, end = run.warmup, (run.send_window if run.interrupted else max(run.duration, run.send_window))
    all_sent: list[float] = []
    answers: list[tuple[float, str, float | None]] = []
    result_times: list[float] = []
    lat_all: list[float] = []
    server_parts: dict[str, list[float]] = defaultdict(list)
    drops: Counter[str] = Counter()
    streams = []
    totals: Counter[str] = Counter()
    for sr in run.streams:
        recs = list(sr.records.values())
        counts = Counter(r.outcome for r in recs)
        s_drops = Counter(r.reason for r in recs if r.outcome == "dropped")
        drops.update(s_drops)
        measured = [r for r in recs if r.sent_at >= start]
        if not sr.lossless and measured:
            # A camera's last frame has no successor to supersede it, so it waits out the end-of-run
            # drain (up to one fair turn, every stream's last frame at once): no steady state has that.
            last = max(measured, key=lambda r: r.frame_id)
            measured = [r for r in measured if r is not last]
        lats = [r.latency_ms for r in measured if r.outcome == "result" and r.latency_ms is not None]
        s_result_times = [r.answered_at for r in recs if r.outcome == "result"]
        lat_all.extend(lats)
        result_times.extend(s_result_times)
        for r in measured:
            if r.outcome != "result":
                continue
            for key in ("server_latency_ms", "queue_ms", "decode_ms", "infer_ms"):
                v = getattr(r, key)
                if v is not None:
                    server_parts[key].append(v)
        all_sent.extend(r.sent_at for r in recs)
        answers.extend((r.answered_at, r.outcome, r.latency_ms) for r in recs if r.outcome is not None)
        unanswered = counts.get(None, 0)
        row = {
            "name": sr.spec.name,
            "lossless": sr.lossless,
            "offered_fps": sr.spec.fps,
            "sent_fps": window_rate((r.sent_at for r in recs), start, end),
            "achieved_fps": window_rate(s_result_times, start, end),
            "sent": len(recs),
            "results": counts.get("result", 0),
            "dropped": counts.get("dropped", 0),
            "errors": counts.get("error", 0),
            "unanswered": unanswered,
            "missed_slots": sr.missed_slots,
            "backpressure_slots": sr.backpressure_slots,
            "drops_by_reason": dict(s_drops),
            "latency_ms": latency_summary(lats),
            "duplicate_replies": sr.duplicate_replies,
            "unexpected_replies": sr.unexpected_replies,
            "timestamp_mismatches": sr.timestamp_mismatches,
            "closed_by_server": sr.closed_by_server,
            "failure": sr.failure,
            "server_errors": sr.errors[:10],
        }
        row.update(stream_service(recs, start, end))
        streams.append(row)
        for key in ("sent", "results", "dropped", "errors", "unanswered", "missed_slots", "backpressure_slots",
                    "duplicate_replies", "unexpected_replies", "timestamp_mismatches"):
            totals[key] += row[key]
    return {
        "started_at": run.started_wall,
        "duration_s": run.duration,
        "send_window_s": run.send_window,
        "warmup_s": run.warmup,
        "grace_used_s": run.grace_used,
        "interrupted": run.interrupted,
        # The load shape: where each stream's schedule starts, and periodic or Poisson gaps.
        "phase": getattr(run.phase, "value", run.phase),
        "poisson": bool(run.poisson),
        "seed": run.seed,
        "streams": len(run.streams),
        "lossless_streams": sum(1 for sr in run.streams if sr.lossless),
        "offered_fps": sum(sr.spec.fps for sr in run.streams),
        "sent_fps": window_rate(all_sent, start, end),
        "achieved_fps": window_rate(result_times, start, end),
        **{k: totals[k] for k in ("sent", "results", "dropped", "errors", "unanswered", "missed_slots",
                                  "backpressure_slots")},
        "drops_by_reason": dict(drops),
        "latency_ms": latency_summary(lat_all),
        "server_timings_ms": {k: latency_summary(v) for k, v in server_parts.items()},
        "per_second": per_second(all_sent, answers, run.send_window),
        "per_stream": streams,
        "fairness": fairness(streams),
        "integrity": {
            k: totals[k] for k in ("duplicate_replies", "unexpected_replies", "timestamp_mismatches")
        } | {"streams_closed_by_server": sum(1 for s in streams if s["closed_by_server"])},
    }


def ramp_summary(steps: Sequence[dict[str, Any]], min_gain: float = 0.05) -> dict[str, Any]:
    """Knee of a ramp made of `summarize` outputs, one per offered-load step."""
    offered = [s["offered_fps"] for s in steps]
    achieved = [s["achieved_fps"] for s in steps]
    knee = find_knee(offered, achieved, min_gain)
    rows = [
        {
            "offered_fps": s["offered_fps"],
            "achieved_fps": s["achieved_fps"],
            "latency_ms": {k: s["latency_ms"][k] for k in ("p50", "p95", "p99", "max")},
            "dropped": s["dropped"],
            "unanswered": s["unanswered"],
        }
        for s in steps
    ]
    out: dict[str, Any] = {
        "min_gain": min_gain,
        "steps": rows,
        "knee_step": knee,
        "saturated": knee is not None,
        "max_achieved_fps": max(achieved) if achieved else None,
    }
    if knee is not None:
        out["knee"] = rows[knee]
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fmt_index(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def load_shape(s: dict[str, Any]) -> str:
    """'lockstep phases, Poisson gaps (mean 1/fps), seed 0' and how many streams were lossless."""
    phase = s.get("phase", "stagger")
    text = f"{phase} phases, " + ("Poisson gaps (mean 1/fps)" if s.get("poisson") else "periodic")
    if phase == "random" or s.get("poisson"):
        text += f", seed {s.get('seed', 0)}"
    n_lossless = s.get("lossless_streams", 0)
    if n_lossless:
        text += f"; {n_lossless} of {s['streams']} streams lossless"
    return text


def format_summary(s: dict[str, Any], server_before: Any = None, server_after: Any = None) -> str:
    """Human-readable report of one `summarize` output."""
    lat = s["latency_ms"]
    lines = [
        f"streams {s['streams']}, window {s['send_window_s']:.1f} s (warm-up {s['warmup_s']:g} s excluded)"
        + (" - INTERRUPTED, partial run" if s.get("interrupted") else ""),
        f"load shape  {load_shape(s)}",
        f"throughput  offered {s['offered_fps']:.1f} fps, sent {s['sent_fps']:.1f} fps, "
        f"achieved {s['achieved_fps']:.1f} fps",
        f"frames      sent {s['sent']}, results {s['results']}, dropped {s['dropped']}, "
        f"errors {s['errors']}, unanswered {s['unanswered']}"
        + (f", sender missed {s['missed_slots']} slots" if s["missed_slots"] else "")
        + (f", {s['backpressure_slots']} slots held back by backpressure" if s.get("backpressure_slots") else ""),
        f"latency ms  p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])}  "
        f"max {_ms(lat['max'])}  (client end-to-end, {lat['count']} results)",
    ]
    st = s["server_timings_ms"]
    if st:
        parts = [f"{k.removesuffix('_ms')} {_ms(v['p50'])}/{_ms(v['p95'])}" for k, v in st.items()]
        lines.append("server ms   p50/p95: " + ", ".join(parts))
    if s["drops_by_reason"]:
        lines.append("drops       " + ", ".join(f"{k} {v}" for k, v in sorted(s["drops_by_reason"].items())))
    f = s["fairness"]
    groups = ", ".join(f"{rate} fps x{g['streams']}: {_fmt_index(g['jain'])}"
                       for rate, g in f["jain_by_offered_fps"].items())
    lines.append(f"fairness    Jain all {_fmt_index(f['jain_all'])}, by demand "
                 f"{_fmt_index(f['jain_normalized'])}, per rate group [{groups}]")
    integ = s["integrity"]
    if any(integ.values()):
        lines.append("integrity   " + ", ".join(f"{k} {v}" for k, v in integ.items() if v))
    lines.append("")
    lines.append(f"{'stream':<16}{'offered':>8}{'achieved':>9}{'sent':>7}{'results':>8}{'dropped':>8}"
                 f"{'unans.':>7}{'p50':>8}{'p95':>8}{'p99':>8}")
    for p in s["per_stream"]:
        pl = p["latency_ms"]
        lines.append(
            f"{p['name'][:15]:<16}{p['offered_fps']:>8.1f}{p['achieved_fps']:>9.1f}{p['sent']:>7}"
            f"{p['results']:>8}{p['dropped']:>8}{p['unanswered']:>7}{_ms(pl['p50']):>8}"
            f"{_ms(pl['p95']):>8}{_ms(pl['p99']):>8}"
            + (f"  ! {p['failure']}" if p["failure"] else "")
        )
    if "client_cpu_percent" in s:
        lines.append(f"load generator CPU {s['client_cpu_percent']:.0f} % of one core (shares the machine)")
    for label, stats in (("before", server_before), ("after", server_after)):
        if stats is not None:
            lines.append(f"server /stats {label}: {format_server_stats(stats)}")
    return "\n".join(lines)


def format_server_stats(stats: Any) -> str:
    """One line of the fields of the server's /stats that matter under load."""
    if not isinstance(stats, dict):
        return str(stats)
    if "error" in stats and len(stats) == 1:
        return f"unavailable ({stats['error']})"
    keys = ("processed_frames", "dropped_frames", "fps", "queue_size", "workers_busy", "cpu", "ram")
    parts = []
    for k in keys:
        if k in stats:
            v = stats[k]
            parts.append(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts) if parts else "(no known fields)"


# --------------------------------------------------------------------------- fair share and latency bounds


def stream_service(records: Iterable[Any], start: float, end: float) -> dict[str, Any]:
    """What one stream got from the server's workers, from its `loadgen.FrameRecord`s.

    - served / served_fps: results for frames *sent* within [start, end) (per second of that
      window), however late they were answered (the grace period included). Unlike achieved_fps
      (results *answered* within the window) it has no edge effect: a stream the server kept up
      with has served_fps == sent_fps exactly, even at 2 fps in a 2-second window.
    - worker_ms_served: the lane time (decode_ms + infer_ms) those results took, summed, so that
      pooled over streams sending the same frame it gives that frame's mean cost.
    - worker_ms_median: the median lane time of those results, or of all its results if none
      were sent in the window; None without results.
    - first_sent_s: when its first frame went out (seconds from the run start), which shows the
      load's phase: the same instant for every stream in lockstep, spread over a period otherwise.
    """
    recs = list(records)

    def cost(r: Any) -> float | None:
        ok = r.outcome == "result" and r.decode_ms is not None and r.infer_ms is not None
        return r.decode_ms + r.infer_ms if ok else None

    served = [r for r in recs if r.outcome == "result" and start <= r.sent_at < end]
    costs = [c for c in map(cost, served) if c is not None]
    return {
        "served": len(served),
        "served_fps": window_rate((r.sent_at for r in served), start, end),
        "worker_ms_served": sum(costs),
        "worker_ms_median": percentile(costs or [c for c in map(cost, recs) if c is not None], 50),
        "first_sent_s": min((r.sent_at for r in recs), default=None),
    }


def max_min_shares(demands: Sequence[float], capacity: float) -> list[float]:
    """Max-min fair allocation of `capacity` among `demands` (water-filling).

    Streams are filled in order of demand: each gets the smaller of its demand and an equal split
    of what is left among the streams not yet filled. So a stream asking for less than the equal
    share gets all it asked for, the rest split what remains equally, and the shares sum to
    min(capacity, sum of demands). A demand may be math.inf (a backlogged stream: it takes any
    share it is given).
    """
    if not (capacity >= 0 and math.isfinite(capacity)):
        raise ValueError(f"capacity must be finite and >= 0, got {capacity}")
    if any(not d >= 0 for d in demands):  # also rejects NaN
        raise ValueError("demands must be >= 0")
    shares = [0.0] * len(demands)
    left = float(capacity)
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for filled, i in enumerate(order):
        give = min(float(demands[i]), max(left, 0.0) / (len(order) - filled))
        shares[i] = give
        left -= give
    return shares


def fair_share_fractions(demand_fps: Sequence[float], served_fps: Sequence[float], cost_ms: Sequence[float]
                         ) -> list[dict[str, float | None]]:
    """Each stream's max-min fair share of the worker time actually spent, and the fraction it got.

    Fairness is judged in worker time, not frames: a frame that takes 1 s to decode is not the
    same demand as one taking 7 ms. Stream i demands d_i = demand_fps_i x cost_ms_i (ms of worker
    time per second) and got w_i = served_fps_i x cost_ms_i; the capacity shared out is the work
    the server did, W = sum of w_i. With s = max_min_shares(d, W), fraction_i = w_i / s_i: 1 when
    the stream got its fair share, below 1 when others took some of it. With equal costs this is
    the plain frame-rate water-fill with capacity = total served. Fractions are None for streams
    with no demand; shares are also given in frames per second (share_fps = s_i / cost_ms_i).
    """
    if not len(demand_fps) == len(served_fps) == len(cost_ms):
        raise ValueError("demand_fps, served_fps and cost_ms must have the same length")
    if any(not c > 0 for c in cost_ms):
        raise ValueError("costs must be > 0")
    work = [s * c for s, c in zip(served_fps, cost_ms)]
    demands = [d * c for d, c in zip(demand_fps, cost_ms)]
    shares = max_min_shares(demands, sum(work))
    return [
        {"demand_ms_per_s": d, "work_ms_per_s": w, "share_ms_per_s": s, "share_fps": s / c,
         "fraction": w / s if s > 0 else None}
        for d, w, s, c in zip(demands, work, shares, cost_ms)
    ]


def p99_bound_ms(fps: float, streams: int, throughput_fps: float, inference_ms: float,
                 inferences: float = 3.0) -> float:
    """The latency a frame may take: min(its stream's frame period, one fair turn) + 3 inferences.

    One fair turn = streams / throughput: the time the server needs to serve every stream once at
    the rate it achieved. A frame should not wait longer than the next frame of its own stream
    (after that it is stale) nor longer than one round over all streams, plus a few inference
    times for the frame itself and the lanes it finds busy. All times in ms.
    """
    if not (fps > 0 and streams >= 1 and inference_ms >= 0):
        raise ValueError("fps must be > 0, streams >= 1 and inference_ms >= 0")
    period = 1000.0 / fps
    turn = 1000.0 * streams / throughput_fps if throughput_fps > 0 else math.inf
    return min(period, turn) + inferences * inference_ms
