"""Frame sources: opening errors as one-line messages, frame order and metadata, frame encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import asset
from visionstream.client.sources import (
    FolderSource,
    SourceError,
    SyntheticSource,
    VideoFileSource,
    WebcamSource,
    encode_frame,
    list_images,
    open_source,
)


def write_video(path: Path, frames: int = 6, size: tuple[int, int] = (64, 48), fourcc: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), i * 30, np.uint8))
    writer.release()
    return path


def one_line(exc: pytest.ExceptionInfo[SourceError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- folder


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as exc:
        FolderSource(tmp_path / "nope")
    assert "does not exist" in one_line(exc)


def test_empty_folder_names_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError) as exc:
        FolderSource(tmp_path)
    assert "contains no images" in one_line(exc) and ".jpg" in str(exc.value)


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "x.jpg"
    f.write_bytes(b"")
    with pytest.raises(SourceError, match="not a directory"):
        FolderSource(f)


def test_folder_reads_images_in_natural_order_with_file_names(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    for name in ("img10.png", "img2.png", "IMG1.JPG"):
        ok, buf = cv2.imencode(Path(name).suffix, img)
        assert ok
        (tmp_path / name).write_bytes(buf.tobytes())
    src = FolderSource(tmp_path)
    assert src.total == 3 and src.finite and src.lossless_default
    names = []
    while (frame := src.read()) is not None:
        assert frame.image.shape == (8, 8, 3)
        names.append(frame.meta["source"])
    assert names == ["IMG1.JPG", "img2.png", "img10.png"]


def test_unreadable_images_are_skipped_and_reported(tmp_path: Path) -> None:
    shutil.copy(asset("bus.jpg"), tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"definitely not a jpeg")
    src = FolderSource(tmp_path)
    frames = [src.read(), src.read()]
    assert frames[0] is not None and frames[0].meta == {"source": "a.jpg"}
    assert frames[1] is None
    assert src.skipped == ["b.jpg"]


def test_folder_of_only_broken_images_ends_even_when_looping(tmp_path: Path) -> None:
    (tmp_path / "b.jpg").write_bytes(b"broken")
    src = FolderSource(tmp_path, loop=True)
    assert src.read() is None


def test_folder_loop_restarts_and_counts_passes(tmp_path: Path) -> None:
    shutil.copy(asset("zidane.jpg"), tmp_path / "z.jpg")
    src = FolderSource(tmp_path, loop=True)
    assert src.total is None
    metas = [src.read().meta for _ in range(3)]  # type: ignore[union-attr]
    assert metas == [{"source": "z.jpg", "pass": p} for p in range(3)]


def test_list_images_ignores_subfolders(tmp_path: Path) -> None:
    (tmp_path / "sub.jpg").mkdir()
    shutil.copy(asset("bus.jpg"), tmp_path / "bus.jpg")
    assert [p.name for p in list_images(tmp_path)] == ["bus.jpg"]


# --------------------------------------------------------------------------- video and webcam


def test_missing_video_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as exc:
        VideoFileSource(tmp_path / "video.mp4")
    assert one_line(exc).startswith("Failed to open video source") and "no such file" in str(exc.value)


def test_garbage_video_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(SourceError) as exc:
        VideoFileSource(bad)
    assert one_line(exc).startswith(f"Failed to open video source {bad}")


def test_unopenable_camera_suggests_another_index() -> None:
    # No machine running the tests has 90 cameras; the message must carry the seed's hint.
    with pytest.raises(SourceError) as exc:
        WebcamSource(90)
    assert one_line(exc) == "Failed to open video source 90 (try --source 1 if you have more than one camera)"


def test_video_yields_every_frame_with_its_index(tmp_path: Path) -> None:
    src = VideoFileSource(write_video(tmp_path / "v.avi", frames=6))
    assert src.total == 6 and src.lossless_default
    metas = []
    while (frame := src.read()) is not None:
        assert frame.image.shape == (48, 64, 3)
        metas.append(frame.meta)
    src.close()
    assert metas == [{"frame_index": i} for i in range(6)]


def test_video_loop_rewinds(tmp_path: Path) -> None:
    with VideoFileSource(write_video(tmp_path / "v.avi", frames=3), loop=True) as src:
        metas = [src.read().meta for _ in range(7)]  # type: ignore[union-attr]
    assert [m["frame_index"] for m in metas] == [0, 1, 2, 0, 1, 2, 0]
    assert [m["pass"] for m in metas] == [0, 0, 0, 1, 1, 1, 2]


def test_open_source_dispatches_on_the_spec(tmp_path: Path) -> None:
    shutil.copy(asset("bus.jpg"), tmp_path / "bus.jpg")
    assert isinstance(open_source(str(tmp_path)), FolderSource)
    assert isinstance(open_source(str(write_video(tmp_path / "v.avi"))), VideoFileSource)
    with pytest.raises(SourceError, match="Failed to open video source 91"):
        open_source("91")


# --------------------------------------------------------------------------- synthetic and encoding


def test_synthetic_frames_have_the_requested_size_and_never_end() -> None:
    src = SyntheticSource(32, 24, seed=1)
    frames = [src.read() for _ in range(3)]
    assert all(f.image.shape == (24, 32, 3) and f.image.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0].image, frames[1].image)
    assert not src.finite and not src.lossless_default and src.total is None


def test_synthetic_rejects_a_zero_size() -> None:
    with pytest.raises(SourceError):
        SyntheticSource(0, 10)


def test_jpeg_encoding_round_trips_and_leaves_the_encoding_to_sniffing() -> None:
    img = cv2.imread(str(asset("bus.jpg")))
    payload, encoding, shape = encode_frame(img, "jpeg", 90)
    assert payload[:2] == b"\xff\xd8" and encoding is None and shape is None
    decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == img.shape


def test_raw_encoding_carries_the_shape() -> None:
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    payload, encoding, shape = encode_frame(img[:, ::-1], "raw")  # a non-contiguous view
    assert encoding == "raw" and shape == (2, 3, 3)
    assert np.array_equal(np.frombuffer(payload, np.uint8).reshape(shape), img[:, ::-1])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)])
def test_encoding_rejects_non_bgr_images(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_frame(bad)


def test_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_frame(np.zeros((4, 4, 3), np.uint8), "webp")
