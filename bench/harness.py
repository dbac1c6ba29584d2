"""`python -m bench`: two physical references, then one server under a matrix of load scenarios.

1. The raw ultralytics `predict()` loop and the model alone (bare OpenVINO infer requests), each in
   its own process before any server starts.
2. One `server.py` (default flags) on free ports. First the capacity scenario saturates it; every
   other scenario's load is a fraction of the capacity measured there.
3. One row per scenario (offered, achieved, the worst stream's fraction of its max-min fair share,
   p50/p99, the worst p99 ÷ its bound, drops by reason, unanswered), then one PASS/FAIL line per
   target, and every number as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from visionstream.cli.common import HelpFormatter
from visionstream.cli.stress import measure
from visionstream.client.connection import ClientError
from visionstream.loadtest.loadgen import FramePayload, Phase, StreamSpec, asset_path, parse_size, prepare_payloads
from visionstream.loadtest.report import fair_share_fractions, p99_bound_ms
from visionstream.loadtest.serverproc import COCO_MODEL, ROOT, ServerStartError, start_server

DEFAULT_MODEL = COCO_MODEL  # in $VISIONSTREAM_MODELS, ../shared/models beside the checkout by default
PYTORCH_MODEL = "yolov8n.yaml"  # the exact YOLOv8n graph with random weights: same compute, no download

MIX = (5.0, 20.0, 60.0, 150.0)  # relative rates of the mixed scenarios, repeated over the streams
HEAVY_SIDE = 4096  # the decode-heavy stream sends an all-zero PNG this many pixels square: the most --max-pixels admits
HEAVY_FPS = 2.0
CAPACITY_STREAMS = 8
# The capacity scenario offers this multiple of the model alone's throughput, which the server
# cannot exceed, or, without that reference, this multiple of the raw predict() loop's.
CAPACITY_OVER_ALONE = 1.5
CAPACITY_OVER_RAW = 3.0
LOSSLESS_FPS = 1.0  # nominal rate of a lossless stream, x capacity: it sends as fast as it is let
INFERENCES_IN_BOUND = 3.0  # p99 bound = min(period, one fair turn) + this many inference times
HEAVY_P99_MS = 100.0
BUSY_PERCENT = 15.0

ROLE_TAG = {"camera": "", "lossless": "-lossless", "heavy": f"-png{HEAVY_SIDE}"}
# Streams the p99 bound does not apply to: it is a real-time camera's promise.
P99_EXEMPT = {
    "lossless": "lossless: its frames wait in the socket by design (backpressure), never dropped",
    "heavy": f"decode-heavy: one {HEAVY_SIDE}x{HEAVY_SIDE} decode alone takes longer than the bound",
}


class BenchError(RuntimeError):
    """A phase could not run at all (not a missed target): one line for the user."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One load: `streams` connections, their phase policy and rates, and special streams by index.

    The real-time cameras share `load` x the measured server capacity in proportion to `mix`
    (repeated over them); a lossless stream (a folder upload) asks for the whole capacity and sends
    as fast as backpressure lets it; a heavy stream sends the HEAVY_SIDE-square PNG at HEAVY_FPS.
    """

    name: str
    streams: int
    load: float  # the real-time cameras' total offered fps ÷ server capacity
    phase: Phase = Phase.STAGGER
    poisson: bool = False
    mix: tuple[float, ...] = (1.0,)
    lossless: tuple[int, ...] = ()
    heavy: tuple[int, ...] = ()
    about: str = ""
    total_fps: float | None = None  # a fixed total instead of load x capacity (the capacity scenario)

    def role(self, i: int) -> str:
        return "lossless" if i in self.lossless else "heavy" if i in self.heavy else "camera"

    @property
    def roles(self) -> list[str]:
        return [self.role(i) for i in range(self.streams)]

    @property
    def overloaded(self) -> bool:
        """Offered more frames than the server can answer, so throughput should stay at capacity.
        A decode-heavy scenario spends its workers on decoding: its frame rate is not comparable."""
        return (self.total_fps is not None or self.load > 1.0) and not self.heavy

    def rates(self, capacity: float) -> list[float]:
        cams = [i for i in range(self.streams) if self.role(i) == "camera"]
        weights = [self.mix[j % len(self.mix)] for j in range(len(cams))]
        total = self.total_fps if self.total_fps is not None else self.load * capacity
        rates = [0.0] * self.streams
        for i, w in zip(cams, weights):
            rates[i] = total * w / sum(weights)
        for i in self.lossless:
            rates[i] = LOSSLESS_FPS * capacity
        for i in self.heavy:
            rates[i] = HEAVY_FPS
        return rates

    def plan(self, capacity: float) -> dict[str, Any]:
        return {"phase": self.phase.value, "poisson": self.poisson, "streams": self.streams, "load": self.load,
                "mix": list(self.mix), "lossless": list(self.lossless), "heavy": list(self.heavy),
                "roles": self.roles, "rates": self.rates(capacity), "about": self.about}


def _eq(phase: Phase, n: int, load: float, poisson: bool = False) -> Scenario:
    shape = "Poisson gaps, random phases" if poisson else f"{phase.value} phases"
    name = f"{'poisson' if poisson else phase.value}-{n}-{round(load * 100)}"
    return Scenario(name, n, load, phase, poisson, about=f"{n} equal cameras, {shape}, {load * 100:.0f} % of capacity")


MIX_TEXT = "/".join(f"{m:g}" for m in MIX)
SCENARIOS: tuple[Scenario, ...] = (
    _eq(Phase.STAGGER, 8, 0.5),
    _eq(Phase.STAGGER, 8, 1.0),
    _eq(Phase.STAGGER, 8, 2.0),
    _eq(Phase.LOCKSTEP, 8, 2.0),
    _eq(Phase.LOCKSTEP, 32, 2.0),
    _eq(Phase.LOCKSTEP, 64, 2.0),
    _eq(Phase.LOCKSTEP, 32, 0.5),
    _eq(Phase.RANDOM, 8, 2.0),
    _eq(Phase.RANDOM, 32, 2.0),
    _eq(Phase.RANDOM, 64, 2.0),
    _eq(Phase.RANDOM, 8, 1.0, poisson=True),
    _eq(Phase.RANDOM, 32, 2.0, poisson=True),
    Scenario("mix-random-200", 8, 2.0, Phase.RANDOM, mix=MIX,
             about=f"8 cameras at rates in the ratio {MIX_TEXT} (twice), random phases, 200 % of capacity"),
    Scenario("mix-poisson-100", 8, 1.0, Phase.RANDOM, poisson=True, mix=MIX,
             about=f"8 cameras at rates in the ratio {MIX_TEXT} (twice), Poisson gaps, 100 % of capacity"),
    Scenario("lossless-200", 8, 2.0, lossless=(0,),
             about="a lossless folder-like stream (as fast as backpressure allows) beside 7 cameras at "
                   "200 % of capacity, staggered"),
    Scenario("heavy-80", 5, 0.8, heavy=(0,),
             about=f"one stream of an {HEAVY_SIDE}x{HEAVY_SIDE} PNG at {HEAVY_FPS:g} fps beside 4 cameras at "
                   "80 % of capacity, staggered"),
)
CAPACITY_NAME = "capacity"
STAGGER_200, STAGGER_50 = "stagger-8-200", "stagger-8-50"


def capacity_scenario(offered_fps: float, prefix: str = "") -> Scenario:
    return Scenario(prefix + CAPACITY_NAME, CAPACITY_STREAMS, 0.0, total_fps=offered_fps,
                    about=f"{CAPACITY_STREAMS} staggered cameras offered {offered_fps:.0f} fps: saturates the "
                          "server, whose achieved fps is then the capacity every other load is relative to")


def select_scenarios(spec: str) -> list[Scenario]:
    """The scenarios matching a comma list of names or globs ('all' or '*': every one), in matrix order."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns or patterns == ["all"]:
        return list(SCENARIOS)
    names = [s.name for s in SCENARIOS]
    for p in patterns:
        if p != CAPACITY_NAME and not fnmatch.filter(names, p):
            raise ValueError(f"no scenario matches {p!r} (see --list)")
    return [s for s in SCENARIOS if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def list_text() -> str:
    lines = [f"{CAPACITY_NAME:<18}{CAPACITY_STREAMS} staggered cameras offered 1.5x the model alone's fps "
             "(3x raw without it; doubled and run again if not saturated): measures the capacity; always runs first "
             "unless --capacity is given"]
    lines += [f"{s.name:<18}{s.about}" for s in SCENARIOS]
    return "\n".join(lines)


def heavy_payload() -> FramePayload:
    """The decode-heavy frame: an all-zero PNG at the default --max-pixels (about 60 KB, about 0.35 s to decode)."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.zeros((HEAVY_SIDE, HEAVY_SIDE, 3), np.uint8))
    if not ok:
        raise BenchError("PNG encoding of the decode-heavy frame failed")
    return FramePayload(f"zeros-{HEAVY_SIDE}x{HEAVY_SIDE}.png", buf.tobytes(), "png", (HEAVY_SIDE, HEAVY_SIDE, 3))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure, on this machine and in one run: the raw ultralytics predict() loop and the "
        "model alone (bare OpenVINO infer requests at the server's input shape), each in its own process "
        "before the server starts; then one real server (default flags, free ports) under a matrix of "
        "load scenarios (phases stagger/lockstep/random/Poisson, 8-64 streams, equal and mixed rates, "
        "50-200 % load, a lossless stream, a decode-heavy stream). Loads are relative to the server's "
        "CAPACITY, measured first by the saturating 'capacity' scenario (8 staggered cameras offered 1.5x "
        "the model alone's fps; its achieved fps; run again at twice the offer if it did not saturate), "
        "not to the raw predict() rate. Prints one row per scenario and one PASS/FAIL line per target, and writes "
        "every number as JSON. --list shows the scenarios.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model for the references and the server: the OpenVINO INT8 COCO model in "
                        "$VISIONSTREAM_MODELS, which defaults to ../shared/models beside the repo")
    p.add_argument("--imgsz", type=int, default=320, help="inference size for the references and the server")
    p.add_argument("--workers", type=int, default=None,
                   help="server --workers, also the model alone's parallel requests (unset: the server's default)")
    p.add_argument("--server-args", default="",
                   help="extra server.py arguments, one shell-quoted string, e.g. \"--threads 2\"")
    p.add_argument("--server", type=Path, default=None, metavar="SERVER_PY",
                   help="the server.py to measure (unset: this checkout's), e.g. an older checkout's, to compare "
                        "two versions under the same matrix")
    p.add_argument("--scenarios", default="all", metavar="NAMES",
                   help="comma list of scenario names or globs to run, e.g. 'stagger-*,heavy-80' "
                        "(the capacity scenario always runs first unless --capacity is given)")
    p.add_argument("--list", action="store_true", help="print the scenarios and exit")
    p.add_argument("--capacity", type=float, default=None, metavar="FPS",
                   help="take this as the server capacity instead of measuring it (skips the capacity scenario)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds of load per scenario")
    p.add_argument("--raw-duration", type=float, default=None,
                   help="seconds of timed predict() calls, and of each model-alone mode (unset: --duration)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="first seconds of each scenario left out of latency and throughput")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to wait for outstanding replies")
    p.add_argument("--seed", type=int, default=0, help="seed of the random phases and Poisson gaps")
    p.add_argument("--size", default="640x480", help="frame size WxH sent by every camera and fed to predict()")
    p.add_argument("--compare", action="store_true",
                   help=f"also measure the PyTorch path ({PYTORCH_MODEL}: raw loop, its server's capacity and "
                        f"{STAGGER_200} relative to it) and print the OpenVINO vs PyTorch throughput ratio")
    p.add_argument("--compare-model", default=PYTORCH_MODEL, help="model for --compare")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the results (unset: bench/out/bench-<timestamp>.json)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any measured target is missed")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or rows as scenarios finish (the table is printed at the end)")
    return p


# --------------------------------------------------------------------------- references


def machine_busy(interval: float = 1.0) -> float:
    """Machine-wide CPU use (% of all cores) over `interval` seconds, before anything of ours runs."""
    import psutil

    return psutil.cpu_percent(interval=interval)


def _run_module(module: str, args: list[str], workdir: Path, timeout: float, what: str) -> dict[str, Any]:
    """`python -m module args --out file` in a fresh interpreter, so nothing else here competes."""
    out = workdir / f"{module.rpartition('.')[2]}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def run_raw(model: str, imgsz: int, duration: float, size: str, workdir: Path) -> dict[str, Any]:
    """The raw predict() loop in its own process."""
    return _run_module("bench.raw", ["--model", model, "--imgsz", str(imgsz), "--duration", str(duration),
                                     "--size", size], workdir, duration + 300, f"raw predict() loop on {model}")


def is_openvino(model: str) -> bool:
    path = Path(model)
    return path.suffix == ".xml" or (path.is_dir() and any(path.glob("*.xml")))


def run_model_alone(model: str, imgsz: int, duration: float, size: str, workers: int | None,
                    workdir: Path) -> dict[str, Any]:
    """Bare OpenVINO infer requests on the server's compiled graph, in its own process."""
    if workers is None:
        from visionstream.server.config import ServerConfig

        workers = ServerConfig().workers
    return _run_module("bench.model_alone", ["--model", model, "--imgsz", str(imgsz), "--duration", str(duration),
                                             "--size", size, "--workers", str(workers)],
                       workdir, 2 * duration + 300, f"model alone on {model}")


def describe_raw(label: str, raw: dict[str, Any]) -> str:
    return (f"raw predict() {label}: {raw['fps']:.1f} fps, one inference {raw['infer_ms_median']:.2f} ms "
            f"(median of {raw['calls']} calls on {raw['frame']}, imgsz {raw['imgsz']}; "
            f"ultralytics' own split {raw['ultralytics_speed_ms']})")


def describe_alone(label: str, alone: dict[str, Any]) -> str:
    lanes, asyn = alone["modes"]["lanes"], alone["modes"]["async"]
    shape = "x".join(str(d) for d in alone["input"]["shape_nhwc"])
    return (f"model alone {label}: {alone['fps']:.1f} fps ({alone['best_mode']}; input {shape} uint8 BGR, "
            f"conversion in the graph as in the server, no pre/post-processing; lanes: {lanes['requests']} "
            f"requests on {lanes['streams']} streams x {lanes['inference_threads'] // max(lanes['streams'], 1)} "
            f"thread {lanes['fps']:.1f} fps, {lanes['infer_ms_median']:.2f} ms each; async: THROUGHPUT hint, "
            f"{asyn['requests']} requests {asyn['fps']:.1f} fps)")


# --------------------------------------------------------------------------- one scenario


def stream_name(sc: Scenario, i: int) -> str:
    return f"{sc.name}-{i:02d}{ROLE_TAG[sc.role(i)]}"


def short(sc_name: str, stream: str | None) -> str:
    """A stream's name without its scenario's: '#03', '#00-png8k'."""
    return "-" if stream is None else "#" + stream.removeprefix(sc_name + "-")


def pooled_costs(per: Sequence[dict[str, Any]], labels: Sequence[str]) -> tuple[list[float], list[bool]]:
    """Each stream's cost: the mean lane time (decode + infer ms) of a frame of its payload, pooled
    over every stream of the scenario sending that payload, and whether it had to be estimated.

    Cost is a property of the frame, not of the stream: identical frames take different times only
    by what else happened to run beside them (a camera whose frames kept landing next to an 8192x8192
    decode measured 69 ms a frame where its twins measured 23). Pooled, that noise counts against
    no one stream. A payload with no result in the window gets the scenario's mean over all frames
    (its streams' fractions are 0 whatever the cost); with no result at all, 1 ms.
    """
    served: dict[str, int] = {}
    work: dict[str, float] = {}
    for p, label in zip(per, labels):
        served[label] = served.get(label, 0) + p["served"]
        work[label] = work.get(label, 0.0) + p["worker_ms_served"]
    total_n, total_w = sum(served.values()), sum(work.values())
    fallback = total_w / total_n if total_n and total_w > 0 else 1.0
    costs = [work[lb] / served[lb] if served[lb] and work[lb] > 0 else fallback for lb in labels]
    return costs, [not (served[lb] and work[lb] > 0) for lb in labels]


def evaluate(name: str, roles: Sequence[str], labels: Sequence[str], summary: dict[str, Any],
             one_inf_ms: float) -> dict[str, Any]:
    """Per-stream fair-share fractions and p99 bounds of one scenario's `measure` summary; `labels`
    names each stream's payload."""
    per = summary["per_stream"]
    costs, estimated = pooled_costs(per, labels)
    demands = []
    for p, role in zip(per, roles):
        if role == "lossless":
            # A lossless stream sends as fast as the server reads (backpressure): what it managed to
            # send is set by the server, not by what it wants, so it is not its demand. Its demand is
            # its nominal rate, set at the server's whole capacity (it is backlogged the whole run):
            # it would take any share. Taking what it sent would give it a fraction of 1 by
            # construction and hide a starved upload.
            demands.append(max(p["offered_fps"], p["sent_fps"]))
        else:
            # A real-time camera demands the frames it actually put on the wire in the window.
            demands.append(p["sent_fps"])
    fair = fair_share_fractions(demands, [p["served_fps"] for p in per], costs)
    throughput = summary["achieved_fps"]
    streams = []
    for p, role, cost, f, est, demand in zip(per, roles, costs, fair, estimated, demands):
        p99 = p["latency_ms"]["p99"]
        bound = p99_bound_ms(p["offered_fps"], len(per), throughput, one_inf_ms, INFERENCES_IN_BOUND)
        streams.append({
            "name": p["name"], "role": role, "offered_fps": p["offered_fps"], "sent_fps": p["sent_fps"],
            "served_fps": p["served_fps"], "achieved_fps": p["achieved_fps"], "cost_ms": cost,
            "cost_estimated": est, "own_worker_ms_median": p.get("worker_ms_median"), "demand_fps": demand,
            "share_fps": f["share_fps"], "fair_fraction": f["fraction"], "p50_ms": p["latency_ms"]["p50"],
            "p99_ms": p99,
            "p99_bound_ms": bound, "p99_ratio": None if p99 is None else p99 / bound,
            "p99_exempt": P99_EXEMPT.get(role), "dropped": p["dropped"], "unanswered": p["unanswered"],
            "first_sent_s": p.get("first_sent_s"),
        })
    rated = [s for s in streams if s["fair_fraction"] is not None]
    worst_fair = min(rated, key=lambda s: s["fair_fraction"], default=None)
    bounded = [s for s in streams if s["p99_ratio"] is not None and not s["p99_exempt"]]
    worst_p99 = max(bounded, key=lambda s: s["p99_ratio"], default=None)
    lat = summary["latency_ms"]
    return {
        "name": name,
        "offered_fps": summary["offered_fps"], "achieved_fps": throughput,
        "served_fps": sum(s["served_fps"] for s in streams),
        "p50_ms": lat["p50"], "p99_ms": lat["p99"],
        "worst_fair": {"stream": worst_fair and worst_fair["name"],
                       "fraction": worst_fair and worst_fair["fair_fraction"]},
        "worst_p99_bound": {"stream": worst_p99 and worst_p99["name"], "ratio": worst_p99 and worst_p99["p99_ratio"],
                            "p99_ms": worst_p99 and worst_p99["p99_ms"],
                            "bound_ms": worst_p99 and worst_p99["p99_bound_ms"]},
        "unresolved_p99": [s["name"] for s in streams if s["p99_ratio"] is None and not s["p99_exempt"]],
        "dropped": summary["dropped"], "drops_by_reason": summary["drops_by_reason"],
        "unanswered": summary["unanswered"],
        "per_stream": streams,
    }


async def run_scenario(server: Any, sc: Scenario, capacity: float, payloads: list[FramePayload],
                       heavy: FramePayload | None, args: argparse.Namespace, one_inf_ms: float) -> dict[str, Any]:
    rates = sc.rates(capacity)
    specs = []
    for i, rate in enumerate(rates):
        role = sc.role(i)
        payload = heavy if role == "heavy" else payloads[i % len(payloads)]
        assert payload is not None
        specs.append(StreamSpec(stream_name(sc, i), rate, payload, lossless=role == "lossless"))
    labels = [s.payload.label for s in specs]
    summary = await measure(
        server.host, server.tcp_port, specs, args.duration, api_port=server.api_port, warmup=args.warmup,
        grace=args.grace, phase=sc.phase, poisson=sc.poisson, seed=args.seed, progress=not args.quiet,
        desc=sc.name,
    )
    row = evaluate(sc.name, sc.roles, labels, summary, one_inf_ms)
    load = summary["offered_fps"] / capacity if capacity > 0 else None
    return {**row, "about": sc.about, "overloaded": sc.overloaded, "load_of_capacity": load,
            "plan": sc.plan(capacity), "summary": summary}


# --------------------------------------------------------------------------- the table


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def drops_text(drops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "-"


ROW_HEADER = (f"{'scenario':<18}{'offered':>8}{'achieved':>9}{'fair':>6} {'(worst)':<11}{'p50':>7}{'p99':>7}"
              f"{'p99/bnd':>8} {'(worst)':<11}{'unans':>6}  drops by reason   (fps, ms end-to-end)")


def row_line(r: dict[str, Any]) -> str:
    wf, wp = r["worst_fair"], r["worst_p99_bound"]
    return (f"{r['name']:<18}{r['offered_fps']:>8.1f}{r['achieved_fps']:>9.1f}{_ratio(wf['fraction']):>6} "
            f"{short(r['name'], wf['stream']):<11}{_ms(r['p50_ms']):>7}{_ms(r['p99_ms']):>7}"
            f"{_ratio(wp['ratio']):>8} {short(r['name'], wp['stream']):<11}{r['unanswered']:>6}  "
            f"{drops_text(r['drops_by_reason'])}")


def others_cpu(s: dict[str, Any]) -> float | None:
    """CPU (% of one core) used by processes other than the server and this load generator.

    The server's /stats gives machine-wide CPU (% of all cores) and its own process CPU; what
    neither it nor the client used was taken by something else, which skews every number.
    """
    during = s.get("server_during", {}).get("summary", {})
    if "cpu" not in during or "process_cpu" not in during:
        return None
    total = during["cpu"]["mean"] * (os.cpu_count() or 1)
    return max(0.0, total - during["process_cpu"]["mean"] - s.get("client_cpu_percent", 0.0))


def server_line(name: str, s: dict[str, Any]) -> str | None:
    during = s.get("server_during", {}).get("summary", {})
    if not during.get("count"):
        return None
    parts = [f"{k} {v['mean']:.1f} (max {v['max']:.1f})" for k, v in during.items() if isinstance(v, dict)]
    parts.append(f"load generator cpu {s.get('client_cpu_percent', 0.0):.0f}")
    other = others_cpu(s)
    if other is not None:
        parts.append(f"other processes cpu ~{other:.0f}")
    timings = s.get("server_timings_ms", {})
    stage = ", ".join(f"{k.removesuffix('_ms')} p50 {v['p50']:.1f}" for k, v in timings.items()
                      if v.get("p50") is not None)
    return f"  server during {name}: " + ", ".join(parts) + (f"; ms {stage}" if stage else "")


# --------------------------------------------------------------------------- one server, many scenarios


SATURATED = 0.95  # the capacity scenario counts as saturated when answered below this share of its offer
CAPACITY_TRIES = 3  # an unsaturated capacity scenario is run again at twice the offer, at most this often


async def measure_capacity(one: Any, offered: float, prefix: str) -> dict[str, Any]:
    """Run the capacity scenario until it saturates the server (each retry offers twice as much): the
    references that size its offer were measured in other processes and can be off."""
    attempts = []
    for attempt in range(CAPACITY_TRIES):
        row = await one(capacity_scenario(offered, prefix), 0.0)
        fps = row["achieved_fps"]
        if fps <= 0:
            raise BenchError(f"the {row['name']} scenario got no results: the server answered nothing")
        row["load_of_capacity"] = row["offered_fps"] / fps
        saturated = fps < SATURATED * row["offered_fps"]
        attempts.append({"offered_fps": row["offered_fps"], "achieved_fps": fps, "saturated": saturated})
        if saturated or attempt == CAPACITY_TRIES - 1:
            break
        # Kept as a row of its own, but not the capacity, and not overloaded after all.
        row["name"] += f"-try{attempt + 1}"
        row["overloaded"] = False
        print(f"  note: {row['name']} answered {fps:.1f} of {row['offered_fps']:.1f} fps offered, not saturated: "
              f"offering {2 * offered:.1f}", flush=True)
        offered *= 2
    if not saturated:
        print(f"  WARNING: {row['name']} answered {fps:.1f} of {row['offered_fps']:.1f} fps offered: still not "
              "saturated, the capacity is a lower bound", flush=True)
    return {"fps": fps, "source": "measured", "scenario": row["name"], "offered_fps": row["offered_fps"],
            "saturated": saturated, "attempts": attempts}


async def run_matrix(model: str, args: argparse.Namespace, workdir: Path, scenarios: Sequence[Scenario],
                     capacity_offered: float | None, one_inf_ms: float, prefix: str = "") -> dict[str, Any]:
    """One server process for all `scenarios`: the capacity scenario first (unless `capacity_offered`
    is None and --capacity gave it), then each scenario at its load relative to that capacity."""
    payloads = prepare_payloads(size=parse_size(args.size))
    heavy = heavy_payload() if any(sc.heavy for sc in scenarios) else None
    rows: list[dict[str, Any]] = []
    try:
        with start_server(workdir, model=model, imgsz=args.imgsz, workers=args.workers,
                          extra=shlex.split(args.server_args), script=args.server) as server:
            if not args.quiet:
                print(f"server {model} up on tcp {server.tcp_port} / http {server.api_port}", flush=True)
                print(ROW_HEADER, flush=True)

            async def one(sc: Scenario, capacity: float) -> dict[str, Any]:
                row = await run_scenario(server, sc, capacity, payloads, heavy, args, one_inf_ms)
                rows.append(row)
                if not args.quiet:
                    print(row_line(row), flush=True)
                return row

            if capacity_offered is not None:
                cap = await measure_capacity(one, capacity_offered, prefix)
                capacity = cap["fps"]
            else:
                capacity = args.capacity
                cap = {"fps": capacity, "source": "given (--capacity)", "scenario": None}
            for sc in scenarios:
                if prefix:
                    sc = replace(sc, name=prefix + sc.name)
                await one(sc, capacity)
            log_tail = server.log_tail(10)
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc
    except ClientError as exc:
        raise BenchError(f"load generator could not talk to the server: {exc}") from exc
    return {"model": model, "capacity": cap, "scenarios": rows, "server_log_tail": log_tail}


# --------------------------------------------------------------------------- targets


@dataclass
class Check:
    name: str
    value: float | None
    op: str  # ">=", "<=", "<" or "=="
    target: float
    unit: str = ""
    detail: str = ""
    skipped: str | None = None  # why it was not measured (its scenario not selected, no reference)

    @property
    def passed(self) -> bool:
        if self.value is None or self.skipped:
            return False
        return {">=": self.value >= self.target, "<=": self.value <= self.target, "<": self.value < self.target,
                "==": self.value == self.target}[self.op]

    def line(self) -> str:
        op = {">=": "≥", "<=": "≤", "<": "<", "==": "="}[self.op]
        target = f"(target {op} {self.target:g}{self.unit})"
        if self.skipped:
            return f"SKIP  {self.name} {target}: {self.skipped}"
        shown = "n/a" if self.value is None else (f"{self.value:g}" if self.op == "==" else f"{self.value:.2f}")
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name} = {shown}{self.unit} {target}"
                + (f": {self.detail}" if self.detail else ""))


