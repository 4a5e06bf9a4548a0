"""Video sinks: finding the "VASA Avatar" camera, the set-up command when it is missing, a
registered pyvirtualcam backend, and the preview window (under Xvfb)."""

import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import pyvirtualcam

from avatar.camera import (CAMERA_NAME, CameraBusyError, PreviewSink, RecordingBackend, camera_setup_command,
                           find_v4l2_device, list_camera_backends, open_camera, v4l2_devices)
from avatar.errors import AvatarError

pyvirtualcam.register_backend("test-recording", RecordingBackend)


def test_setup_command_per_os():
    linux = camera_setup_command("Linux")
    assert 'sudo modprobe v4l2loopback devices=1 card_label="VASA Avatar" exclusive_caps=1' in linux
    assert 'regsvr32 UnityCaptureFilter64bit.dll "/i:UnityCaptureName=VASA Avatar"' in camera_setup_command("Windows")
    assert "OBS" in camera_setup_command("Darwin") and "Virtual Camera" in camera_setup_command("Darwin")


def test_finds_the_device_by_card_label(tmp_path):
    for n, label in ((0, "Integrated Camera"), (2, "Integrated Camera"), (10, CAMERA_NAME), (4, "OBS Cam")):
        (tmp_path / f"video{n}").mkdir()
        (tmp_path / f"video{n}" / "name").write_text(label + "\n")
    assert find_v4l2_device(sysfs=tmp_path) == "/dev/video10"
    assert [d for d, _ in v4l2_devices(sysfs=tmp_path)] == ["/dev/video0", "/dev/video2", "/dev/video4", "/dev/video10"]
    assert find_v4l2_device("nope", sysfs=tmp_path) is None
    assert find_v4l2_device(sysfs=tmp_path / "missing") is None


@pytest.mark.skipif(find_v4l2_device() is not None, reason="this machine has a VASA Avatar camera")
def test_missing_camera_says_how_to_create_it():
    if "v4l2loopback" not in list_camera_backends():
        pytest.skip("not Linux")
    with pytest.raises(AvatarError, match=r'no virtual camera named "VASA Avatar".*sudo modprobe v4l2loopback '
                                          r'devices=1 card_label="VASA Avatar" exclusive_caps=1') as info:
        open_camera()
    assert not isinstance(info.value, CameraBusyError)  # nothing to retry: the user must set it up
    assert "\n" not in str(info.value)


def test_registered_backend_gets_rgb_frames():
    RecordingBackend.instances.clear()
    frame = np.full((512, 512, 3), 7, np.uint8)
    with open_camera(backend="test-recording", device="fake0") as cam:
        assert cam.device == "fake0"
        for _ in range(3):
            cam.send(frame)
        with pytest.raises(ValueError, match="frame shape"):
            cam.send(frame[:256])
    rec = RecordingBackend.instances[-1]
    assert rec.frames == 3 and rec.closed
    assert rec.last_frame.size == 512 * 512 * 3 and int(rec.last_frame.max()) == 7


def test_unknown_backend_and_failing_open():
    with pytest.raises(AvatarError, match="unknown camera backend 'nope'"):
        open_camera(backend="nope")

    class Busy(RecordingBackend):
        def __init__(self, **kw):
            raise RuntimeError("device or resource busy")

    pyvirtualcam.register_backend("test-busy", Busy)
    with pytest.raises(CameraBusyError, match="device or resource busy"):
        open_camera(backend="test-busy")


def test_preview_needs_a_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(AvatarError, match="needs a display"):
        PreviewSink()


@pytest.fixture
def xvfb(monkeypatch):
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed")
    display = f":{90 + os.getpid() % 50}"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket = f"/tmp/.X11-unix/X{display[1:]}"
    for _ in range(100):
        if os.path.exists(socket):
            break
        time.sleep(0.05)
    monkeypatch.setenv("DISPLAY", display)
    yield display
    proc.terminate()
    proc.wait(timeout=5)


def test_preview_window_shows_the_frames(xvfb):
    frame = np.zeros((512, 512, 3), np.uint8)
    frame[..., 0] = 200  # red in RGB
    with PreviewSink() as view:
        for _ in range(5):
            view.send(frame)
            time.sleep(0.02)
        assert view.frames_sent == 5 and not view.closed
        if shutil.which("import"):  # ImageMagick: grab the screen and find the red window on it
            raw = subprocess.run(["import", "-display", xvfb, "-window", "root", "-depth", "8", "rgb:-"],
                                 capture_output=True, timeout=20).stdout
            screen = np.frombuffer(raw, np.uint8).reshape(600, 800, 3)
            red = (screen[..., 0] > 180) & (screen[..., 1] < 30) & (screen[..., 2] < 30)
            assert red.sum() >= 0.99 * 512 * 512  # the whole frame, in RGB order
    assert view.closed
