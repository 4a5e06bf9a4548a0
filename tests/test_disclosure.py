"""The marks every output frame carries: badge + watermark, and a long stream's hour re-stamped."""

import time

import numpy as np

from avatar import disclosure
from avatar.disclosure import FrameMarker
from avatar.watermark import detect


def _frame():
    rng = np.random.default_rng(0)
    return (rng.random((512, 512, 3)) * 60 + 100).astype(np.uint8)


def test_marked_frames_carry_the_watermark_and_the_badge(tmp_path, monkeypatch):
    monkeypatch.setenv("VASA_AVATAR_CONFIG", str(tmp_path))
    marker = FrameMarker()
    frames = [marker(_frame()) for _ in range(8)]
    assert detect(frames).present
    corner = frames[0][-40:, -60:].astype(int)
    assert np.abs(corner - _frame()[-40:, -60:]).mean() > 10  # the pill is there
    unbadged = FrameMarker(badge=False)(_frame())
    assert np.abs(unbadged[-40:, -60:].astype(int) - _frame()[-40:, -60:]).mean() < 5


def test_a_stale_hour_is_restamped(tmp_path, monkeypatch):
    monkeypatch.setenv("VASA_AVATAR_CONFIG", str(tmp_path))
    marker = FrameMarker()
    hour = marker.watermarker.payload.hour
    monkeypatch.setattr(disclosure, "hour_bucket", lambda: hour + 1)
    monkeypatch.setattr(disclosure.Payload, "now", classmethod(lambda cls, i: cls(1, i, hour + 1)))
    monkeypatch.setattr(disclosure, "HOUR_CHECK_FRAMES", 10)
    base = _frame()
    for _ in range(10):
        marker(base.copy())
    deadline = time.monotonic() + 20
    while marker.watermarker.payload.hour != hour + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.watermarker.payload.hour == hour + 1


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def test_restamping_leaves_no_memory_behind(tmp_path, monkeypatch):
    """The renewal's build runs on a thread of its own, whose arena the steady heap would keep:
    measured, 12 MB more resident after each hour's renewal until its free memory is released."""
    import sys
    import threading

    import pytest

    from avatar.memory import steady_heap

    if not sys.platform.startswith("linux") or not steady_heap():
        pytest.skip("glibc only")
    monkeypatch.setenv("VASA_AVATAR_CONFIG", str(tmp_path))
    marker = FrameMarker()
    hour = marker.watermarker.payload.hour
    monkeypatch.setattr(disclosure, "hour_bucket", lambda: hour + 1)
    monkeypatch.setattr(disclosure.Payload, "now", classmethod(lambda cls, i: cls(1, i, hour + 1)))
    before = _resident_mb()
    marker._renew_if_stale()
    deadline = time.monotonic() + 20
    while any(t.name == "watermark-renew" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.watermarker.payload.hour == hour + 1
    assert _resident_mb() - before < 4.0