def _skip(name: str, op: str, target: float, why: str, unit: str = "") -> Check:
    return Check(name, None, op, target, unit, skipped=why)


def build_checks(raw: dict[str, Any], alone: dict[str, Any] | None, rows: list[dict[str, Any]],
                 compare: dict[str, Any] | None = None) -> list[Check]:
    """One Check per target, in a fixed order; a target whose scenario did not run is skipped."""
    one_inf = raw["infer_ms_median"]
    by = {r["name"]: r for r in rows}
    best = max(rows, key=lambda r: r["achieved_fps"])
    bfps = best["achieved_fps"]
    checks: list[Check] = []

    name = "throughput: every overloaded scenario ÷ the best scenario"
    over = [r for r in rows if r["overloaded"]]
    if over and bfps > 0:
        w = min(over, key=lambda r: r["achieved_fps"])
        checks.append(Check(name, w["achieved_fps"] / bfps, ">=", 0.9,
                            detail=f"worst {w['name']} {w['achieved_fps']:.1f} fps, best {best['name']} {bfps:.1f}"))
    else:
        checks.append(_skip(name, ">=", 0.9, "no overloaded scenario ran"))

    name = "max-min fair share: worst stream's fraction, every scenario"
    rated = [r for r in rows if r["worst_fair"]["fraction"] is not None]
    if rated:
        w = min(rated, key=lambda r: r["worst_fair"]["fraction"])
        checks.append(Check(name, w["worst_fair"]["fraction"], ">=", 0.9,
                            detail=f"{w['name']} {short(w['name'], w['worst_fair']['stream'])}"))
    else:
        checks.append(Check(name, None, ">=", 0.9, detail="no stream had a demand"))

    heavy_rows = [r for r in rows if "heavy" in r["plan"]["roles"]]
    cams = [(r, s) for r in heavy_rows for s in r["per_stream"] if s["role"] == "camera"]
    n_fair, n_p99 = "decode-heavy: worst camera's fraction of its fair share", "decode-heavy: worst camera's p99"
    if cams:
        fr = [(r, s) for r, s in cams if s["fair_fraction"] is not None]
        w = min(fr, key=lambda rs: rs[1]["fair_fraction"], default=None)
        if w is None:
            checks.append(Check(n_fair, None, ">=", 0.9, detail="no camera had a demand"))
        else:
            checks.append(Check(n_fair, w[1]["fair_fraction"], ">=", 0.9,
                                detail=f"{w[0]['name']} {short(w[0]['name'], w[1]['name'])}"))
        p99s = [(r, s) for r, s in cams if s["p99_ms"] is not None]
        w = max(p99s, key=lambda rs: rs[1]["p99_ms"], default=None)
        missing = len(p99s) < len(cams)
        checks.append(Check(n_p99, None if w is None or missing else w[1]["p99_ms"], "<", HEAVY_P99_MS, " ms",
                            detail="a camera got no result" if missing
                            else f"{w[0]['name']} {short(w[0]['name'], w[1]['name'])}"))
    else:
        checks.append(_skip(n_fair, ">=", 0.9, "no decode-heavy scenario ran"))
        checks.append(_skip(n_p99, "<", HEAVY_P99_MS, "no decode-heavy scenario ran", " ms"))

    name = (f"p99 ÷ (min(frame period, streams ÷ throughput) + {INFERENCES_IN_BOUND:g} inferences), "
            "worst stream of every scenario")
    bounded = [r for r in rows if r["worst_p99_bound"]["ratio"] is not None]
    unresolved = [f"{r['name']} {short(r['name'], s)}" for r in rows for s in r["unresolved_p99"]]
    if bounded:
        w = max(bounded, key=lambda r: r["worst_p99_bound"]["ratio"])
        wp = w["worst_p99_bound"]
        detail = (f"{w['name']} {short(w['name'], wp['stream'])} p99 {wp['p99_ms']:.1f} ms, "
                  f"bound {wp['bound_ms']:.1f} ms")
        if unresolved:
            detail += f"; no result at all: {', '.join(unresolved[:3])}"
        checks.append(Check(name, None if unresolved else wp["ratio"], "<=", 1.0, detail=detail))
    else:
        checks.append(Check(name, None, "<=", 1.0, detail="no stream with a p99"))

    checks.append(Check("best throughput ÷ raw predict() loop", bfps / raw["fps"], ">=", 1.5,
                        detail=f"{best['name']} {bfps:.1f} fps, raw {raw['fps']:.1f}"))
    name = "best throughput ÷ the model alone"
    if alone is not None:
        checks.append(Check(name, bfps / alone["fps"], ">=", 0.85,
                            detail=f"{best['name']} {bfps:.1f} fps, model alone {alone['fps']:.1f}"))
    else:
        checks.append(_skip(name, ">=", 0.85, "no model-alone reference (not an OpenVINO export)"))

    name = f"p99 at 200 % staggered load ({STAGGER_200}) ÷ one inference"
    if STAGGER_200 in by:
        p99 = by[STAGGER_200]["p99_ms"]
        checks.append(Check(name, None if p99 is None else p99 / one_inf, "<=", 3.0))
    else:
        checks.append(_skip(name, "<=", 3.0, f"{STAGGER_200} not selected"))

    all_rows = rows + (compare["scenarios"] if compare else [])
    lost = [f"{r['name']} {r['unanswered']}" for r in all_rows if r["unanswered"]]
    checks.append(Check(f"frames unanswered, every scenario ({len(all_rows)})",
                        float(sum(r["unanswered"] for r in all_rows)), "==", 0, detail=", ".join(lost)))

    name = f"p50 at 50 % load ({STAGGER_50}) − one inference"
    if STAGGER_50 in by:
        p50 = by[STAGGER_50]["p50_ms"]
        checks.append(Check(name, None if p50 is None else p50 - one_inf, "<=", 5.0, " ms"))
    else:
        checks.append(_skip(name, "<=", 5.0, f"{STAGGER_50} not selected", " ms"))

    if compare is not None:
        name = f"OpenVINO ÷ PyTorch server throughput ({STAGGER_200}, each at its own capacity)"
        pt = next((r for r in compare["scenarios"] if r["name"].endswith(STAGGER_200)), None)
        if STAGGER_200 in by and pt is not None:
            ratio = by[STAGGER_200]["achieved_fps"] / pt["achieved_fps"] if pt["achieved_fps"] > 0 else None
            checks.append(Check(name, ratio, ">=", 3.0,
                                detail=f"{by[STAGGER_200]['achieved_fps']:.1f} vs {pt['achieved_fps']:.1f} fps"))
        else:
            checks.append(_skip(name, ">=", 3.0, f"{STAGGER_200} not selected"))
    return checks


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace, scenarios: list[Scenario]) -> int:
    model_path = Path(args.model)
    if not model_path.exists() and model_path.suffix not in (".yaml", ".yml"):
        print(f"SKIP: model {args.model} not found: set VISIONSTREAM_MODELS to the folder holding "
              f"yolov8n_int8_openvino_model (or pass --model)")
        return 0
    if not asset_path("bus.jpg").is_file():
        raise BenchError("ultralytics' bus.jpg is missing")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.json or ROOT / "bench" / "out" / f"bench-{stamp}.json"
    raw_duration = args.raw_duration if args.raw_duration is not None else args.duration
    report: dict[str, Any] = {
        "started_at": stamp,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_count": os.cpu_count(),
        "method": {
            "capacity": "achieved fps of the capacity scenario (8 staggered cameras offered "
                        f"{CAPACITY_OVER_ALONE:g}x the model alone's fps, or {CAPACITY_OVER_RAW:g}x the raw "
                        "predict() fps without it; offered twice as much again while answered at "
                        f"{SATURATED:.0%} or more of the offer); every other scenario's load is relative to it",
            "fair_share": "in worker time: cost = mean decode+infer ms of a frame of the stream's payload, "
                          "pooled over the scenario; demand = sent fps (lossless: nominal fps = capacity) x "
                          "cost; capacity = sum of served fps x cost; share = max-min water-fill; "
                          "fraction = served fps x cost / share",
            "p99_bound": f"min(1000 / offered fps, 1000 x streams / achieved fps) + {INFERENCES_IN_BOUND:g} x "
                         "raw predict() median ms; lossless and decode-heavy streams exempt",
            "one_inference": "median wall time of one raw predict() call",
        },
    }
    busy = machine_busy()
    report["cpu_busy_before_percent"] = busy
    if busy > BUSY_PERCENT:
        print(f"WARNING: this machine is already {busy:.0f} % busy (all cores) before the bench starts: "
              "other processes will make every number lower and noisier", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-bench-") as tmp:
        workdir = Path(tmp)
        # The references first, each in its own process, while no server is running.
        raw = run_raw(args.model, args.imgsz, raw_duration, args.size, workdir)
        print(describe_raw(model_path.name, raw), flush=True)
        report["raw"] = raw
        alone = None
        if is_openvino(args.model):
            alone = run_model_alone(args.model, args.imgsz, raw_duration, args.size, args.workers, workdir)
            print(describe_alone(model_path.name, alone), flush=True)
        report["model_alone"] = alone
        raw_cmp = None
        if args.compare:
            raw_cmp = run_raw(args.compare_model, args.imgsz, raw_duration, args.size, workdir)
            print(describe_raw(args.compare_model, raw_cmp), flush=True)
            report["raw_compare"] = raw_cmp
        offered = None
        if args.capacity is None:
            offered = CAPACITY_OVER_ALONE * alone["fps"] if alone else CAPACITY_OVER_RAW * raw["fps"]
        one_inf = raw["infer_ms_median"]
        run = await run_matrix(args.model, args, workdir / "server", scenarios, offered, one_inf)
        report["capacity"] = run["capacity"]
        report["scenarios"] = run["scenarios"]
        report["server_log_tail"] = run["server_log_tail"]
        compare = None
        if raw_cmp is not None:
            pt_scenarios = [s for s in SCENARIOS if s.name == STAGGER_200]
            compare = await run_matrix(args.compare_model, args, workdir / "server-compare", pt_scenarios,
                                       CAPACITY_OVER_RAW * raw_cmp["fps"], raw_cmp["infer_ms_median"], prefix="pt-")
            report["compare"] = compare
    rows = run["scenarios"]
    checks = build_checks(raw, alone, rows, compare)
    report["checks"] = [asdict(c) | {"passed": c.passed} for c in checks]

    print()
    if args.quiet:  # otherwise each row was printed as its scenario finished
        print(ROW_HEADER)
        for r in rows:
            print(row_line(r))
    if compare is not None:
        for r in compare["scenarios"]:
            print(row_line(r) + f"   ({args.compare_model})")
    for r in rows:
        line = server_line(r["name"], r["summary"])
        if line:
            print(line)
        r["others_cpu_percent"] = others_cpu(r["summary"])
        if (r["others_cpu_percent"] or 0.0) > BUSY_PERCENT:
            print(f"  WARNING: other processes took ~{r['others_cpu_percent']:.0f} % of a core during {r['name']}: "
                  "its numbers are not this server's alone")
    cap = run["capacity"]
    print()
    print(f"capacity {cap['fps']:.1f} fps ({cap['source']}); one inference = raw predict() median "
          f"{one_inf:.2f} ms; raw {raw['fps']:.1f} fps" + (f"; model alone {alone['fps']:.1f} fps" if alone else ""))
    print("fair = the worst stream's served worker time ÷ its max-min fair share; p99/bnd = the worst "
          f"camera's p99 ÷ (min(its period, streams ÷ throughput) + {INFERENCES_IN_BOUND:g} inferences)")
    print()
    print("targets")
    for c in checks:
        print(c.line())
    if raw_cmp is not None:
        print(f"INFO  OpenVINO ÷ PyTorch raw predict() throughput = {raw['fps'] / raw_cmp['fps']:.2f}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"results {json_path}")
    return 1 if args.strict and any(not c.passed and not c.skipped for c in checks) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    if args.duration <= 0 or args.warmup < 0 or args.warmup >= args.duration:
        parser.error("--duration must be > 0 and --warmup within [0, duration)")
    if args.capacity is not None and not args.capacity > 0:
        parser.error("--capacity must be > 0")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    try:
        parse_size(args.size)
        scenarios = select_scenarios(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    if not scenarios and args.capacity is not None:
        parser.error("nothing to run: --capacity skips the capacity scenario and --scenarios selected no other")
    try:
        return asyncio.run(amain(args, scenarios))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130

