"""What predict reads: image files, folders of them and videos, as named RGB frames.

A frame's `name` is the file's stem (a video frame adds its index); a name already taken in the run gets
`_1`, `_2`, ... in input order. Unreadable inputs are skipped and listed, never fatal.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.errors import ConfigError
from tasks.images import load_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


@dataclass
class Frame:
    name: str          # stem of the files written for it, unique within a run
    source: str        # the image file name, or "<video name>#frame=<index>"
    image: np.ndarray  # uint8 [H, W, 3] RGB
    path: str = ""     # the input file as given


def read_video(path: Path, stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Every `stride`-th frame (0, stride, 2 stride, ...) of a video, decoded by OpenCV."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"video {path} cannot be opened by OpenCV; expected a readable video file "
                         f"({', '.join(sorted(VIDEO_SUFFIXES))}).")
    index = kept = 0
    try:
        while max_frames is None or kept < max_frames:
            ok = capture.grab()
            if not ok:
                break
            if index % stride == 0:
                ok, frame = capture.retrieve()
                if not ok:
                    break
                kept += 1
                yield Frame(f"{path.stem}_frame{index:06d}", f"{path.name}#frame={index}",
                            cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), str(path))
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ValueError(f"video {path} has no frames OpenCV can decode.")


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} holds no images or videos; expected files ending in "
                         f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}.")
    return files


def iter_inputs(inputs: Sequence[str | Path], video_stride: int = 1, max_frames: int | None = None,
                skipped: list[dict[str, str]] | None = None) -> Iterator[Frame]:
    """Images, folders (their images and videos, not recursive) and videos, in the order given. An image
    that cannot be decoded is skipped with a warning (and appended to `skipped`)."""
    if video_stride < 1:
        raise ConfigError(f"video_stride={video_stride} must be a positive integer.")
    used: set[str] = set()

    def unique(name: str) -> str:
        """The name, or name_1, name_2, ...: the first not yet used in this run (case-insensitively, for
        file systems that fold case), so names never collide and the same inputs always get the same ones."""
        candidate, n = name, 0
        while candidate.casefold() in used:
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate.casefold())
        return candidate

    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist; expected an image, a folder or a video.")
        for file in _files(path) if path.is_dir() else [path]:
            suffix = file.suffix.lower()
            if suffix in VIDEO_SUFFIXES:
                for frame in read_video(file, video_stride, max_frames):
                    frame.name = unique(frame.name)
                    yield frame
            elif suffix in IMAGE_SUFFIXES:
                try:
                    image = load_rgb(file)
                except (OSError, ValueError) as err:
                    log.warning("skipping %s: %s", file, err)
                    if skipped is not None:
                        skipped.append({"path": str(file), "reason": str(err)})
                    continue
                yield Frame(unique(file.stem), file.name, image, str(file))
            else:
                raise ValueError(f"input {file} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 f"nor a video ({', '.join(sorted(VIDEO_SUFFIXES))}).")


def batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
