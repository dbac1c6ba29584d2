"""One real server (COCO OpenVINO model, imgsz 320) shared by the script smoke tests."""

from __future__ import annotations

import pytest

from tests.helpers import COCO_MODEL, ServerHandle, require, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerHandle:
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("script-server")) as handle:
        yield handle
