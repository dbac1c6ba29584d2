"""The stress_test.py command: simulated cameras against a live server, report on screen, JSON and PNG."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visionstream.cli.common import HelpFormatter, add_tls_flags, tls_context
from visionstream.client.connection import ClientError
from visionstream.loadtest.loadgen import LoadGenerator, Phase, StreamSpec, parse_size, prepare_payloads
from visionstream.loadtest.report import format_summary, parse_stream_fps, ramp_summary, summarize

PROG = "stress_test.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Simulate many cameras against a running visionstream server: in-process asyncio "
        "streams, one TCP connection each, paced on an absolute schedule. Reports offered vs achieved "
        "throughput, end-to-end latency percentiles, drops by reason, unanswered frames, fairness "
        "(Jain index) and the server's /stats, on screen and as JSON + PNG.",
        formatter_class=HelpFormatter,
    )
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="server address")
    net.add_argument("--port", type=int, default=9000, help="server TCP (frame) port")
    net.add_argument("--api-port", type=int, default=8000,
                     help="server HTTP port for /stats before, during and after the run (0: skip)")
    net.add_argument("--token", default=None, help="shared secret sent in hello and to /stats")
    add_tls_flags(net, "the server (frames and /stats over https)")
    net.add_argument("--connect-retries", type=int, default=1,
                     help="extra connection attempts (with backoff) before giving up")
    load = p.add_argument_group("load")
    load.add_argument("--streams", type=int, default=8, help="number of simulated cameras")
    load.add_argument("--fps", type=float, default=20.0, help="frames per second of each camera")
    load.add_argument("--stream-fps", default=None, metavar="SPEC",
                      help="per-stream rates instead of --streams/--fps: comma-separated RATE or "
                           "RATExCOUNT, e.g. '60,2x7' = one greedy 60 fps camera and seven at 2 fps")
    load.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    load.add_argument("--warmup", type=float, default=0.0,
                      help="first seconds left out of latency and throughput figures (frames still counted)")
    load.add_argument("--grace", type=float, default=5.0,
                      help="seconds to wait after sending stops for replies still outstanding")
    load.add_argument("--name-prefix", default="cam", help="stream names are PREFIX-00, PREFIX-01, ...")
    load.add_argument("--lossless", action="store_true",
                      help="ask for lossless streams (hello drop=false: backpressure instead of drops)")
    load.add_argument("--phase", choices=[p.value for p in Phase], default=Phase.STAGGER.value,
                      help="where each camera's frames fall: stagger = spread evenly over one period, "
                           "lockstep = every camera's frame at the same instant (an NVR's tick), "
                           "random = each camera at a random point of its period (see --seed)")
    load.add_argument("--poisson", action="store_true",
                      help="exponential gaps between a camera's frames (mean 1/fps, bursty like a network) "
                           "instead of a fixed period")
    load.add_argument("--seed", type=int, default=0,
                      help="seed of the random phases and Poisson gaps (same seed, same schedule)")
    load.add_argument("--no-stagger", action="store_true",
                      help="deprecated alias for --phase lockstep")
    img = p.add_argument_group("frames")
    img.add_argument("--image", type=Path, default=None,
                     help="image every camera sends (default: ultralytics' bus.jpg and zidane.jpg, "
                          "alternating between streams)")
    img.add_argument("--size", default="640x480", help="frame size WxH, or 'native' to keep the image's size")
    img.add_argument("--synthetic", action="store_true", help="send random noise instead of a photo")
    img.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg",
                     help="JPEG (encoded once up front) or raw BGR pixels")
    img.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100")
    ramp = p.add_argument_group("ramp (find the saturation point)")
    ramp.add_argument("--ramp", action="store_true",
                      help="step the offered load up until achieved throughput stops growing; "
                           "report the knee")
    ramp.add_argument("--ramp-factor", type=float, default=2.0,
                      help="each step multiplies every stream's fps by this (ignored with --ramp-add)")
    ramp.add_argument("--ramp-add", type=float, default=None, metavar="FPS",
                      help="instead of multiplying, add this many fps to the total offered load per step")
    ramp.add_argument("--ramp-steps", type=int, default=8, help="most steps to run")
    ramp.add_argument("--step-duration", type=float, default=5.0, help="seconds per ramp step")
    ramp.add_argument("--ramp-gain", type=float, default=0.05,
                      help="relative throughput growth below which the load counts as saturated")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("results"),
                     help="folder for stress-<timestamp>.json and .png")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    out.add_argument("--quiet", action="store_true", help="no live progress bar")
    return p


def stream_specs(args: argparse.Namespace, payloads: list) -> list[StreamSpec]:
    rates = parse_stream_fps(args.stream_fps) if args.stream_fps else [args.fps] * args.streams
    return [
        StreamSpec(f"{args.name_prefix}-{i:02d}", rate, payloads[i % len(payloads)])
        for i, rate in enumerate(rates)
    ]


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.streams < 1:
        p.error("--streams must be at least 1")
    if args.fps <= 0:
        p.error("--fps must be > 0")
    if args.duration <= 0 or args.step_duration <= 0:
        p.error("--duration and --step-duration must be > 0")
    if args.warmup < 0 or args.grace < 0:
        p.error("--warmup and --grace must be >= 0")
    if args.warmup >= (args.step_duration if args.ramp else args.duration):
        p.error("--warmup must be shorter than the sending time")
    if args.ramp and args.ramp_add is None and args.ramp_factor <= 1:
        p.error("--ramp-factor must be > 1")
    if args.ramp_add is not None and args.ramp_add <= 0:
        p.error("--ramp-add must be > 0")
    if not 1 <= args.jpeg_quality <= 100:
        p.error("--jpeg-quality must be 1-100")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.no_stagger:
        if args.phase not in (Phase.STAGGER.value, Phase.LOCKSTEP.value):
            p.error(f"--no-stagger (an alias for --phase lockstep) contradicts --phase {args.phase}")
        print(f"{PROG}: --no-stagger is deprecated: use --phase lockstep", file=sys.stderr)
        args.phase = Phase.LOCKSTEP.value
    try:
        args.size_wh = parse_size(args.size)
        if args.stream_fps:
            parse_stream_fps(args.stream_fps)
    except ValueError as exc:
        p.error(str(exc))
    if args.image is not None and not args.image.is_file():
        p.error(f"--image {args.image} is not a file")


# --------------------------------------------------------------------------- /stats over HTTP


class StatsPoller:
    """Fetches the server's /stats; samples it about once a second while the load runs.

    One HTTP client for the whole run: building one (its TLS context) stalls this process's event loop,
    which would show in the latency of the very frames being measured (docs/BENCHMARKS.md).
    """

    def __init__(self, host: str, api_port: int, token: str | None, tls: ssl.SSLContext | None = None) -> None:
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{host}:{api_port}/stats" if api_port else None
        self.tls = tls
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.samples: list[dict[str, Any]] = []
        self._client: Any = None

    async def fetch(self) -> dict[str, Any] | None:
        if self.url is None:
            return None
        import httpx

        try:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=5.0, verify=self.tls if self.tls is not None else True)
            r = await self._client.get(self.url, headers=self.headers)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def sample_forever(self, clock, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            snap = await self.fetch()
            if snap and "error" not in snap:
                self.samples.append({"t": round(clock(), 3), **{
                    k: snap.get(k) for k in ("queue_size", "workers_busy", "in_flight", "cpu", "ram", "fps")
                }, "process_cpu": (snap.get("process") or {}).get("cpu_percent")})


def sample_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and max of each field the server reported while under load."""
    out: dict[str, Any] = {"count": len(samples)}
    for key in ("queue_size", "workers_busy", "in_flight", "cpu", "process_cpu", "fps"):
        vals = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
        if vals:
            out[key] = {"mean": sum(vals) / len(vals), "max": max(vals)}
    return out


