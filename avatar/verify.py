"""`vasa-avatar verify FILE`: is this image or video marked by VASA Avatar, and by which install, when?"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import av
import av.error
import numpy as np
from PIL import Image, UnidentifiedImageError

from avatar.errors import AvatarError
from avatar.watermark import Z_THRESHOLD, Accumulator, Detection, detect_accumulated, false_alarm_probability

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_FRAMES = 80  # 2 s at 40 FPS: measured enough for every attack in benchmarks/watermark.py
RUN = 8  # consecutive frames decoded after each seek in a long video


def verify_file(path: str | os.PathLike, *, max_frames: int = MAX_FRAMES) -> Detection:
    """Looks for the watermark in an image or a video (up to `max_frames` frames spread over it)."""
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"file not found: {path}")
    if path.is_dir():
        raise AvatarError(f"{path} is a folder; give an image or video file")
    if path.stat().st_size == 0:
        raise AvatarError(f"{path} is empty (0 bytes)")
    acc = Accumulator()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        acc.add(_read_image(path))
    else:
        for frame in _video_frames(path, max_frames):
            acc.add(frame)
    if acc.frames == 0:
        raise AvatarError(f"{path}: no video frame could be decoded")
    return detect_accumulated(acc)


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.seek(0)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise AvatarError(f"{path} is not a readable image ({_reason(exc)}); use png, jpg or webp") from None


def _video_frames(path: Path, max_frames: int) -> Iterator[np.ndarray]:
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AvatarError(f"{path} is not a readable image or video ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise AvatarError(f"{path} has no video track and is not an image")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / av.time_base
        rate = float(stream.average_rate or 0)
        total = stream.frames or (int(seconds * rate) if seconds and rate else 0)
        try:
            if total <= 4 * max_frames or not seconds:
                yield from _evenly(container, stream, total, max_frames)
            else:
                yield from _seeking(container, stream, seconds, max_frames)
        except av.error.FFmpegError as exc:  # a damaged file: whatever decoded is still evidence
            if not isinstance(exc, av.error.EOFError):
                raise AvatarError(f"{path}: the video cannot be decoded ({_reason(exc)})") from None


def _evenly(container, stream, total: int, max_frames: int) -> Iterator[np.ndarray]:
    """A short video (or one of unknown length): decode it and keep `max_frames` evenly spaced frames."""
    stride = max(1, -(-total // max_frames)) if total else 1
    kept = 0
    for i, frame in enumerate(container.decode(stream)):
        if i % stride == 0:
            yield frame.to_ndarray(format="rgb24")
            kept += 1
            if kept >= max_frames:
                return


def _seeking(container, stream, seconds: float, max_frames: int) -> Iterator[np.ndarray]:
    """A long video: RUN consecutive frames at each of max_frames // RUN evenly spread times.

    A seek lands on the keyframe before the time; frames up to the time are decoded, not converted.
    """
    seeks = max(1, max_frames // RUN)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    for k in range(seeks):
        target = start + seconds * (k + 0.5) / seeks
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        taken = 0
        for frame in container.decode(stream):
            if frame.time is not None and frame.time < target - 1e-6:
                continue
            yield frame.to_ndarray(format="rgb24")
            taken += 1
            if taken >= RUN:
                break


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc).strip().splitlines()[0] if str(exc) else type(exc).__name__


def format_detection(d: Detection, *, now: datetime | None = None) -> str:
    """One human line, e.g. 'watermark present (confidence 1.00): VASA Avatar, install 3f2a1b, made ...'."""
    if not d.present:
        return (f"no VASA Avatar watermark found (confidence {d.confidence:.2f} in a mark, "
                f"{1 - false_alarm_probability(Z_THRESHOLD):.4f} needed)")
    head = f"watermark present (confidence {d.confidence:.4f})"
    if d.payload is None:
        return f"{head}: VASA Avatar mark, but its payload is too damaged to read"
    made = d.payload.made_at(now=now)
    return (f"{head}: {d.payload.product_name}, install {d.payload.install_hex}, "
            f"made {made:%Y-%m-%d} ~{made:%H}:00 UTC")
