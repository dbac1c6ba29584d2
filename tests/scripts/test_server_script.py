"""server.py as a new user runs it: a mistyped model, --placeholder, --device 0, a port in use, --help's defaults."""

from __future__ import annotations

import json
import socket
import urllib.request
from enum import Enum
from pathlib import Path

import pytest

from tests.helpers import ServerHandle, free_port, running_server
from tests.scripts.scriptutil import run_script
from visionstream.server.config import ServerConfig, build_parser

# No GPU anywhere these tests run: CUDA_VISIBLE_DEVICES="" makes that true on a machine that has one.
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "COLUMNS": "100"}


def start(tmp_path: Path, *args: str | Path, timeout: float = 120) -> tuple[int, list[str], str]:
    """server.py on free ports with `args`; (exit code, console lines, whole console) of a server that stops."""
    proc = run_script("server.py", "--tcp-port", "0", "--api-port", "0", "--log-dir", tmp_path / "logs", *args,
                      cwd=tmp_path, env=NO_GPU, timeout=timeout)
    console = proc.stdout + proc.stderr
    return proc.returncode, console.strip().splitlines(), console


def the_error(lines: list[str]) -> str:
    errors = [line for line in lines if " ERROR " in line or "error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


# --------------------------------------------------------------------------- item 1: a mistyped model


def not_a_model(tmp_path: Path, kind: str) -> str:
    if kind == "typo":
        return "nope.pt"  # a bare name: not on disk, and not one ultralytics publishes
    if kind == "missing path":
        return str(tmp_path / "models" / "yolov8n.pt")
    if kind == "text file":
        path = tmp_path / "README.md"
        path.write_text("# not a model\n")
        return str(path)
    if kind == "folder":
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "a.txt").write_text("x")
        return str(tmp_path / "photos")
    path = tmp_path / "corrupt.pt"  # "corrupt"
    path.write_bytes(bytes(range(256)) * 1024)
    return str(path)


@pytest.mark.parametrize("kind", ["typo", "missing path", "text file", "folder", "corrupt"])
def test_a_model_named_explicitly_that_cannot_load_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    model = not_a_model(tmp_path, kind)
    code, lines, console = start(tmp_path, "--model", model, "--ready-file", tmp_path / "ready.json")
    assert code == 2, console
    assert not (tmp_path / "ready.json").exists()  # never "ready"
    assert "Traceback" not in console and "Ultralytics supports" not in console
    line = the_error(lines)
    assert f"--model {model}" in line
    assert "PLACEHOLDER" not in console
    assert all(" INFO " in other for other in lines if other != line), console  # nothing else alarming


def test_placeholder_flag_starts_placeholder_mode_on_purpose(tmp_path: Path) -> None:
    with running_server(tmp_path, "--placeholder", model="nope.pt") as srv:
        health = json.loads(urllib.request.urlopen(f"{srv.base_url}/health", timeout=10).read())
        log = srv.log()
    assert health["model"] == "placeholder" and health["ready"] is True
    assert "PLACEHOLDER MODE" in log and "--placeholder" in log


def test_the_default_model_offline_still_falls_back_loudly(tmp_path: Path) -> None:
    # The seed's own command: yolov8n.pt is not on disk and this machine is offline.
    with running_server(tmp_path, "--download-timeout", "1", model="yolov8n.pt", timeout=60) as srv:
        health = json.loads(urllib.request.urlopen(f"{srv.base_url}/health", timeout=10).read())
        log = srv.log()
    assert health["model"] == "placeholder"
    assert "PLACEHOLDER MODE" in log and "yolov8n.pt" in log


# --------------------------------------------------------------------------- item 10: small truths


@pytest.mark.parametrize("device", ["0", "cuda", "cuda:0"])
def test_device_0_means_cuda_0_and_fails_clearly_without_a_gpu(tmp_path: Path, device: str) -> None:
    code, lines, console = start(tmp_path, "--placeholder", "--device", device)
    assert code == 2, console
    assert "Traceback" not in console
    line = the_error(lines)
    assert "--device cuda:0" in line and "CUDA is not available" in line


@pytest.mark.parametrize("flag, role", [("--tcp-port", "frames"), ("--api-port", "HTTP control plane")])
def test_a_port_in_use_names_the_port_and_its_flag(tmp_path: Path, flag: str, role: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        other = "--api-port" if flag == "--tcp-port" else "--tcp-port"
        proc = run_script("server.py", "--placeholder", flag, str(port), other, str(free_port()), "--log-dir",
                          tmp_path / "logs", cwd=tmp_path, env=NO_GPU)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2, console
    assert "Traceback" not in console
    assert console.strip().count("\n") == 0, console  # one line: before any model or control plane
    assert f"cannot start: {flag} {port} ({role}) is already in use on 127.0.0.1" in console


def help_defaults(text: str) -> dict[str, str | None]:
    """'--flag' -> the default its --help entry shows (None: shows none)."""
    entries: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = line.split()[0]
            entries[current] = line
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    shown: dict[str, str | None] = {}
    for flag, entry in entries.items():
        entry = " ".join(entry.split())
        shown[flag] = entry.rsplit("(default: ", 1)[1].rstrip(")") if entry.endswith(")") and "(default: " in entry \
            else None
    return shown


def test_help_shows_every_flags_true_default(tmp_path: Path) -> None:
    proc = run_script("server.py", "--help", cwd=tmp_path, env=NO_GPU)
    assert proc.returncode == 0, proc.stderr
    shown = help_defaults(proc.stdout)
    defaults = ServerConfig()
    for action in build_parser()._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag in (None, "--help"):
            continue
        assert flag in shown, f"{flag} missing from --help"
        value = getattr(defaults, action.dest)
        if action.nargs == 0:  # a switch: off unless given, whatever it stores
            assert shown[flag] is None, f"{flag} shows (default: {shown[flag]}) but is off unless given"
            assert value is (not action.const), flag
        elif value is None:  # nothing, or words saying what "none" means
            assert shown[flag] is None or shown[flag].startswith("none"), f"{flag}: --help says {shown[flag]}"
        else:
            value = value.value if isinstance(value, Enum) else value  # a policy shows its name
            assert shown[flag] == str(value), f"{flag}: --help says {shown[flag]}, ServerConfig has {value}"
    assert shown["--max-age-ms"] == "0.0" and shown["--full-decode"] is None and shown["--no-rect"] is None


def test_stats_in_a_browser_is_pretty_printed_and_json_otherwise(server: ServerHandle) -> None:
    page = urllib.request.urlopen(urllib.request.Request(
        f"{server.base_url}/stats", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}), timeout=10)
    assert page.headers["content-type"].startswith("text/html")
    text = page.read().decode()
    assert "<pre>" in text and '\n  "model": ' in text and "src=" not in text and "href=" not in text
    plain = urllib.request.urlopen(f"{server.base_url}/stats", timeout=10)
    assert plain.headers["content-type"].startswith("application/json")
    assert "model" in json.loads(plain.read())