# --------------------------------------------------------------------------- progress


async def show_progress(gen: LoadGenerator, duration: float, desc: str) -> None:
    from tqdm import tqdm

    bar = tqdm(total=round(duration, 1), desc=desc, unit="s", file=sys.stderr, leave=False, disable=None,
               bar_format="{desc}: {bar} {n:.0f}/{total:.0f}s{postfix}", dynamic_ncols=True)
    try:
        while True:
            await asyncio.sleep(0.25)
            now = gen.now()
            rate, p95 = gen.live.recent(now)
            bar.n = min(round(now, 1), bar.total)
            bar.set_postfix_str(
                f"sent {gen.live.sent} | {rate:5.1f} fps | p95 {'-' if p95 is None else f'{p95:.0f}'} ms | "
                f"drops {gen.live.drops} | errors {gen.live.errors}",
                refresh=True,
            )
    finally:
        bar.close()


async def measure(
    host: str,
    port: int,
    specs: list[StreamSpec],
    duration: float,
    *,
    api_port: int = 0,
    token: str | None = None,
    warmup: float = 0.0,
    grace: float = 5.0,
    drop: bool = True,
    phase: Phase = Phase.STAGGER,
    poisson: bool = False,
    seed: int = 0,
    connect_retries: int = 1,
    progress: bool = True,
    desc: str = "load",
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """One load run: the `summarize` output plus the server's /stats before, during and after.

    `phase`, `poisson` and `seed` shape the load (see `loadgen.send_times`); the summary records
    them as "phase", "poisson" and "seed". A spec's own `lossless` overrides `drop` for its stream.
    """
    gen = LoadGenerator(host, port, specs, token=token, drop=drop, phase=phase, poisson=poisson, seed=seed,
                        connect_retries=connect_retries, tls=tls)
    poller = StatsPoller(host, api_port, token, tls)
    await gen.open()  # unreachable server: fail here, before any progress bar or /stats call
    try:
        before = await poller.fetch()
        aux = [asyncio.create_task(poller.sample_forever(gen.now))] if poller.url else []
        if progress:
            aux.append(asyncio.create_task(show_progress(gen, duration, desc)))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        loop = asyncio.get_running_loop()
        # Ctrl-C ends sending early but still collects replies and writes the report.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, gen.stop)
        try:
            result = await gen.run(duration, grace=grace, warmup=warmup)
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
            for t in aux:
                t.cancel()
            await asyncio.gather(*aux, return_exceptions=True)
        after = await poller.fetch()
    finally:
        await poller.aclose()
    # On a small machine the load generator competes with the server for cores: show how much.
    client_cpu = 100.0 * (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    summary = summarize(result)
    summary["client_cpu_percent"] = client_cpu
    summary["server_stats_before"] = before
    summary["server_stats_after"] = after
    summary["server_during"] = {"summary": sample_summary(poller.samples), "samples": poller.samples}
    return summary


async def run_phase(args: argparse.Namespace, specs: list[StreamSpec], duration: float, desc: str
                    ) -> dict[str, Any]:
    return await measure(
        args.host, args.port, specs, duration, api_port=args.api_port, token=args.token,
        warmup=args.warmup, grace=args.grace, drop=not args.lossless, phase=Phase(args.phase),
        poisson=args.poisson, seed=args.seed, connect_retries=args.connect_retries, progress=not args.quiet,
        desc=desc, tls=args.tls_context,
    )


def scaled(specs: list[StreamSpec], scale: float) -> list[StreamSpec]:
    return [dataclasses.replace(s, fps=s.fps * scale) for s in specs]


async def run_ramp(args: argparse.Namespace, specs: list[StreamSpec]) -> dict[str, Any]:
    base_total = sum(s.fps for s in specs)
    steps: list[dict[str, Any]] = []
    ramp: dict[str, Any] = {}
    for k in range(args.ramp_steps):
        add = args.ramp_add
        scale = (base_total + k * add) / base_total if add is not None else args.ramp_factor**k
        step_specs = scaled(specs, scale)
        total = sum(s.fps for s in step_specs)
        summary = await run_phase(args, step_specs, args.step_duration, f"step {k + 1} {total:.0f} fps")
        steps.append(summary)
        ramp = ramp_summary(steps, args.ramp_gain)
        if not args.quiet:
            lat = summary["latency_ms"]
            print(f"step {k + 1}: offered {total:7.1f} fps  achieved {summary['achieved_fps']:7.1f} fps  "
                  f"p95 {lat['p95'] or 0:7.1f} ms  dropped {summary['dropped']}", file=sys.stderr)
        if ramp["saturated"] or summary["interrupted"]:
            break
    ramp["step_summaries"] = steps
    return ramp


def ramp_text(ramp: dict[str, Any]) -> str:
    lines = ["ramp        offered -> achieved fps, latency p50/p95/p99 ms"]
    for i, s in enumerate(ramp["steps"]):
        lat = s["latency_ms"]
        mark = "  <- knee" if i == ramp["knee_step"] else ""
        lines.append(f"  {s['offered_fps']:8.1f} -> {s['achieved_fps']:7.1f}   "
                     f"{lat['p50'] or 0:6.1f} / {lat['p95'] or 0:6.1f} / {lat['p99'] or 0:6.1f}{mark}")
    if ramp["saturated"]:
        k = ramp["knee"]
        lines.append(f"saturation  knee at {k['achieved_fps']:.1f} fps achieved "
                     f"(offered {k['offered_fps']:.1f}), "
                     f"latency p50 {k['latency_ms']['p50']:.1f} ms, p95 {k['latency_ms']['p95']:.1f} ms, "
                     f"p99 {k['latency_ms']['p99']:.1f} ms; best seen {ramp['max_achieved_fps']:.1f} fps")
    else:
        lines.append(f"saturation  not reached: throughput still grew at the last step "
                     f"({ramp['max_achieved_fps']:.1f} fps); raise --ramp-steps or --ramp-factor")
    return "\n".join(lines)


def ramp_plot_input(ramp: dict[str, Any]) -> dict[str, Any]:
    """One timeline across all ramp steps, with per-stream bars from the knee (or last) step."""
    steps = ramp["step_summaries"]
    knee = ramp["knee_step"]
    focus = steps[knee] if knee is not None else steps[-1]
    rows: list[dict[str, Any]] = []
    starts: list[float] = []
    offset = 0.0
    for s in steps:
        n = max(round(s["send_window_s"]), 1)
        starts.append(offset)
        rows.extend({**r, "t": r["t"] + offset} for r in s["per_second"][:n])
        offset += n
    which = f"knee step {knee + 1}" if knee is not None else f"last step {len(steps)}"
    return {**focus, "per_second": rows, "send_window_s": offset, "step_starts": starts,
            "step_offered": [s["offered_fps"] for s in steps],
            "timeline_title": f"Throughput over {len(steps)} ramp steps of "
                              f"{steps[0]['duration_s']:g} s (grace periods left out)",
            "streams_title": f"Per-stream fps at the {which}"}


# --------------------------------------------------------------------------- main


def config_dict(args: argparse.Namespace, specs: list[StreamSpec]) -> dict[str, Any]:
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
           if k not in ("size_wh", "tls_context")}
    cfg.pop("token", None)  # a secret does not belong in a results file
    cfg["token_set"] = args.token is not None
    cfg["stream_rates"] = [s.fps for s in specs]
    cfg["frames"] = sorted({f"{s.payload.label} {s.payload.shape[1]}x{s.payload.shape[0]} "
                            f"{s.payload.encoding} {len(s.payload.data)} B" for s in specs})
    return cfg


async def amain(args: argparse.Namespace) -> int:
    try:
        payloads = prepare_payloads(image=args.image, size=args.size_wh, synthetic=args.synthetic,
                                    encoding=args.encoding, quality=args.jpeg_quality)
    except (FileNotFoundError, ValueError) as exc:
        raise ClientError(f"no frames to send: {exc}") from exc
    specs = stream_specs(args, payloads)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"tool": PROG, "config": config_dict(args, specs)}
    if args.ramp:
        ramp = await run_ramp(args, specs)
        report["ramp"] = ramp
        text = ramp_text(ramp)
        plot_input, title = ramp_plot_input(ramp), f"{PROG} --ramp: {len(specs)} streams"
    else:
        summary = await run_phase(args, specs, args.duration, "load")
        report["summary"] = summary
        text = format_summary(summary, summary["server_stats_before"], summary["server_stats_after"])
        during = summary["server_during"]["summary"]
        if during.get("count"):
            text += "\nserver under load (mean/max): " + ", ".join(
                f"{k} {v['mean']:.1f}/{v['max']:.1f}" for k, v in during.items() if isinstance(v, dict))
        plot_input, title = summary, ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"stress-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(text)
    print(f"report  {json_path}")
    if not args.no_plot:
        from visionstream.loadtest.plots import plot_summary

        png = plot_summary(plot_input, json_path.with_suffix(".png"),
                           title=title or f"{PROG}: {len(specs)} streams, "
                                          f"{sum(s.fps for s in specs):.0f} fps offered",
                           ramp=report.get("ramp"))
        print(f"chart   {png}")
    summaries = report["ramp"]["step_summaries"] if args.ramp else [report["summary"]]
    if any(x["interrupted"] for x in summaries):
        print(f"{PROG}: interrupted: the report covers the part that ran", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        args.tls_context = tls_context(args)
        return asyncio.run(amain(args))
    except ClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130

