"""The lanes of `--executor ray`: threads taking frames from the scheduler and sending them to Ray actors."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from visionstream.server.inference.actor import InferenceActor, ship_model
from visionstream.server.inference.api import DetectorSpec, InFlight
from visionstream.server.inference.models import one_line
from visionstream.server.lanes import TIMEOUT
from visionstream.server.replies import Replies
from visionstream.server.scheduler import Job, Scheduler
from visionstream.server.stats import Stats
from visionstream.wire.errors import ClusterUnavailable, ConfigError, ModelLoadError
from visionstream.wire.protocol import DEFAULT_MAX_PIXELS

log = logging.getLogger("visionstream.server")

WORKER_LOST: Final = "worker_lost"  # drop reason: the actor holding the frame died (killed, node lost)
INSTALL: Final = "pip install 'visionstream[ray]'  (or: pip install -r requirements-ray.txt)"
MAX_RESTARTS: Final = 16  # Ray restarts a dead actor this many times; then its lanes retire
PROBE_TIMEOUT: Final = 5.0  # seconds to reach --ray-address's head before giving up (ray.init would wait far longer)
READY_TIMEOUT: Final = 300.0  # seconds the actors have to be placed, load the model and warm up
RESTART_TIMEOUT: Final = 300.0  # seconds a lane waits for its restarted actor before retiring
RETRY_PERIOD: Final = 0.2  # seconds between a lane's questions to its restarting actor
LOCAL_OBJECT_STORE: Final = 256 * 2**20  # a local Ray's object store: frames in flight and the shipped model
SHIP_LIMIT: Final = 128 * 2**20  # weights up to this size go through the object store for nodes without the path


def import_ray() -> Any:
    """The ray module, or one line naming the install command."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail fast (ClusterUnavailable) when a host:port head cannot be reached at all."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"--ray-address {address!r} is not host:port (or 'auto')")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterUnavailable(f"cannot reach the Ray cluster at --ray-address {address}: "
                                 f"{exc.strerror or exc} (is `ray start --head` running there?)") from None


def connect(address: str | None, num_cpus: float) -> bool:
    """Join the cluster at `address`, or start a local Ray with room for `num_cpus` (None). True if started here."""
    ray = import_ray()
    # Ray's own lines stay off the console (its warnings repeat what the server says); its C++ crash handler would
    # print a stack trace on every SIGTERM, our normal shutdown.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR,
                               "configure_logging": True}
    if address is None:
        options.update(num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)), object_store_memory=LOCAL_OBJECT_STORE)
    else:
        if address not in ("auto", "local") and not address.startswith("ray://"):
            probe(address)
        options.update(address=address)
        options.pop("include_dashboard")
    try:
        ray.init(**options)
    except Exception as exc:  # ConnectionError, a version mismatch, no cluster under 'auto'
        where = "start a local Ray" if address is None else f"join the Ray cluster at --ray-address {address}"
        raise ClusterUnavailable(f"cannot {where}: {one_line(exc)}") from None
    return address is None


@dataclass
class ActorInfo:
    """What the server reads of a loaded model (as of a local Detector), as one actor reported it."""

    model_name: str
    names: dict[int, str]
    placeholder: bool
    imgsz: tuple[int, int] | None
    input_shapes: list[tuple[int, int]]

    def __post_init__(self) -> None:
        if self.imgsz is None:
            del self.imgsz  # the server then uses --imgsz, as for a detector without one
        if not self.input_shapes:
            del self.input_shapes


@dataclass
class _Actor:
    """One Ray actor and what its lanes know of it: which incarnation (its restarts get new ones), where."""

    index: int
    handle: Any
    pid: int = 0
    node: str = ""
    node_id: str = ""  # Ray's node id (its first 12 hex digits)
    incarnation: str = ""
    restarts: int = 0
    state: str = "loading"  # alive, lost (restarting), dead (restarts exhausted)
    lost: set[str] = field(default_factory=set)  # incarnations whose loss was counted and logged
    lock: threading.Lock = field(default_factory=threading.Lock)

    def adopt(self, info: dict[str, Any]) -> None:
        """The incarnation that answered `ready` (the first, or a restarted one) is the one now serving."""
        self.pid, self.node, self.node_id, self.incarnation = info["pid"], info["node"], info["node_id"], \
            info["incarnation"]
        self.state = "alive"

    def snapshot(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "node": self.node, "node_id": self.node_id, "state": self.state,
                "restarts": self.restarts}


