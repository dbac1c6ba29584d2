"""Per-stream object tracking with ultralytics' own ByteTrack / BoT-SORT, fed in frame order with the real frame gap."""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

import numpy as np

from visionstream.wire.errors import ConfigError


class Tracking(str, Enum):
    """--track: which ultralytics tracker each stream gets (`off`: none, results carry no `track_id`)."""

    OFF = "off"
    BYTETRACK = "bytetrack"
    BOTSORT = "botsort"


# A frame's tracker step waits at most this long for the earlier frames of its stream still in other lanes;
# past it, it goes first and the late earlier frame is answered with `track_id` null (never a rewind).
ORDER_WAIT_S: Final = 1.0
# BoT-SORT's global motion compensation (sparse optical flow on every frame) is for moving cameras; the
# server's cameras are mostly fixed, and it costs lane time per frame (docs/BENCHMARKS.md), so it is off
# unless a --tracker-config turns it on (then the lane passes the decoded image).
SERVER_DEFAULTS: Final[dict[str, dict[str, Any]]] = {"botsort": {"gmc_method": "none"}}


def _require_lap() -> None:
    """ultralytics' matching module pip-installs `lap` at import when it is missing: never at run time here."""
    if importlib.util.find_spec("lap") is None:
        raise ConfigError("--track needs the 'lap' package (linear assignment), which is not installed: "
                          "pip install -r requirements.txt")
    import lap

    if not getattr(lap, "__version__", None):
        raise ConfigError("--track needs the 'lap' package, but the 'lap' found is not it (no __version__): "
                          "pip install -r requirements.txt")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--tracker-config {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--tracker-config {path}: expected a YAML mapping of tracker settings")
    return data


@dataclass(frozen=True)
class TrackerSettings:
    """One tracker kind and its ultralytics settings (the keys of its YAML), shared by every stream's tracker."""

    kind: Tracking
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def track_buffer(self) -> int:
        return int(self.args.get("track_buffer", 30))

    @property
    def gmc(self) -> bool:
        """BoT-SORT with camera-motion compensation: its step needs the image."""
        return self.kind is Tracking.BOTSORT and str(self.args.get("gmc_method", "none")).lower() != "none"

    def build(self) -> Any:
        from ultralytics.trackers import BOTSORT, BYTETracker
        from ultralytics.utils import IterableSimpleNamespace

        cls = BOTSORT if self.kind is Tracking.BOTSORT else BYTETracker
        return cls(IterableSimpleNamespace(**self.args))


def load_tracker_settings(kind: Tracking | str, path: Path | None = None) -> TrackerSettings | None:
    """--track and --tracker-config -> settings (None when off), checked once at start-up: ConfigError (one line)
    for a missing `lap`, an unreadable or unknown setting, or a tracker that cannot be built."""
    kind = Tracking(kind)
    if kind is Tracking.OFF:
        return None
    _require_lap()  # before ultralytics.trackers is imported
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise ConfigError("--track needs ultralytics, which is not installed")
    args = {**_yaml(Path(spec.origin).parent / "cfg" / "trackers" / f"{kind.value}.yaml"),
            **SERVER_DEFAULTS.get(kind.value, {})}
    if path is not None:
        user = _yaml(path)
        unknown = sorted(set(user) - set(args))
        if unknown:
            raise ConfigError(f"--tracker-config {path}: unknown {kind.value} setting(s) {', '.join(unknown)}")
        if user.get("tracker_type", kind.value) != kind.value:
            raise ConfigError(f"--tracker-config {path} is for tracker_type {user['tracker_type']!r}, "
                              f"but --track is {kind.value}")
        args.update(user)
    if args.get("with_reid"):
        raise ConfigError("--tracker-config: with_reid is not supported (the server has no ReID features)")
    settings = TrackerSettings(kind, args)
    try:  # a probe: bad values fail here, once, not on every stream
        StreamTracker(settings, {0: "probe"}).step(1, np.zeros((4, 4, 3), np.uint8),
                                                   [{"cls": 0, "conf": 0.9, "bbox": [0, 0, 2, 2]}], 0)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--track {kind.value}: the tracker cannot be built from its settings "
                          f"({type(exc).__name__}: {exc})") from None
    return settings


class _Detections:
    """What ultralytics' trackers read of a detection set (as its `Boxes`): conf, cls, xywh, xyxy, boolean indexing."""

    def __init__(self, rows: np.ndarray) -> None:
        self.data = rows  # (N, 6): x1, y1, x2, y2, conf, cls

    @property
    def xyxy(self) -> np.ndarray:
        return self.data[:, :4]

    @property
    def xywh(self) -> np.ndarray:
        xy = self.data[:, :4]
        return np.stack([(xy[:, 0] + xy[:, 2]) / 2, (xy[:, 1] + xy[:, 3]) / 2, xy[:, 2] - xy[:, 0],
                         xy[:, 3] - xy[:, 1]], axis=1)

    @property
    def conf(self) -> np.ndarray:
        return self.data[:, 4]

    @property
    def cls(self) -> np.ndarray:
        return self.data[:, 5]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> _Detections:
        return _Detections(self.data[index])


