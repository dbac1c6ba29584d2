"""Server flags: defaults, validation with one-line errors, the token from the environment, and the CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from visionstream.server.config import TOKEN_ENV, ServerConfig, build_parser, parse_config
from visionstream.server.policy import RULES
from visionstream.wire.errors import ConfigError

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
SERVER = str(ROOT / "server.py")


def run_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "100", **(env or {})}
    full_env.pop(TOKEN_ENV, None)
    return subprocess.run([PYTHON, SERVER, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- defaults


def test_defaults_match_the_seed() -> None:
    cfg = parse_config([], environ={})
    assert cfg == ServerConfig()
    assert (cfg.tcp_port, cfg.api_port) == (9000, 8000)
    assert cfg.model == "yolov8n.pt"
    assert cfg.device == "cpu"
    assert cfg.workers == 2
    assert cfg.imgsz == 640
    assert cfg.host == "127.0.0.1"
    assert cfg.token is None
    assert cfg.exposed is False


def test_flags_are_parsed_into_typed_fields() -> None:
    cfg = parse_config(["--tcp-port", "0", "--api-port", "0", "--workers", "3", "--imgsz", "320",
                        "--conf", "0.5", "--max-age-ms", "250", "--log-dir", "x/y", "--ready-file", "r.json",
                        "--device", "cuda:1", "--host", "0.0.0.0"], environ={})
    assert (cfg.tcp_port, cfg.api_port, cfg.workers, cfg.imgsz) == (0, 0, 3, 320)
    assert cfg.conf == 0.5 and cfg.max_age_ms == 250.0
    assert cfg.log_dir == Path("x/y") and cfg.ready_file == Path("r.json")
    assert cfg.device == "cuda:1"  # syntax only; availability is checked at start-up by check_device
    assert cfg.exposed is True


def test_parser_defaults_come_from_the_dataclass() -> None:
    d = ServerConfig()
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.default == getattr(d, action.dest), action.dest


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--tcp-port", "70000"], "--tcp-port"),
        (["--api-port", "-1"], "--api-port"),
        (["--workers", "0"], "--workers"),
        (["--imgsz", "100"], "--imgsz"),
        (["--imgsz", "0"], "--imgsz"),
        (["--imgsz", "8192"], "--imgsz"),
        (["--conf", "0"], "--conf"),
        (["--conf", "1.5"], "--conf"),
        (["--iou", "1"], "--iou"),
        (["--threads", "-1"], "--threads"),
        (["--max-age-ms", "-5"], "--max-age-ms"),
        (["--queue-depth", "0"], "--queue-depth"),
        (["--lossless-depth", "0"], "--lossless-depth"),
        (["--max-queue", "0"], "--max-queue"),
        (["--send-buffer", "1000"], "--send-buffer"),
        (["--max-clients", "0"], "--max-clients"),
        (["--max-frame-bytes", "10"], "--max-frame-bytes"),
        (["--max-frame-bytes", str(2**31)], "--max-frame-bytes"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--max-det", "0"], "--max-det"),
        (["--ws-queue", "0"], "--ws-queue"),  # asyncio.Queue(0) would be unbounded
        (["--max-ws-clients", "0"], "--max-ws-clients"),
        (["--device", "gpu"], "--device"),
        (["--device", "cuda:x"], "--device"),  # used to pass and crash check_device with a ValueError
        (["--device", "cudax"], "--device"),
    ],
)
def test_invalid_values_raise_a_one_line_config_error_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(argv, environ={})
    message = str(info.value)
    assert message.startswith(flag + " ")
    assert "\n" not in message
    assert argv[1] in message or repr(argv[1]) in message  # the offending value is quoted back


@pytest.mark.parametrize("device, meaning", [("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda:0", "cuda:0"),
                                             ("cuda:12", "cuda:12"), ("0", "cuda:0"), ("1", "cuda:1")])
def test_device_syntax_accepted(device: str, meaning: str) -> None:
    # `0` is the ultralytics idiom for the first GPU.
    assert parse_config(["--device", device], environ={}).device == meaning


def test_non_numeric_value_is_an_argparse_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--workers", "two"], environ={})
    assert info.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_max_age_auto_is_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """The old adaptive limit dropped frames lanes could serve (lockstep cameras: 41 of 329 fps)."""
    with pytest.raises(SystemExit) as info:
        parse_config(["--max-age-ms", "auto"], environ={})
    assert info.value.code == 2
    assert "'auto' is gone" in capsys.readouterr().err
    assert ServerConfig().max_age_ms == 0


def test_help_and_readme_state_the_scheduling_policy_word_for_word(tmp_path: Path) -> None:
    rules = " ".join(RULES.split())
    assert rules in " ".join(run_server(tmp_path, "--help").stdout.split())
    assert rules in " ".join((ROOT / "README.md").read_text().split())


# --------------------------------------------------------------------------- token


def test_token_comes_from_the_environ_mapping() -> None:
    assert parse_config([], environ={TOKEN_ENV: "s3cret"}).token == "s3cret"


def test_token_flag_wins_over_the_environment() -> None:
    assert parse_config(["--token", "flag"], environ={TOKEN_ENV: "env"}).token == "flag"


def test_empty_token_variable_means_no_token() -> None:
    assert parse_config([], environ={TOKEN_ENV: ""}).token is None


def test_explicit_environ_mapping_is_the_only_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-os")
    assert parse_config([], environ={}).token is None
    assert parse_config([]).token == "from-os"  # no mapping given: the process environment


# --------------------------------------------------------------------------- the real CLI


def help_entries(text: str) -> dict[str, str]:
    """'--flag' -> its whole help entry (continuation lines joined, whitespace normalised)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            if current == "-h":
                current = "--help"
            entries[current] = stripped
        elif current is not None and line.startswith(" " * 4) and stripped:
            entries[current] += " " + stripped
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_exits_0_and_lists_every_flag_with_its_default(tmp_path: Path) -> None:
    proc = run_server(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    entries = help_entries(proc.stdout)
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        assert flag in entries, f"{flag} missing from --help"
        if action.nargs == 0:  # a switch: off unless given, whatever it stores (True for --no-rect)
            assert "(default:" not in entries[flag], entries[flag]
        elif action.default is not None:
            assert f"(default: {action.default})" in entries[flag], entries[flag]
    for flag, default in (("--tcp-port", "9000"), ("--api-port", "8000"), ("--model", "yolov8n.pt"),
                          ("--device", "cpu"), ("--workers", "2"), ("--imgsz", "640"), ("--host", "127.0.0.1")):
        assert f"(default: {default})" in entries[flag]
    assert TOKEN_ENV in entries["--token"]
    assert not (tmp_path / "logs").exists()  # --help does not touch the disk


def test_workers_0_exits_with_one_readable_line(tmp_path: Path) -> None:
    proc = run_server(tmp_path, "--workers", "0", "--log-dir", str(tmp_path / "logs"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--workers" in lines[0] and "at least 1" in lines[0]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:x"])
def test_cuda_device_without_cuda_exits_with_one_clear_line(tmp_path: Path, device: str) -> None:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this is "a machine without CUDA" everywhere.
    proc = run_server(tmp_path, "--device", device, "--log-dir", str(tmp_path / "logs"),
                      env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--device" in lines[0]
    if device == "cuda:0":
        assert "CUDA is not available" in lines[0]


def test_parser_is_an_argparse_parser_with_groups() -> None:
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    titles = {g.title for g in parser._action_groups}
    assert {"network", "model", "scheduling", "operations"} <= titles
