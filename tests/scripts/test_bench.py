"""`python -m bench`: the scenario matrix end to end with tiny durations, and its pieces without a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import (
    CAPACITY_NAME,
    SCENARIOS,
    Check,
    Scenario,
    build_checks,
    evaluate,
    select_scenarios,
)
from tests.helpers import COCO_MODEL, ROOT, require
from tests.scripts.scriptutil import clean_env
from visionstream.loadtest.loadgen import Phase
from visionstream.loadtest.report import p99_bound_ms

# Every target line the bench prints (without --compare), by a fragment of its name.
TARGETS = (
    "every overloaded scenario ÷ the best scenario",
    "max-min fair share: worst stream's fraction",
    "decode-heavy: worst camera's fraction of its fair share",
    "decode-heavy: worst camera's p99",
    "p99 ÷ (min(frame period, streams ÷ throughput) + 3 inferences)",
    "best throughput ÷ raw predict() loop",
    "best throughput ÷ the model alone",
    "p99 at 200 % staggered load",
    "frames unanswered, every scenario",
    "p50 at 50 % load",
)
SMOKE = ("stagger-8-50", "stagger-8-200", "lockstep-8-200", "lossless-200", "heavy-80")


def run_bench(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=cwd,
                          env=clean_env({"PYTHONPATH": str(ROOT), **(env or {})}),
                          capture_output=True, text=True, timeout=timeout, check=False)


def verdicts(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))]


def test_bench_matrix_smoke(tmp_path: Path) -> None:
    require(COCO_MODEL)
    out = tmp_path / "bench.json"
    proc = run_bench("--duration", "1.5", "--raw-duration", "0.5", "--warmup", "0.3", "--grace", "4",
                     "--scenarios", ",".join(SMOKE), "--json", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = verdicts(proc.stdout)
    for needle in TARGETS:
        assert sum(needle in line for line in lines) == 1, (needle, proc.stdout)
    assert len(lines) == len(TARGETS), proc.stdout
    assert not [line for line in lines if line.startswith("SKIP")], proc.stdout  # each target's scenario ran
    assert any(line.startswith("raw predict()") for line in proc.stdout.splitlines())
    assert any(line.startswith("model alone") for line in proc.stdout.splitlines())

    report = json.loads(out.read_text())
    assert report["raw"]["fps"] > 0 and report["raw"]["infer_ms_median"] > 0
    alone = report["model_alone"]
    assert alone["fps"] > 0 and set(alone["modes"]) == {"lanes", "async"}
    assert alone["input"]["shape_nhwc"] == [1, 256, 320, 3]  # 640x480 at imgsz 320, as the server pads it
    # One row per scenario, capacity first (after any retry at a higher offer that did not saturate).
    rows = {r["name"]: r for r in report["scenarios"] if not r["name"].startswith(f"{CAPACITY_NAME}-try")}
    assert list(rows) == [CAPACITY_NAME, *SMOKE]
    capacity = report["capacity"]
    assert capacity["source"] == "measured" and capacity["fps"] == rows[CAPACITY_NAME]["achieved_fps"] > 0
    # Loads are relative to the measured capacity, not to the raw loop.
    assert rows["stagger-8-200"]["load_of_capacity"] == pytest.approx(2.0)
    assert rows["stagger-8-50"]["load_of_capacity"] == pytest.approx(0.5)
    for r in rows.values():
        assert len(r["per_stream"]) == r["plan"]["streams"] == len(r["summary"]["per_stream"])
        assert r["summary"]["phase"] == r["plan"]["phase"]
        assert r["summary"]["sent"] > 0 and r["unanswered"] == 0
        for s in r["per_stream"]:
            assert s["p99_bound_ms"] > 0 and s["cost_ms"] > 0
    # Lockstep really sends in lockstep; stagger spreads the first frames over one period.
    lock, stag = rows["lockstep-8-200"], rows["stagger-8-50"]
    assert lock["plan"]["phase"] == "lockstep" and stag["plan"]["phase"] == "stagger"

    def spread(r):
        firsts = [s["first_sent_s"] for s in r["per_stream"]]
        return max(firsts) - min(firsts), 1.0 / r["per_stream"][0]["offered_fps"]

    lock_spread, lock_period = spread(lock)
    stag_spread, stag_period = spread(stag)
    assert lock_spread < 0.5 * lock_period, (lock_spread, lock_period)
    assert stag_spread > 0.5 * stag_period, (stag_spread, stag_period)
    ll = rows["lossless-200"]
    assert [s["role"] for s in ll["per_stream"]] == ["lossless"] + ["camera"] * 7
    assert ll["summary"]["per_stream"][0]["lossless"] and ll["per_stream"][0]["dropped"] == 0
    assert ll["per_stream"][0]["p99_exempt"]
    heavy = rows["heavy-80"]
    assert [s["role"] for s in heavy["per_stream"]] == ["heavy"] + ["camera"] * 4
    assert heavy["per_stream"][0]["offered_fps"] == 2.0
    assert len(report["checks"]) == len(TARGETS)


def test_bench_lists_scenarios_without_a_model(tmp_path: Path) -> None:
    proc = run_bench("--list", cwd=tmp_path, env={"VISIONSTREAM_MODELS": str(tmp_path / "nowhere")}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == [CAPACITY_NAME] + [s.name for s in SCENARIOS]


def test_bench_rejects_unknown_scenarios(tmp_path: Path) -> None:
    proc = run_bench("--scenarios", "stagger-8-50,nosuch-*", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "nosuch-*" in proc.stderr


def test_bench_skips_clearly_without_models(tmp_path: Path) -> None:
    proc = run_bench(cwd=tmp_path, env={"VISIONSTREAM_MODELS": str(tmp_path / "nowhere")}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SKIP: ") and "VISIONSTREAM_MODELS" in proc.stdout


# --------------------------------------------------------------------------- pieces, no server


def test_matrix_covers_the_issue() -> None:
    eq = [s for s in SCENARIOS if not (s.lossless or s.heavy) and s.mix == (1.0,)]
    assert {s.phase for s in SCENARIOS} == set(Phase) and any(s.poisson for s in SCENARIOS)
    assert {s.streams for s in eq} >= {8, 32, 64}
    assert {s.load for s in eq} >= {0.5, 1.0, 2.0}
    assert any(s.mix != (1.0,) for s in SCENARIOS)
    assert any(s.lossless for s in SCENARIOS) and any(s.heavy for s in SCENARIOS)
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)
    assert CAPACITY_NAME not in {s.name for s in SCENARIOS}


def test_select_scenarios_by_name_and_glob_in_matrix_order() -> None:
    assert select_scenarios("all") == list(SCENARIOS)
    picked = [s.name for s in select_scenarios("heavy-80,lockstep-*")]
    assert picked == ["lockstep-8-200", "lockstep-32-200", "lockstep-64-200", "lockstep-32-50", "heavy-80"]
    assert select_scenarios(CAPACITY_NAME) == []  # the capacity scenario alone
    with pytest.raises(ValueError, match="nosuch"):
        select_scenarios("stagger-8-50,nosuch")


def test_scenario_rates() -> None:
    mix = next(s for s in SCENARIOS if s.name == "mix-random-200")
    rates = mix.rates(300.0)
    assert sum(rates) == pytest.approx(600.0)  # 200 % of capacity, in the ratio 5:20:60:150, twice
    assert rates[:4] == pytest.approx([r * 600 / 470 for r in (5, 20, 60, 150)]) and rates[4:] == rates[:4]
    ll = next(s for s in SCENARIOS if s.name == "lossless-200")
    rates = ll.rates(300.0)
    assert rates[0] == 300.0 and sum(rates[1:]) == pytest.approx(600.0)  # it asks for all; cameras 200 %
    heavy = next(s for s in SCENARIOS if s.name == "heavy-80")
    rates = heavy.rates(300.0)
    assert rates[0] == 2.0 and sum(rates[1:]) == pytest.approx(240.0)
    assert not heavy.overloaded and ll.overloaded and not next(s for s in SCENARIOS if s.load == 0.5).overloaded


def stream_row(name: str, offered: float, sent: float, served: float, cost: float, p99: float | None,
               lossless: bool = False) -> dict:
    n = round(served * 5)
    return {"name": name, "offered_fps": offered, "sent_fps": sent, "served_fps": served, "achieved_fps": served,
            "served": n, "worker_ms_served": n * cost, "worker_ms_median": cost, "lossless": lossless,
            "latency_ms": {"p50": p99 and p99 / 2, "p99": p99}, "dropped": 0, "unanswered": 0, "first_sent_s": 0.0}


def fake_summary(per: list[dict]) -> dict:
    return {"per_stream": per, "offered_fps": sum(p["offered_fps"] for p in per),
            "achieved_fps": sum(p["served_fps"] for p in per), "latency_ms": {"p50": 10.0, "p99": 20.0},
            "dropped": 0, "drops_by_reason": {}, "unanswered": 0}


def test_evaluate_fair_shares_in_worker_time_and_bounds() -> None:
    # A 2 fps PNG stream (1 s of decode) and 4 cameras at 50 fps of 7 ms frames; 2000 ms/s of work.
    per = [stream_row("h-00-png8k", 2, 2, 0.6, 1000, 1500.0)]
    per += [stream_row(f"h-{i:02d}", 50, 50, 50, 7, 30.0) for i in range(1, 5)]
    row = evaluate("h", ["heavy"] + ["camera"] * 4, ["png"] + ["bus", "zidane"] * 2, fake_summary(per), 6.0)
    assert [s["fair_fraction"] for s in row["per_stream"]] == pytest.approx([1.0] * 5)
    assert row["per_stream"][0]["share_fps"] == pytest.approx(0.6)
    # The PNG stream is exempt from the p99 bound; the cameras' bound is their period + 3 inferences.
    assert row["per_stream"][0]["p99_exempt"] and row["worst_p99_bound"]["stream"].startswith("h-0")
    bound = p99_bound_ms(50, 5, 200.6, 6.0)
    assert row["worst_p99_bound"]["bound_ms"] == pytest.approx(bound)
    assert row["worst_p99_bound"]["ratio"] == pytest.approx(30.0 / bound)


def test_evaluate_lossless_demand_is_its_nominal_rate() -> None:
    # A lossless stream let through at 20 fps beside a camera served 80 of 100: the upload would take
    # any share, so it is owed the equal half (50) of the 100 served and got 0.4 of it.
    per = [stream_row("l-00-lossless", 100, 20, 20, 5, 900.0, lossless=True), stream_row("l-01", 100, 100, 80, 5, 9.0)]
    row = evaluate("l", ["lossless", "camera"], ["bus", "bus"], fake_summary(per), 3.0)
    assert row["per_stream"][0]["fair_fraction"] == pytest.approx(0.4)
    assert row["worst_fair"] == {"stream": "l-00-lossless", "fraction": pytest.approx(0.4)}
    assert row["worst_p99_bound"]["stream"] == "l-01"  # the lossless stream's p99 is exempt


def test_evaluate_pools_cost_per_payload() -> None:
    # Two streams of the same frame, one of whose frames happened to run slowly: same cost for both.
    per = [stream_row("p-00", 40, 40, 30, 10, 20.0), stream_row("p-01", 40, 40, 30, 30, 20.0)]
    row = evaluate("p", ["camera"] * 2, ["bus", "bus"], fake_summary(per), 3.0)
    assert [s["cost_ms"] for s in row["per_stream"]] == pytest.approx([20.0, 20.0])
    assert [s["fair_fraction"] for s in row["per_stream"]] == pytest.approx([1.0, 1.0])


def test_checks_print_every_target_once_and_skip_what_did_not_run() -> None:
    raw = {"fps": 100.0, "infer_ms_median": 6.0}
    alone = {"fps": 400.0}
    per = [stream_row(f"x-{i:02d}", 40, 40, 35, 7, 20.0) for i in range(8)]
    base = {**evaluate("x", ["camera"] * 8, ["bus"] * 8, fake_summary(per), 6.0), "plan": {"roles": ["camera"] * 8}}
    rows = [{**base, "name": "capacity", "overloaded": True},
            {**base, "name": "stagger-8-200", "overloaded": True, "achieved_fps": 250.0}]
    checks = build_checks(raw, alone, rows)
    lines = [c.line() for c in checks]
    for needle in TARGETS:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    by = {c.name: c for c in checks}
    skipped = [c.name for c in checks if c.skipped]
    assert len(skipped) == 3 and all(("decode-heavy" in n or "50 %" in n) for n in skipped)
    over = next(c for c in checks if "overloaded" in c.name)
    assert over.value == pytest.approx(250 / 280) and not over.passed
    assert by["best throughput ÷ the model alone"].value == pytest.approx(0.7)
    assert next(c for c in checks if "unanswered" in c.name).passed
    compare = {"scenarios": [{**base, "name": "pt-stagger-8-200", "achieved_fps": 70.0}]}
    with_cmp = build_checks(raw, alone, rows, compare)
    assert with_cmp[-1].name.startswith("OpenVINO ÷ PyTorch") and with_cmp[-1].value == pytest.approx(250 / 70)
    assert "SKIP" in Check("x", None, ">=", 1, skipped="not run").line()
    assert Check("y", 99.0, "<", 100, " ms").passed and not Check("y", 100.0, "<", 100, " ms").passed


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


def test_scenario_is_a_frozen_value() -> None:
    s = Scenario("x", 4, 1.0)
    with pytest.raises(AttributeError):
        s.load = 2.0  # type: ignore[misc]
    assert s.roles == ["camera"] * 4 and s.overloaded is False
