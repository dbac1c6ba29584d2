"""pip builds a wheel of this checkout; installed apart from it, the commands and the server start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import COCO_MODEL, ROOT, require
from tests.scripts.scriptutil import clean_env

COMMANDS = ["visionstream-server", "visionstream-client", "visionstream-stress", "visionstream-visualize",
            "visionstream-ws"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed with --target into a folder of its own (dependencies come from this venv)."""
    base = tmp_path_factory.mktemp("install")
    wheels, target, src = base / "wheels", base / "site", base / "src"
    # A copy of what the build reads, so the build leaves no build/ or *.egg-info in the checkout.
    shutil.copytree(ROOT / "visionstream", src / "visionstream",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # No build isolation when setuptools is at hand: the build then needs no network.
    isolation = ["--no-build-isolation"] if _has("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                            *isolation, str(src)],
                           cwd=base, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("visionstream-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], cwd=base, capture_output=True, text=True, timeout=300, check=False)
    assert inst.returncode == 0, inst.stderr
    return target


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def package_dirs() -> set[str]:
    return {str(p.parent.relative_to(ROOT)) for p in (ROOT / "visionstream").rglob("__init__.py")}


def test_the_wheel_holds_every_subpackage(installed: Path) -> None:
    (wheel,) = (installed.parent / "wheels").glob("visionstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")} == package_dirs()
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "visionstream").rglob("*.py")}
    assert sources <= set(names)
    page = {str(p.relative_to(ROOT)) for p in (ROOT / "visionstream" / "server" / "dashboard").iterdir()}
    assert page and page <= set(names)  # the dashboard's HTML, CSS and JavaScript ship as package data
    assert not [n for n in names if n.startswith("tests/") or n.startswith("bench/")]


def run_outside(cmd: list[str], site: Path, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH is the install folder only: nothing can come from the checkout.
    env = clean_env({"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
                          **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("command", COMMANDS)
def test_console_script_help(installed: Path, tmp_path: Path, command: str) -> None:
    script = installed / "bin" / command
    assert script.exists(), sorted(p.name for p in (installed / "bin").iterdir())
    proc = run_outside([sys.executable, str(script), "--help"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout


def test_the_installed_package_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    proc = run_outside([sys.executable, "-c", "import visionstream.cli.server as m; print(m.__file__)"],
                       installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(installed)


def test_installed_serverproc_starts_the_server(installed: Path, tmp_path: Path) -> None:
    # The helper tests and the bench use: an installed package has no server.py beside it.
    model = require(COCO_MODEL)
    code = ("import sys, pathlib\n"
            "from visionstream.loadtest.serverproc import start_server, MODELS_DIR\n"
            "print(MODELS_DIR)\n"
            f"with start_server(pathlib.Path('work'), model={str(model)!r}, imgsz=320, workers=1) as s:\n"
            "    print('ready', s.tcp_port > 0)\n")
    proc = run_outside([sys.executable, "-c", code], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str((tmp_path / "models").resolve()), "ready True"], proc.stdout


def test_python_m_server_help(installed: Path, tmp_path: Path) -> None:
    proc = run_outside([sys.executable, "-m", "visionstream.cli.server", "--help"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--tcp-port" in proc.stdout
