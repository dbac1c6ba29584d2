"""--executor ray's parts without a cluster: its flags, the fast unreachable-head check, shipping weights."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from visionstream.server.config import Executor, ServerConfig, parse_config
from visionstream.server.inference.actor import materialize, ship_model
from visionstream.server.raylanes import ActorInfo, probe
from visionstream.server.tracking import Tracking
from visionstream.wire.errors import ClusterUnavailable, ConfigError


def test_threads_is_the_default_and_ray_flags_parse() -> None:
    assert parse_config([], environ={}).executor is Executor.THREADS
    cfg = parse_config(["--executor", "ray", "--workers", "3", "--lanes", "2", "--ray-address", "10.0.0.5:6379",
                        "--ray-num-cpus", "2", "--ray-num-gpus", "0.5"], environ={})
    assert (cfg.executor, cfg.workers, cfg.lanes) == (Executor.RAY, 3, 2)
    assert (cfg.ray_address, cfg.ray_num_cpus, cfg.ray_num_gpus) == ("10.0.0.5:6379", 2.0, 0.5)


def test_ray_address_comes_from_the_environment_only_for_ray() -> None:
    env = {"RAY_ADDRESS": "head:6379"}
    assert parse_config(["--executor", "ray"], environ=env).ray_address == "head:6379"
    assert parse_config(["--executor", "ray", "--ray-address", "other:1"], environ=env).ray_address == "other:1"
    assert parse_config([], environ=env).ray_address is None  # threads: Ray's variable means nothing


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"ray_address": "h:1"}, "need --executor ray"),
    ({"ray_num_gpus": 1.0}, "need --executor ray"),
    ({"executor": Executor.RAY, "ray_num_cpus": 0.0}, "--ray-num-cpus"),
    ({"executor": Executor.RAY, "ray_num_gpus": -1.0}, "--ray-num-gpus"),
    ({"executor": Executor.RAY, "track": Tracking.BYTETRACK}, "--track needs --executor threads"),
])
def test_combinations_that_cannot_work_are_one_line(kwargs, words) -> None:
    with pytest.raises(ConfigError, match=words):
        ServerConfig(**kwargs).validate()


def test_probe_of_a_closed_port_fails_at_once_with_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable, match=f"cannot reach the Ray cluster at --ray-address 127.0.0.1:{port}"):
            probe(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 2
    with pytest.raises(ClusterUnavailable, match="not host:port"):
        probe("nowhere")


def test_probe_of_a_listening_head_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        probe(f"127.0.0.1:{s.getsockname()[1]}")


def test_shipped_weights_come_back_under_their_own_name(tmp_path: Path) -> None:
    folder = tmp_path / "m_openvino_model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.xml").write_bytes(b"<xml/>")
    (folder / "sub" / "model.bin").write_bytes(b"\x00" * 100)
    shipped = ship_model(str(folder), 1 << 20)
    assert shipped is not None and set(shipped) == {"m_openvino_model/model.xml", "m_openvino_model/sub/model.bin"}
    path = Path(materialize(shipped, folder.name))
    assert path.name == "m_openvino_model" and path != folder
    assert (path / "sub" / "model.bin").read_bytes() == b"\x00" * 100
    single = tmp_path / "w.pt"
    single.write_bytes(b"pt")
    assert Path(materialize(ship_model(str(single), 1 << 20) or {}, "w.pt")).read_bytes() == b"pt"
    assert ship_model(str(folder), 10) is None  # too large to ship: the nodes must have the path


def test_actor_info_without_a_size_lets_the_server_use_imgsz() -> None:
    info = ActorInfo("placeholder", {0: "placeholder"}, True, None, [])
    assert getattr(info, "imgsz", (320, 320)) == (320, 320)
    assert getattr(info, "input_shapes", "default") == "default"
    sized = ActorInfo("m", {0: "a"}, False, (320, 320), [(320, 320), (256, 320)])
    assert sized.imgsz == (320, 320) and sized.input_shapes == [(320, 320), (256, 320)]
