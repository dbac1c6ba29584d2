"""`python -m bench`: raw predict() ceiling, then the server at 50 % and 200 % of it plus a fairness scenario."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.serverproc import ROOT, ServerStartError, start_server
from visionstream.client import ClientError
from visionstream.loadgen import StreamSpec, asset_path, parse_size, prepare_payloads
from visionstream.report import jain_index
from visionstream.stress import HelpFormatter, measure

# One variable locates the shared weights; ../shared/models beside the checkout by default.
MODELS_DIR = Path(os.environ.get("VISIONSTREAM_MODELS", ROOT.parent / "shared" / "models")).resolve()
DEFAULT_MODEL = MODELS_DIR / "yolov8n_int8_openvino_model"
PYTORCH_MODEL = "yolov8n.yaml"  # the exact YOLOv8n graph with random weights: same compute, no download
SMALL_FPS = 2.0
SMALL_STREAMS = 7


class BenchError(RuntimeError):
    """A phase could not run at all (not a missed target): one line for the user."""


@dataclass
class Check:
    name: str
    value: float | None
    op: str  # ">=", "<=" or "=="
    target: float
    unit: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        if self.op == ">=":
            return self.value >= self.target
        if self.op == "<=":
            return self.value <= self.target
        return self.value == self.target

    def line(self) -> str:
        shown = "n/a" if self.value is None else (f"{self.value:g}" if self.op == "==" else f"{self.value:.2f}")
        op = {">=": "≥", "<=": "≤", "==": "="}[self.op]
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name} = {shown}{self.unit} (target {op} {self.target:g}" \
               f"{self.unit})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure, on this machine and in one run: the raw ultralytics predict() ceiling "
        "(in a subprocess, before the server starts, so they never share the CPU), then a real server "
        "(started on free ports) under the stress load at 50 % and 200 % of that ceiling and in an "
        "overloaded fairness scenario (one greedy stream beside seven 2 fps streams). Prints the "
        "target ratios as PASS/FAIL lines and writes every number as JSON.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model for both the raw loop and the server: the OpenVINO INT8 COCO model in "
                        "$VISIONSTREAM_MODELS, which defaults to ../shared/models beside the repo")
    p.add_argument("--imgsz", type=int, default=320, help="inference size for the raw loop and the server")
    p.add_argument("--workers", type=int, default=None, help="server --workers (unset: the server's own default)")
    p.add_argument("--server-args", default="",
                   help="extra server.py arguments, one shell-quoted string, e.g. \"--threads 2\"")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per server phase")
    p.add_argument("--raw-duration", type=float, default=None,
                   help="seconds of timed predict() calls (unset: --duration)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="first seconds of each phase left out of latency and throughput")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to wait for outstanding replies")
    p.add_argument("--streams", type=int, default=8, help="cameras in the 50 %% and 200 %% phases")
    p.add_argument("--size", default="640x480", help="frame size WxH sent by every camera and fed to predict()")
    p.add_argument("--greedy-fps", type=float, default=None,
                   help="rate of the greedy stream in the fairness phase (unset: 60 fps or twice the raw "
                        "ceiling, whichever is higher, so that phase really overloads the server)")
    p.add_argument("--compare", action="store_true",
                   help=f"also measure the PyTorch path ({PYTORCH_MODEL}: raw ceiling and the server at "
                        "200 %% of it) and print the OpenVINO vs PyTorch throughput ratio")
    p.add_argument("--compare-model", default=PYTORCH_MODEL, help="model for --compare")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the results (unset: bench/out/bench-<timestamp>.json)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or rows as phases finish (the table is printed at the end)")
    return p


# --------------------------------------------------------------------------- raw ceiling

BUSY_PERCENT = 15.0


def machine_busy(interval: float = 1.0) -> float:
    """Machine-wide CPU use (% of all cores) over `interval` seconds, before anything of ours runs."""
    import psutil

    return psutil.cpu_percent(interval=interval)



def run_raw(model: str, imgsz: int, duration: float, size: str, workdir: Path) -> dict[str, Any]:
    """The raw predict() loop in a fresh interpreter, so nothing else in this process competes."""
    out = workdir / f"raw-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "bench.raw", "--model", model, "--imgsz", str(imgsz),
           "--duration", str(duration), "--size", size, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=duration + 300)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BenchError(f"raw predict() loop on {model} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- server phases


def phase_plan(ceiling_fps: float, streams: int, greedy_fps: float | None) -> list[tuple[str, list[float]]]:
    greedy = greedy_fps if greedy_fps is not None else max(60.0, 2.0 * ceiling_fps)
    return [
        ("load50", [0.5 * ceiling_fps / streams] * streams),
        ("load200", [2.0 * ceiling_fps / streams] * streams),
        ("fairness", [greedy] + [SMALL_FPS] * SMALL_STREAMS),
    ]


async def run_phases(server: Any, plan: list[tuple[str, list[float]]], payloads: list,
                     args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, rates in plan:
        specs = [StreamSpec(f"{name}-{i:02d}", rate, payloads[i % len(payloads)]) for i, rate in enumerate(rates)]
        results[name] = await measure(
            server.host, server.tcp_port, specs, args.duration, api_port=server.api_port,
            warmup=args.warmup, grace=args.grace, progress=not args.quiet, desc=name,
        )
        if not args.quiet:
            print(phase_line(name, results[name]), flush=True)
    return results


def phase_line(name: str, s: dict[str, Any]) -> str:
    lat = s["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (f"{name:<10}{s['offered_fps']:>9.1f}{s['achieved_fps']:>10.1f}{ms(lat['p50']):>8}{ms(lat['p95']):>8}"
            f"{ms(lat['p99']):>8}{ms(lat['max']):>8}{s['dropped']:>9}{s['unanswered']:>11}")


PHASE_HEADER = (f"{'phase':<10}{'offered':>9}{'achieved':>10}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
                f"{'dropped':>9}{'unanswered':>11}   (fps, latency ms end-to-end)")


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


async def server_run(model: str, args: argparse.Namespace, workdir: Path,
                     plan: list[tuple[str, list[float]]]) -> dict[str, Any]:
    payloads = prepare_payloads(size=parse_size(args.size))
    try:
        with start_server(workdir, model=model, imgsz=args.imgsz, workers=args.workers,
                          extra=shlex.split(args.server_args)) as server:
            if not args.quiet:
                print(f"server {model} up on tcp {server.tcp_port} / http {server.api_port}", flush=True)
                print(PHASE_HEADER, flush=True)
            phases = await run_phases(server, plan, payloads, args)
            log_tail = server.log_tail(10)
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc
    except ClientError as exc:
        raise BenchError(f"load generator could not talk to the server: {exc}") from exc
    return {"phases": phases, "server_log_tail": log_tail}


# --------------------------------------------------------------------------- targets


def small_stream_jain(fair: dict[str, Any]) -> float | None:
    small = [s["achieved_fps"] for s in fair["per_stream"][1:]]
    return jain_index(small)


def build_checks(raw: dict[str, Any], phases: dict[str, dict[str, Any]],
                 compare: dict[str, Any] | None) -> list[Check]:
    one_inf = raw["infer_ms_median"]
    load50, load200, fair = phases["load50"], phases["load200"], phases["fairness"]
    p99 = load200["latency_ms"]["p99"]
    p50 = load50["latency_ms"]["p50"]
    checks = [
        Check("saturated server throughput ÷ raw predict throughput", load200["achieved_fps"] / raw["fps"],
              ">=", 1.2),
        Check("p99 e2e latency at 200 % load ÷ one inference time", None if p99 is None else p99 / one_inf,
              "<=", 3.0),
        Check("p50 e2e latency at 50 % load − one inference time", None if p50 is None else p50 - one_inf,
              "<=", 5.0, " ms"),
        Check(f"Jain index over the {SMALL_STREAMS} small streams (fairness phase)", small_stream_jain(fair),
              ">=", 0.99),
    ]
    checks += [Check(f"frames unanswered in {name}", float(s["unanswered"]), "==", 0) for name, s in phases.items()]
    if compare is not None:
        checks += [Check(f"frames unanswered in {compare['model']} {name}", float(s["unanswered"]), "==", 0)
                   for name, s in compare["phases"].items()]
        pt = compare["phases"]["load200"]["achieved_fps"]
        checks.append(Check("OpenVINO ÷ PyTorch yolov8n server throughput (both saturated)",
                            load200["achieved_fps"] / pt if pt > 0 else None, ">=", 3.0))
    return checks


# --------------------------------------------------------------------------- main


def describe_raw(label: str, raw: dict[str, Any]) -> str:
    return (f"raw predict() {label}: {raw['fps']:.1f} fps, one inference {raw['infer_ms_median']:.2f} ms "
            f"(median of {raw['calls']} calls on {raw['frame']}, imgsz {raw['imgsz']}; "
            f"ultralytics' own split {raw['ultralytics_speed_ms']})")


async def amain(args: argparse.Namespace) -> int:
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
    }
    busy = machine_busy()
    report["cpu_busy_before_percent"] = busy
    if busy > BUSY_PERCENT:
        print(f"WARNING: this machine is already {busy:.0f} % busy (all cores) before the bench starts: "
              "other processes will make every number lower and noisier", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-bench-") as tmp:
        workdir = Path(tmp)
        # Raw ceilings first, each in its own process, while no server is running.
        raw = run_raw(args.model, args.imgsz, raw_duration, args.size, workdir)
        print(describe_raw(Path(args.model).name, raw), flush=True)
        report["raw"] = raw
        raw_cmp = None
        if args.compare:
            raw_cmp = run_raw(args.compare_model, args.imgsz, raw_duration, args.size, workdir)
            print(describe_raw(args.compare_model, raw_cmp), flush=True)
            report["raw_compare"] = raw_cmp
        plan = phase_plan(raw["fps"], args.streams, args.greedy_fps)
        report["plan"] = {name: rates for name, rates in plan}
        run = await server_run(args.model, args, workdir / "server", plan)
        report["server"] = run
        compare = None
        if raw_cmp is not None:
            cmp_plan = [("load200", [2.0 * raw_cmp["fps"] / args.streams] * args.streams)]
            cmp_run = await server_run(args.compare_model, args, workdir / "server-compare", cmp_plan)
            compare = {"model": args.compare_model, **cmp_run}
            report["server_compare"] = compare
    checks = build_checks(raw, run["phases"], compare)
    report["checks"] = [asdict(c) | {"passed": c.passed} for c in checks]

    print()
    if args.quiet:  # otherwise each phase's row was printed as it finished
        print(PHASE_HEADER)
        for name, s in run["phases"].items():
            print(phase_line(name, s))
    if compare is not None:
        print(phase_line("pt-load200", compare["phases"]["load200"]) + f"   ({args.compare_model})")
    for name, s in run["phases"].items():
        line = server_line(name, s)
        if line:
            print(line)
        s["others_cpu_percent"] = others_cpu(s)
        if (s["others_cpu_percent"] or 0.0) > BUSY_PERCENT:
            print(f"  WARNING: other processes took ~{s['others_cpu_percent']:.0f} % of a core during {name}: "
                  "its numbers are not this server's alone")
    fair = run["phases"]["fairness"]
    print(f"  fairness: greedy stream {fair['per_stream'][0]['offered_fps']:.0f} fps offered, "
          f"{fair['per_stream'][0]['achieved_fps']:.1f} achieved; small streams achieved "
          + ", ".join(f"{s['achieved_fps']:.2f}" for s in fair["per_stream"][1:]))
    print()
    print(f"targets (one inference = raw median {raw['infer_ms_median']:.2f} ms, "
          f"raw ceiling {raw['fps']:.1f} fps)")
    for c in checks:
        print(c.line())
    if raw_cmp is not None:
        print(f"INFO  OpenVINO ÷ PyTorch raw predict() throughput = {raw['fps'] / raw_cmp['fps']:.2f}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"results {json_path}")
    return 1 if args.strict and not all(c.passed for c in checks) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.warmup >= args.duration:
        parser.error("--duration must be > 0 and --warmup within [0, duration)")
    if args.streams < 1:
        parser.error("--streams must be at least 1")
    try:
        parse_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(amain(args))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
