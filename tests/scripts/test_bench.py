"""`python -m bench` end to end with tiny durations: raw ceiling, its own server, PASS/FAIL lines, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import COCO_MODEL, ROOT, require
from tests.scripts.scriptutil import clean_env


def run_bench(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=cwd,
                          env=clean_env({"PYTHONPATH": str(ROOT), **(env or {})}),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_bench_smoke_prints_every_target(tmp_path: Path) -> None:
    require(COCO_MODEL)
    out = tmp_path / "bench.json"
    proc = run_bench("--duration", "2", "--raw-duration", "1", "--warmup", "0.5", "--grace", "3",
                     "--streams", "2", "--workers", "1", "--json", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    for needle in ("throughput ÷ raw predict", "p99 e2e latency", "p50 e2e latency", "Jain index",
                   "unanswered in load50", "unanswered in load200", "unanswered in fairness"):
        assert sum(needle in line for line in verdicts) == 1, proc.stdout
    report = json.loads(out.read_text())
    assert report["raw"]["fps"] > 0 and report["raw"]["infer_ms_median"] > 0
    phases = report["server"]["phases"]
    assert set(phases) == {"load50", "load200", "fairness"}
    # 200 % of the ceiling really is four times the 50 % load; the greedy stream overloads.
    assert phases["load200"]["offered_fps"] == pytest.approx(4 * phases["load50"]["offered_fps"])
    assert [p["offered_fps"] for p in phases["fairness"]["per_stream"][1:]] == [2.0] * 7
    assert phases["fairness"]["per_stream"][0]["offered_fps"] >= 60
    assert all(phases[n]["sent"] > 0 for n in phases)


def test_bench_skips_clearly_without_models(tmp_path: Path) -> None:
    proc = run_bench(cwd=tmp_path, env={"VISIONSTREAM_MODELS": str(tmp_path / "nowhere")}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIP: ") and "VISIONSTREAM_MODELS" in proc.stdout


def test_single_stream_compares_server_latency_with_raw_predict(tmp_path: Path) -> None:
    require(COCO_MODEL)
    proc = subprocess.run([sys.executable, "-m", "bench.single", "--frames", "6", "--fps", "20"], cwd=tmp_path,
                          env=clean_env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw_line = next(line for line in proc.stdout.splitlines() if line.startswith("raw model.predict"))
    server_line = next(line for line in proc.stdout.splitlines() if line.startswith("server, one stream"))
    assert "back to back" in raw_line and "paced at 20" in raw_line
    assert "6 results" in server_line and "latency_ms p50" in server_line
