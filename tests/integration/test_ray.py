"""--executor ray for real: a local Ray and a two-node ray.cluster_utils.Cluster on loopback, the COCO model,
fair service over two actors, and an actor SIGKILLed mid-run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.helpers import COCO_MODEL, ROOT, free_port, require, running_server
from tests.integration.wire import EOF, Wire, bus_jpeg, frame, is_bus, metrics, settled, stats, wait_for

ray = pytest.importorskip("ray", reason="--executor ray needs Ray: pip install -r requirements-ray.txt")

RAY_ARGS = ("--executor", "ray", "--ray-num-cpus", "1")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One local Ray (started and stopped by the server) with two actors for the whole module."""
    require(COCO_MODEL)
    with running_server(tmp_path_factory.mktemp("ray"), *RAY_ARGS, workers=2, timeout=180) as handle:
        yield handle


class Camera(threading.Thread):
    """A camera sending bus.jpg: lossless in lock-step with `window` frames in flight, or real-time at `fps`
    without waiting; it records every answer by frame id."""

    def __init__(self, port: int, name: str, *, lossless: bool, window: int = 2, fps: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port, self.name_, self.lossless, self.window, self.fps = port, name, lossless, window, fps
        self.answers: dict[int, list[dict[str, Any]]] = {}
        self.sent = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        image = bus_jpeg()
        try:
            with Wire(self.port) as w:
                w.hello(self.name_, drop=not self.lossless)
                if self.lossless:
                    while not self.halt.is_set():
                        while self.sent - len(self.answers) < self.window:
                            w.send(frame(self.name_, self.sent, image))
                            self.sent += 1
                        self._note(w.recv(timeout=60))
                else:
                    next_at = time.monotonic()
                    while not self.halt.is_set():
                        w.send(frame(self.name_, self.sent, image))
                        self.sent += 1
                        next_at += 1.0 / self.fps
                        while (left := next_at - time.monotonic()) > 0:
                            try:
                                self._note(w.recv(timeout=left))
                            except TimeoutError:
                                break
                while len(self.answers) < self.sent:  # every frame sent gets its one answer
                    self._note(w.recv(timeout=60))
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def _note(self, msg: Any) -> None:
        assert msg != EOF, "server closed the connection"
        assert msg["type"] in ("result", "dropped"), msg
        self.answers.setdefault(msg["frame_id"], []).append(msg)

    def results(self) -> list[dict[str, Any]]:
        return [m for ms in self.answers.values() for m in ms if m["type"] == "result"]

    def stop(self) -> None:
        self.halt.set()
        self.join(90)
        assert not self.is_alive(), f"{self.name_} did not finish"
        assert self.error is None, f"{self.name_} failed: {self.error!r}"
        assert sorted(self.answers) == list(range(self.sent)), "a frame went unanswered"
        assert all(len(ms) == 1 for ms in self.answers.values()), "a frame was answered twice"


def test_local_ray_serves_bus_with_its_timings(server):
    with Wire(server.tcp_port) as w:
        w.hello("bus", drop=False)
        w.send(frame("bus", 0, bus_jpeg()))
        msg = w.recv(60)
    assert is_bus(msg), msg
    assert set(msg["timings"]) == {"queue_ms", "decode_ms", "infer_ms", "transfer_ms"}
    assert msg["timings"]["transfer_ms"] >= 0 and msg["timings"]["infer_ms"] > 0
    snap = stats(server)
    assert snap["executor"] == "ray" and snap["lanes"] == 2
    assert [a["state"] for a in snap["actors"]] == ["alive", "alive"]
    assert all(a["pid"] > 0 and a["pid"] != server.proc.pid for a in snap["actors"])
    assert "transfer_ms" in snap["timings_ms"]
    m = metrics(server)
    assert m[("visionstream_actors_lost_total", ())] == 0
    assert ("visionstream_stage_seconds_count", (("stage", "transfer"),)) in m


def _allowed_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of process `pid`: the CPUs it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that left meanwhile
            out[int(tid)] = os.sched_getaffinity(int(tid))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two usable cores")
def test_the_actors_inference_threads_are_not_pinned_to_one_core(server):
    """OpenVINO pins its threads while they infer, as if its process were the node's only one: two actors would
    both sit on the first core, each at half speed, with the second core idle."""
    mine = os.sched_getaffinity(0)
    pids = [a["pid"] for a in stats(server)["actors"]]
    cam = Camera(server.tcp_port, "pin", lossless=True, window=4)  # keeps both actors inferring
    cam.start()
    narrowed: dict[int, set[int]] = {}
    try:
        time.sleep(1.0)
        for _ in range(40):
            for pid in pids:
                with contextlib.suppress(OSError):  # a thread that left meanwhile
                    narrowed.update({tid: cpus for tid, cpus in _allowed_cpus(pid).items() if cpus != mine})
            time.sleep(0.05)
    finally:
        cam.stop()
    assert len(cam.results()) > 10
    assert not narrowed, f"actor threads pinned while inferring: {narrowed} (the node allows {mine})"


def test_four_streams_over_two_actors_get_fair_service(server):
    cams = [Camera(server.tcp_port, f"cam{i}", lossless=False, fps=15) for i in range(4)]
    for cam in cams:
        cam.start()
    time.sleep(8)
    for cam in cams:
        cam.stop()
    served = [len(c.results()) for c in cams]
    assert min(served) >= 5, served
    assert min(served) >= 0.7 * max(served), f"unfair shares: {served}"
    for cam in cams:  # newest wins: what is not served is superseded, nothing else
        reasons = Counter(m.get("reason") for ms in cam.answers.values() for m in ms if m["type"] == "dropped")
        assert set(reasons) <= {"superseded"}, reasons
        assert all(is_bus(r) for r in cam.results())
    settled(server)


def test_a_killed_actor_loses_no_frame_and_the_stream_goes_on(server):
    before = stats(server)
    victim = before["actors"][0]
    cams = [Camera(server.tcp_port, f"loss{i}", lossless=True, window=2) for i in range(2)]
    for cam in cams:
        cam.start()
    wait_for(lambda: all(len(c.results()) >= 3 for c in cams), 60, "results before the kill")
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = sum(c.sent for c in cams)
    snap = wait_for(lambda: (s := stats(server))["actor_restarts"] > before["actor_restarts"] and s, 90,
                    "the killed actor's restart")
    wait_for(lambda: sum(len(c.results()) for c in cams) >= killed_at + 6, 60, "results after the kill")
    for cam in cams:
        cam.stop()
    lost = [m for c in cams for ms in c.answers.values() for m in ms if m.get("reason") == "worker_lost"]
    others = [m for c in cams for ms in c.answers.values() for m in ms if m["type"] == "dropped"
              and m.get("reason") != "worker_lost"]
    assert not others, others
    assert all(is_bus(r) for c in cams for r in c.results())
    snap = settled(server)
    assert snap["actors_lost"] == before["actors_lost"] + 1
    assert snap["drops_by_reason"].get("worker_lost", 0) - before["drops_by_reason"].get("worker_lost", 0) == len(lost)
    assert len(lost) == 1  # the frame in flight on the killed actor (--lanes 1); its lanes took no more until back
    actor = snap["actors"][0]
    assert actor["state"] == "alive" and actor["pid"] != victim["pid"] and actor["restarts"] == 1
    assert metrics(server)[("visionstream_actor_restarts_total", ())] >= 1
    assert server.log().count("Ray actor 0 (pid") == 1  # logged once, however many frames it held


def test_two_node_cluster_spreads_the_actors_and_serves_bus(tmp_path, monkeypatch):
    require(COCO_MODEL)
    from ray.cluster_utils import Cluster

    # The cluster's raylets start the actor processes: they must import this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    store = 100 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        model = tmp_path / "weights" / COCO_MODEL.name  # a copy the test can take away
        shutil.copytree(COCO_MODEL, model)
        with running_server(tmp_path, "--executor", "ray", "--ray-address", cluster.address, model=model, workers=2,
                            timeout=180) as srv:
            snap = stats(srv)
            assert len({a["node_id"] for a in snap["actors"]}) == 2, snap["actors"]
            # Joined to a cluster, the front shipped the weights through the object store: an actor restarted
            # where the path is gone loads them from there.
            shutil.rmtree(model)
            os.kill(snap["actors"][0]["pid"], signal.SIGKILL)  # idle: the front learns of it from the next frames
            with Wire(srv.tcp_port) as w:
                w.hello("bus", drop=False)
                fid, answers = 0, []
                deadline = time.monotonic() + 90
                while stats(srv)["actor_restarts"] < 1:  # two frames at a time: both actors get one
                    assert time.monotonic() < deadline, "the restart without the path was not seen"
                    for _ in range(2):
                        w.send(frame("bus", fid, bus_jpeg()))
                        fid += 1
                    answers += [w.recv(90), w.recv(90)]
                assert all(is_bus(m) or m.get("reason") == "worker_lost" for m in answers), answers
                for _ in range(4):
                    w.send(frame("bus", fid, bus_jpeg()))
                    fid += 1
                answers = [w.recv(60) for _ in range(4)]
            assert all(is_bus(m) for m in answers), answers
            snap = stats(srv)
            assert [a["state"] for a in snap["actors"]] == ["alive", "alive"] and snap["actors_lost"] == 1
        # A joined cluster is left running: the server only releases its actors.
        assert cluster.head_node.remaining_processes_alive()
    finally:
        cluster.shutdown()


def _run_server(tmp_path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "server.py"), "--tcp-port", "0", "--api-port", "0",
                           "--log-dir", str(tmp_path / "logs"), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_cluster_is_one_line_and_exit_2_at_once(tmp_path):
    started = time.monotonic()
    proc = _run_server(tmp_path, "--executor", "ray", "--placeholder", "--ray-address", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot reach the Ray cluster" in errors[0], out


def test_without_ray_installed_the_server_names_the_install_command(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from visionstream.cli.server import main\n"
            f"sys.exit(main({['--executor', 'ray', '--placeholder', '--tcp-port', '0', '--api-port', '0', '--log-dir', str(tmp_path / 'logs')]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "pip install 'visionstream[ray]'" in out


@pytest.mark.parametrize(("args", "words"), [
    (("--placeholder", "--ray-num-gpus", "1"), "need 2 GPU(s) but the Ray cluster has 0"),
    (("--model", "corrupt.pt"), "cannot load --model corrupt.pt"),
])
def test_actors_that_cannot_be_placed_or_loaded_are_one_line_and_exit_2(tmp_path, args, words):
    (tmp_path / "corrupt.pt").write_bytes(bytes(range(256)) * 64)
    proc = _run_server(tmp_path, "--executor", "ray", "--workers", "2", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and words in errors[0], out
    assert not [line for line in out.splitlines() if "ray" in line.lower() and "visionstream" not in line], out


def test_infer_timeout_kills_and_restarts_the_actor(tmp_path):
    import cv2
    import numpy as np

    # A 4000x4000 PNG (12 MB: gradients and a little noise) takes about 0.6 s to decode here, far beyond
    # --infer-timeout 0.1; a 32x32 one microseconds.
    ramp = np.tile((np.arange(4000) % 256).astype(np.uint8), (4000, 1))
    noise = np.random.default_rng(0).integers(0, 2, (4000, 4000, 3), dtype=np.uint8)
    big = cv2.imencode(".png", np.dstack([ramp, ramp.T, ramp]) + noise)[1].tobytes()
    small = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    with running_server(tmp_path, "--executor", "ray", "--placeholder", "--full-decode", "--infer-timeout", "0.1",
                        model="unused.pt", workers=1, timeout=180) as srv:
        pid = stats(srv)["actors"][0]["pid"]
        with Wire(srv.tcp_port) as w:
            w.hello("cam", drop=False)
            w.send(frame("cam", 0, big))
            w.send(frame("cam", 1, small))
            first, second = w.recv(30), w.recv(90)
        assert (first["type"], first["reason"]) == ("dropped", "timeout"), first
        assert "--infer-timeout" in first["message"]
        assert second["type"] == "result" and second["frame_id"] == 1, second
        snap = settled(srv)
        assert snap["infer_timeouts"] == 1 and snap["actors_lost"] == 1 and snap["actor_restarts"] == 1
        assert snap["actors"][0]["pid"] != pid and snap["actors"][0]["state"] == "alive"