class _Slot:
    """One lane: a thread sending one frame at a time to its actor (an actor has --lanes of them)."""

    def __init__(self, index: int, actor: _Actor) -> None:
        self.index = index
        self.actor = actor
        self.job: Job | None = None
        self.retired = False
        self.future: asyncio.Future | None = None


class RayLanes:
    """`actors` Ray actors, each with `per_actor` lanes (frames in flight to it). A lane thread takes its next
    frame from the scheduler exactly as a thread lane does (fairness and newest-wins stay in the front), ships the
    client's encoded bytes, and posts the answer with the actor's timings and the transfer time. An actor that dies
    has its in-flight frames answered `worker_lost`; Ray restarts it (MAX_RESTARTS) and its lanes wait for it while
    the other actors go on. A frame outliving `infer_timeout` is answered `timeout` and its actor killed (restarted)."""

    def __init__(self, scheduler: Scheduler, replies: Replies, stats: Stats, post: Callable[..., Any],
                 inflight: InFlight, *, actors: int, per_actor: int, address: str | None = None,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, infer_timeout: float = 0.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.scheduler = scheduler
        self.replies = replies
        self.stats = stats
        self.post = post
        self.inflight = inflight  # unused by actors (each counts its own); kept for the lanes' common shape
        self.actors_wanted, self.per_actor = actors, per_actor
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.infer_timeout = infer_timeout
        self.max_pixels = max_pixels
        self.decode_target: tuple[int, int] | None = None
        self._ray: Any = None
        self._started_ray = False
        self._actors: list[_Actor] = []
        self._slots: list[_Slot] = []
        self._pool: ThreadPoolExecutor | None = None
        self._busy_lock = threading.Lock()
        self._model_ref: Any = None  # the shipped weights, alive while actors may restart

    def __len__(self) -> int:
        return sum(not s.retired for s in self._slots) if self._slots else self.actors_wanted * self.per_actor

    @property
    def stuck(self) -> int:
        return 0  # a hung actor is killed, not abandoned: nothing stays stuck

    def actors(self) -> list[dict[str, Any]]:
        """/stats: each actor's pid, node, state and restarts."""
        return [a.snapshot() for a in self._actors]

    async def load(self, spec: DetectorSpec, resolved: str | None, count: int, nice: int) -> list[ActorInfo]:
        """Reach the cluster, start the actors, and wait until each has loaded and warmed its model. `count`
        is the lanes in all (actors x per_actor). A model that does not load is a ModelLoadError of one line."""
        assert count == self.actors_wanted * self.per_actor
        self._started_ray = await asyncio.to_thread(connect, self.address, self.actors_wanted * self.num_cpus)
        self._ray = import_ray()
        try:
            return await asyncio.to_thread(self._load, spec, resolved, nice)
        except BaseException:
            self.close()
            raise

    def _load(self, spec: DetectorSpec, resolved: str | None, nice: int) -> list[ActorInfo]:
        ray = self._ray
        have = ray.cluster_resources()
        for name, per in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            if per and have.get(name, 0.0) < per * self.actors_wanted:
                raise ClusterUnavailable(
                    f"--workers {self.actors_wanted} actors x --ray-num-{name.lower()}s {per:g} need "
                    f"{per * self.actors_wanted:g} {name}(s) but the Ray cluster has {have.get(name, 0.0):g}")
        shipped: list[Any] = []
        # A local Ray's actors share this node's disk; a cluster's nodes may not have the path.
        if self.address is not None and resolved is not None and (data := ship_model(resolved, SHIP_LIMIT)):
            self._model_ref = ray.put(data)
            shipped = [self._model_ref]  # in a list: only an actor without the path fetches it
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=MAX_RESTARTS,
                            max_task_retries=0, max_concurrency=1)(InferenceActor)
        spec = dataclasses.replace(spec, pin_threads=False)  # several actors share a node's cores
        self._actors = [_Actor(i, remote.remote(spec, resolved, shipped, nice))
                        for i in range(self.actors_wanted)]
        refs = [a.handle.ready.remote() for a in self._actors]
        _ready, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT)
        if pending:
            raise ClusterUnavailable(f"{len(pending)} of {len(refs)} Ray actor(s) not ready after "
                                     f"{READY_TIMEOUT:g}s (placed nowhere, or still loading the model)")
        infos = []
        for actor, ref in zip(self._actors, refs, strict=True):
            try:
                info = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = str(getattr(exc, "cause", exc) or exc).strip().splitlines()
                raise ModelLoadError(cause[-1] if cause else f"cannot load --model {spec.model}") from None
            except ray.exceptions.RayActorError as exc:
                raise ClusterUnavailable(f"Ray actor {actor.index} died while loading the model: "
                                         f"{one_line(exc)}") from None
            actor.adopt(info)
            infos.append(ActorInfo(info["model_name"], info["names"], info["placeholder"], info["imgsz"],
                                   info["input_shapes"]))
        log.info("%d Ray actor(s) ready (%s), %d frame(s) in flight each", len(self._actors),
                 ", ".join(f"pid {a.pid} on {a.node}" for a in self._actors), self.per_actor)
        return infos

    def start(self, _infos: list[Any]) -> None:
        loop = asyncio.get_running_loop()
        self._slots = [_Slot(i * self.per_actor + j, a) for i, a in enumerate(self._actors)
                       for j in range(self.per_actor)]
        self._pool = ThreadPoolExecutor(len(self._slots), thread_name_prefix="ray-lane")
        for slot in self._slots:
            slot.future = loop.run_in_executor(self._pool, self._run, slot)

    async def stop(self, grace: float) -> int:
        """Once the scheduler is closed: wait up to `grace` s for the frames in flight, then answer the rest
        `shutdown`. Returns how many were given up."""
        futures = [s.future for s in self._slots if s.future is not None]
        if not futures:
            return 0
        _done, pending = await asyncio.wait(futures, timeout=grace)
        given_up = 0
        for slot in self._slots:
            if slot.future in pending and (job := slot.job) is not None:
                self.replies.abandon(job)
                given_up += 1
        return given_up

    def close(self) -> None:
        """Release the actors; stop Ray if this server started it (not a cluster it joined)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return
        for actor in self._actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:
                log.debug("killing Ray actor %d failed", actor.index, exc_info=True)
        if self._started_ray:
            ray.shutdown()

    # ------------------------------------------------------------------ lane threads

    def _run(self, slot: _Slot) -> None:
        while (job := self.scheduler.wait_take()) is not None:
            with self._busy_lock:
                self.stats.workers_busy += 1
            try:
                self._serve(slot, job)
            finally:
                with self._busy_lock:
                    self.stats.workers_busy -= 1
            if slot.actor.state != "alive" and not slot.retired:
                self._await_restart(slot)
            if slot.retired and any(not s.retired for s in self._slots):
                self._update_lanes()
                return  # the other actors serve on

    def _serve(self, slot: _Slot, job: Job) -> None:
        """One frame to the actor and its one answer back; the frame is given back to the scheduler once."""
        ray, actor, replies = self._ray, slot.actor, self.replies
        slot.job = job
        seconds: float | None = None
        answer: tuple[Any, ...]
        incarnation = actor.incarnation
        sent = time.perf_counter()
        try:
            if slot.retired:
                answer = (replies.failed, job, "inference_error",
                          f"no Ray actor is left (each died {MAX_RESTARTS + 1} times): restart the server")
            else:
                f = job.frame
                ref = actor.handle.detect.remote(f.image, f.encoding, f.shape, self.decode_target, self.max_pixels)
                ready, _ = ray.wait([ref], timeout=self.infer_timeout or None)
                if not ready:
                    self._timed_out(actor, incarnation)
                    answer = (replies.drop, job, TIMEOUT, f"decode and inference outlived --infer-timeout "
                                                          f"({self.infer_timeout:g} s): its Ray actor is restarted")
                else:
                    served_by, pid, out = ray.get(ref)
                    back = time.perf_counter()
                    if served_by != incarnation:
                        self._unseen_restart(actor, incarnation, served_by, pid)
                    if out[0] == "result":
                        _kind, detections, decode, infer_s, size, own = out
                        seconds = decode + infer_s
                        transfer = max(0.0, (back - sent) - own)
                        t1 = sent + decode
                        answer = (replies.result, job, detections, sent, t1, t1 + infer_s, tuple(size), (),
                                  transfer)
                    else:
                        answer = (replies.failed, job, *out[1:])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._lost(actor, incarnation, exc)
            answer = (replies.drop, job, WORKER_LOST, f"the Ray actor serving it was lost ({type(exc).__name__})")
        except Exception as exc:  # anything else Ray raises: the frame still gets its one answer
            log.exception("Ray lane %d failed on %s frame %s", slot.index, job.stream.name, job.frame.frame_id)
            answer = (replies.failed, job, "inference_error", f"{type(exc).__name__}: {exc}")
        slot.job = None
        try:
            self.scheduler.done(job, seconds)
        finally:
            self.post(*answer)

    def _lost(self, actor: _Actor, incarnation: str, exc: BaseException) -> None:
        """Count and log an actor's death once, however many of its frames were in flight."""
        with actor.lock:
            if incarnation in actor.lost:
                return
            actor.lost.add(incarnation)
            actor.state = "lost"
        self.post(self.stats.actor_lost)
        log.warning("Ray actor %d (pid %d on %s) lost: %s; its frames in flight are answered '%s', Ray restarts "
                    "it and the other actors serve on", actor.index, actor.pid, actor.node,
                    one_line(exc), WORKER_LOST)

    def _unseen_restart(self, actor: _Actor, old: str, new: str, pid: int) -> None:
        """A frame came back from a newer incarnation than the lane knew: the actor died while none of its frames
        was in flight, and Ray restarted it (a frame sent meanwhile waited for the restart)."""
        info: dict[str, Any] = {"pid": pid, "incarnation": new, "node": actor.node, "node_id": actor.node_id}
        try:  # where it runs now (another node, if its node was lost)
            info = self._ray.get(actor.handle.ready.remote(), timeout=RETRY_PERIOD * 50)
        except Exception:
            log.debug("Ray actor %d: no ready() after its restart", actor.index, exc_info=True)
        with actor.lock:
            if actor.incarnation != old:  # another lane saw to it
                return
            lost_pid = actor.pid
            actor.lost.add(old)
            actor.adopt(info)
            actor.restarts += 1
        self.post(self.stats.actor_lost)
        self.post(self.stats.actor_restarted)
        log.warning("Ray actor %d (pid %d on %s) was lost with no frame in flight; Ray restarted it (pid %d)",
                    actor.index, lost_pid, actor.node, pid)

    def _timed_out(self, actor: _Actor, incarnation: str) -> None:
        with actor.lock:
            first = incarnation not in actor.lost
            actor.lost.add(incarnation)
            actor.state = "lost"
        if not first:
            return
        self.post(self.stats.infer_timeout)
        self.post(self.stats.actor_lost)  # killed below: its other frames in flight are answered worker_lost
        log.warning("Ray actor %d (pid %d on %s): a frame outlived --infer-timeout %g s: answered '%s', the actor is "
                    "killed and restarted", actor.index, actor.pid, actor.node, self.infer_timeout, TIMEOUT)
        try:
            self._ray.kill(actor.handle, no_restart=False)
        except Exception:
            log.debug("killing Ray actor %d failed", actor.index, exc_info=True)

    def _await_restart(self, slot: _Slot) -> None:
        """After a loss: wait for the restarted actor (taking no frames the others could serve meanwhile);
        retire this lane when it does not come back."""
        ray, actor = self._ray, slot.actor
        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            # A call queued on the dying incarnation fails too: ask again until the restarted one answers.
            try:
                info = ray.get(actor.handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except Exception as exc:
                if self.scheduler.closed:
                    return
                if time.monotonic() < deadline and not isinstance(exc, ray.exceptions.RayTaskError) \
                        and actor.restarts < MAX_RESTARTS:  # then Ray gives up on it
                    time.sleep(RETRY_PERIOD)
                    continue
                with actor.lock:
                    first, actor.state = actor.state != "dead", "dead"
                if first:
                    log.error("Ray actor %d did not come back (%s): its lanes retire%s", actor.index,
                              type(exc).__name__, "" if any(s.actor.state != "dead" for s in self._slots)
                              else "; no actor is left, frames are answered 'inference_error' (restart the server)")
                slot.retired = True
                return
        with actor.lock:
            if info["incarnation"] == actor.incarnation:
                if actor.state == "lost" and actor.incarnation not in actor.lost:
                    actor.state = "alive"
                return
            actor.adopt(info)
            actor.restarts += 1
        self.post(self.stats.actor_restarted)
        log.info("Ray actor %d restarted (pid %d on %s)", actor.index, actor.pid, actor.node)

    def _update_lanes(self) -> None:
        def update() -> None:
            self.stats.lanes = self.scheduler.lanes = len(self)
        self.post(update)
