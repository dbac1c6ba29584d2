"""stress_test.py run as a user runs it, against the real server: report, JSON, chart, ramp, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ServerHandle, free_port
from tests.scripts.scriptutil import run_script
from visionstream.cli.stress import build_parser, check_args
from visionstream.loadtest.loadgen import Phase, send_times


def only_report(out_dir: Path) -> dict:
    files = sorted(out_dir.glob("stress-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_short_run_accounts_for_every_frame(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_script("stress_test.py", "--port", server.tcp_port, "--api-port", server.api_port,
                      "--streams", "3", "--fps", "5", "--duration", "2", "--grace", "5",
                      "--out-dir", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "latency ms" in proc.stdout and "Jain" in proc.stdout
    s = only_report(out)["summary"]
    # Absolute pacing: 3 cameras x 5 fps x 2 s, each frame answered by a result or a drop notice.
    assert s["sent"] == 30
    assert s["unanswered"] == 0 and s["results"] + s["dropped"] == 30, s["drops_by_reason"]
    assert s["results"] > 0 and s["latency_ms"]["p50"] > 0
    assert [p["name"] for p in s["per_stream"]] == ["cam-00", "cam-01", "cam-02"]
    assert s["integrity"] == {"duplicate_replies": 0, "unexpected_replies": 0, "timestamp_mismatches": 0,
                              "streams_closed_by_server": 0}
    assert s["server_stats_after"]["total_frames"] - s["server_stats_before"]["total_frames"] == 30
    assert {"cpu", "ram", "workers_busy", "queue_size"} <= set(s["server_stats_after"])
    assert len(s["per_second"]) >= 2
    png = next(out.glob("stress-*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_ramp_with_per_stream_rates(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_script("stress_test.py", "--port", server.tcp_port, "--api-port", "0",
                      "--stream-fps", "4,2x2", "--ramp", "--ramp-steps", "2", "--step-duration", "1",
                      "--grace", "5", "--synthetic", "--size", "320x240", "--no-plot", "--out-dir", out,
                      "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "saturation" in proc.stdout
    ramp = only_report(out)["ramp"]
    assert [s["offered_fps"] for s in ramp["steps"]] == [8.0, 16.0]
    first = ramp["step_summaries"][0]
    assert [p["offered_fps"] for p in first["per_stream"]] == [4.0, 2.0, 2.0]
    assert all(s["unanswered"] == 0 for s in ramp["steps"])
    assert first["server_stats_before"] is None  # --api-port 0: no /stats calls
    assert not list(out.glob("*.png"))


def test_unreachable_server_is_one_line_and_nonzero(tmp_path: Path) -> None:
    proc = run_script("stress_test.py", "--port", free_port(), "--api-port", "0", "--duration", "1",
                      "--out-dir", tmp_path / "results", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not reachable" in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()


def test_help_lists_every_flag_with_its_default(tmp_path: Path) -> None:
    proc = run_script("stress_test.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--streams", "--fps", "--duration", "--stream-fps", "--ramp", "--image", "--size",
                 "--synthetic", "--host", "--port", "--api-port", "--token", "--out-dir", "--quiet",
                 "--phase {stagger,lockstep,random}", "--poisson", "--seed", "--no-stagger"):
        assert flag in proc.stdout
    assert "(default: 8)" in proc.stdout and "(default: 640x480)" in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps help lines
    assert "(see --seed) (default: stagger)" in text
    assert "same schedule) (default: 0)" in text
    assert "--no-stagger deprecated alias for --phase lockstep" in text


def parsed(*argv: str):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def test_load_shape_flags_and_the_deprecated_no_stagger_alias(capsys: pytest.CaptureFixture[str]) -> None:
    args = parsed()
    assert (args.phase, args.poisson, args.seed) == ("stagger", False, 0)
    args = parsed("--phase", "random", "--poisson", "--seed", "9")
    assert (Phase(args.phase), args.poisson, args.seed) == (Phase.RANDOM, True, 9)
    assert parsed("--no-stagger").phase == parsed("--phase", "lockstep").phase == "lockstep"
    assert "deprecated" in capsys.readouterr().err
    assert parsed("--no-stagger", "--phase", "lockstep").phase == "lockstep"
    for bad in (["--no-stagger", "--phase", "random"], ["--seed", "-1"], ["--phase", "sideways"]):
        with pytest.raises(SystemExit):
            parsed(*bad)


def test_lockstep_poisson_run_follows_the_seeded_schedule(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_script("stress_test.py", "--port", server.tcp_port, "--api-port", "0",
                      "--streams", "3", "--fps", "5", "--duration", "2", "--grace", "5",
                      "--phase", "lockstep", "--poisson", "--seed", "3", "--synthetic", "--size", "320x240",
                      "--no-plot", "--out-dir", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "load shape  lockstep phases, Poisson gaps (mean 1/fps), seed 3" in proc.stdout
    report = only_report(out)
    s = report["summary"]
    assert (s["phase"], s["poisson"], s["seed"]) == ("lockstep", True, 3)
    assert (report["config"]["phase"], report["config"]["poisson"], report["config"]["seed"]) == ("lockstep", True, 3)
    planned = [len(list(send_times(Phase.LOCKSTEP, k, 3, 5.0, 2.0, poisson=True, seed=3))) for k in range(3)]
    assert planned != [10, 10, 10]  # seed 3: Poisson counts, not the periodic 5 fps x 2 s
    assert [p["sent"] + p["missed_slots"] for p in s["per_stream"]] == planned
    assert s["unanswered"] == 0 and s["results"] + s["dropped"] == s["sent"], s["drops_by_reason"]
