"""pyproject.toml declares what requirements*.txt install, and names every command as a console script."""

from __future__ import annotations

import tomllib

from tests.helpers import ROOT


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith(("#", "-r"))]


def test_dependencies_are_the_requirements_files() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines("requirements.txt")
    assert project["optional-dependencies"]["dev"] == requirement_lines("requirements-dev.txt")
    assert project["optional-dependencies"]["ray"] == requirement_lines("requirements-ray.txt")
    assert "-r requirements-ray.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()


def test_every_command_is_a_console_script_with_a_main() -> None:
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"visionstream-server", "visionstream-client", "visionstream-stress",
                            "visionstream-visualize", "visionstream-ws"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