class StreamTracker:
    """One stream's tracker (any thread). Lane threads call `taken` when they take a frame, then `step` (or
    `forget` when the frame fails); steps run one at a time in the order the frames were received, each
    waiting (at most ORDER_WAIT_S) for the earlier frames still in other lanes.

    The gap: ultralytics counts every update as one frame, for its Kalman motion step and for `track_buffer`
    (frames a lost track is kept). A real-time stream under overload reaches the tracker at a fraction of
    its frame rate, so before a frame `k` frame ids after the last one tracked, every confirmed and lost
    track is predicted `k - 1` more steps and the tracker's frame count moves on by `k - 1` (bounded by
    track_buffer + 2, past which every lost track is gone anyway). This is the tracker's own predict step
    without association; an update with no detections instead would mark every track lost and remove the
    unconfirmed ones, so that under overload no new object could ever be confirmed.

    Order: a frame answered after a newer one of its stream was already tracked does not rewind the tracker:
    its detections carry `track_id` null. So does every frame after `close` (the stream is gone).
    """

    def __init__(self, settings: TrackerSettings, names: dict[int, str]) -> None:
        self.settings = settings
        self.names = names
        self._tracker = settings.build()
        self._cond = threading.Condition()
        self._taken: dict[int, float] = {}  # id(job) -> its receipt time, frames in lanes not yet stepped
        self._last_received = -1.0
        self._last_fid: int | None = None
        self._max_confirmed = 0  # ids are given in creation order and confirmed one update later (or never)
        self._closed = False
        self.steps = 0
        self.skipped = 0  # frames answered with track_id null (out of order, or closed)

    def taken(self, key: int, received: float) -> None:
        with self._cond:
            self._taken[key] = received

    def forget(self, key: int) -> None:
        """The frame will not be stepped (it failed): the later ones need not wait for it."""
        with self._cond:
            if self._taken.pop(key, None) is not None:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._taken.clear()
            self._tracker = None
            self._cond.notify_all()

    def step(self, frame_id: int, image: np.ndarray | None, detections: list[dict[str, Any]],
             received: float, key: int | None = None) -> list[str]:
        """Give each detection its `track_id` (int, or None while unconfirmed or out of order), in the image's
        pixels. Returns the labels of the tracks confirmed for the first time by this frame."""
        with self._cond:
            if key is not None:
                self._cond.wait_for(lambda: self._closed or key not in self._taken or not any(
                    r < received for r in self._taken.values()), ORDER_WAIT_S)
                registered = self._taken.pop(key, None) is not None
                self._cond.notify_all()
            else:
                registered = True
            if not registered or self._closed or received <= self._last_received:
                for d in detections:
                    d["track_id"] = None
                self.skipped += 1
                return []
            gap = frame_id - self._last_fid if self._last_fid is not None and frame_id > self._last_fid else 1
            self._last_received, self._last_fid = received, frame_id
            return self._update(detections, image, min(gap, self.settings.track_buffer + 2))

    def _update(self, detections: list[dict[str, Any]], image: np.ndarray | None, gap: int) -> list[str]:
        tracker = self._tracker
        for _ in range(gap - 1):  # the frames never tracked (superseded, or skipped by the client)
            pool = [t for t in tracker.tracked_stracks if t.is_activated] + tracker.lost_stracks
            tracker.multi_predict(pool)
            tracker.frame_id += 1
        if gap > 1:
            stale = [t for t in tracker.lost_stracks if tracker.frame_id - t.end_frame > tracker.max_frames_lost]
            for t in stale:
                t.mark_removed()
            tracker.lost_stracks = [t for t in tracker.lost_stracks if t not in stale]
            tracker.removed_stracks.extend(stale)
        rows = np.array([[*d["bbox"], d["conf"], d["cls"]] for d in detections], np.float32).reshape(-1, 6)
        out = tracker.update(_Detections(rows), image if self.settings.gmc else None)
        self.steps += 1
        for d in detections:
            d["track_id"] = None
        new: list[str] = []
        top = self._max_confirmed
        for row in out:
            tid, idx = int(row[4]), int(row[7])
            if 0 <= idx < len(detections):
                detections[idx]["track_id"] = tid
                if tid > self._max_confirmed:
                    new.append(str(detections[idx].get("label", self.names.get(int(row[6]), str(int(row[6]))))))
                    top = max(top, tid)
        self._max_confirmed = top
        return new
