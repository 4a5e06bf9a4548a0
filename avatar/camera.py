"""Video sinks for the live daemon: the "VASA Avatar" virtual camera and a preview window.

Every sink has the same interface, `send(frame)` with frame (512, 512, 3) uint8 RGB and `close()`,
and is a context manager. `open_camera()` finds the device named "VASA Avatar" for this OS through
pyvirtualcam:

- Linux: the v4l2loopback device whose card label is "VASA Avatar" (/sys/class/video4linux/*/name);
- Windows: the Unity Capture device registered under that name, else OBS Virtual Camera;
- macOS: OBS Virtual Camera (its name cannot be chosen).

When there is none, the AvatarError says the exact command that creates it on this OS
(`camera_setup_command`). Tests and `bench live` register their own pyvirtualcam backend
(`pyvirtualcam.register_backend`) and pass its name as `backend`.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from avatar.constants import FPS, FRAME_SIZE
from avatar.errors import AvatarError

log = logging.getLogger(__name__)

CAMERA_NAME = "VASA Avatar"
V4L2_SYSFS = Path("/sys/class/video4linux")
LINUX_SETUP = (f'sudo modprobe v4l2loopback devices=1 card_label="{CAMERA_NAME}" exclusive_caps=1'
               " (install it first with: sudo apt install v4l2loopback-dkms)")
WINDOWS_SETUP = (f'download Unity Capture (github.com/schellingb/UnityCapture), then in its Install folder, as '
                 f'administrator: regsvr32 UnityCaptureFilter64bit.dll "/i:UnityCaptureName={CAMERA_NAME}"')
MACOS_SETUP = ("install OBS Studio 30 or newer (obsproject.com), click 'Start Virtual Camera' once and stop it "
               "again; meeting apps then list it as 'OBS Virtual Camera'")


class Sink(Protocol):
    name: str

    def send(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


class CameraBusyError(AvatarError):
    """The virtual camera exists but could not be opened or written (taken, removed, no permission)."""


def camera_setup_command(system: str | None = None) -> str:
    """What the user runs to create the "VASA Avatar" camera on `system` (platform.system() name)."""
    system = system or platform.system()
    if system == "Linux":
        return LINUX_SETUP
    if system == "Windows":
        return WINDOWS_SETUP
    if system == "Darwin":
        return MACOS_SETUP
    return f"no virtual camera support for {system}; use --preview"


def v4l2_devices(*, sysfs: Path = V4L2_SYSFS) -> list[tuple[str, str]]:
    """(device path, card label) for every video4linux device, sorted by number."""
    if not sysfs.is_dir():
        return []
    found = []
    for entry in sysfs.iterdir():
        try:
            label = (entry / "name").read_text().strip()
        except OSError:
            continue
        found.append((f"/dev/{entry.name}", label))

    def number(item):
        digits = "".join(c for c in item[0] if c.isdigit())
        return int(digits) if digits else -1

    return sorted(found, key=number)


def find_v4l2_device(label: str = CAMERA_NAME, *, sysfs: Path = V4L2_SYSFS) -> str | None:
    """The /dev/videoN whose card label is `label`, or None."""
    for dev, name in v4l2_devices(sysfs=sysfs):
        if name == label:
            return dev
    return None


def _pyvirtualcam():
    try:
        import pyvirtualcam
    except ImportError:
        raise AvatarError("the virtual camera needs pyvirtualcam (pip install pyvirtualcam)") from None
    return pyvirtualcam


def list_camera_backends() -> list[str]:
    """pyvirtualcam backends available in this process (built-in for this OS plus registered ones)."""
    try:
        _pyvirtualcam()
    except AvatarError:
        return []
    from pyvirtualcam import camera as _camera

    return sorted(_camera.BACKENDS)


class VirtualCameraSink:
    """A pyvirtualcam.Camera taking RGB frames; `device` names what apps see."""

    def __init__(self, camera, *, label: str):
        self._camera = camera
        self.name = f"virtual camera {label!r}"
        self.device = camera.device
        self.backend = camera.backend
        self.frames_sent = 0

    def send(self, frame: np.ndarray) -> None:
        if self._camera is None:
            raise CameraBusyError(f"{self.name} is closed")
        self._camera.send(frame)
        self.frames_sent += 1

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            camera.close()

    def __enter__(self) -> VirtualCameraSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_camera(*, backend: str | None = None, device: str | None = None, width: int = FRAME_SIZE,
                height: int = FRAME_SIZE, fps: int = FPS) -> VirtualCameraSink:
    """Open the "VASA Avatar" virtual camera (or `device` on `backend`).

    Raises AvatarError with the set-up command for this OS when the camera does not exist, and
    CameraBusyError (an AvatarError) when it exists but cannot be opened.
    """
    pyvirtualcam = _pyvirtualcam()
    system = platform.system()
    if backend is not None and backend not in list_camera_backends():
        raise AvatarError(f"unknown camera backend {backend!r}: available {', '.join(list_camera_backends()) or 'none'}")
    if backend is None:
        backend = {"Linux": "v4l2loopback", "Windows": "unitycapture", "Darwin": "obs"}.get(system)
        if backend is None:
            raise AvatarError(camera_setup_command(system))
    label = device or CAMERA_NAME
    attempts: list[tuple[str, str | None]]
    if backend == "v4l2loopback" and device is None:
        path = find_v4l2_device(CAMERA_NAME)
        if path is None:
            have = ", ".join(f"{d} {n!r}" for d, n in v4l2_devices()) or "no video devices"
            raise AvatarError(f'no virtual camera named "{CAMERA_NAME}" ({have}); create it with: {LINUX_SETUP}')
        if not os.access(path, os.W_OK):
            raise CameraBusyError(f"no permission to write {path} ({CAMERA_NAME}): sudo usermod -aG video $USER, "
                                  "then log out and in again")
        attempts = [(backend, path)]
    elif backend == "unitycapture" and device is None:
        attempts = [("unitycapture", CAMERA_NAME), ("obs", None)]
    else:
        attempts = [(backend, device)]

    errors = []
    for name, dev in attempts:
        if name not in list_camera_backends():
            continue
        try:
            cam = pyvirtualcam.Camera(width=width, height=height, fps=fps, backend=name, device=dev)
        except Exception as e:
            errors.append(" ".join(str(e).split()) or type(e).__name__)
            continue
        return VirtualCameraSink(cam, label=label if name != "obs" else "OBS Virtual Camera")
    detail = "; ".join(errors)
    if backend == "v4l2loopback" and device is None:
        raise CameraBusyError(f"the {CAMERA_NAME} camera {attempts[0][1]} could not be opened ({detail}); "
                              "is another program sending to it?")
    if system in ("Windows", "Darwin") and device is None:
        raise AvatarError(f'no virtual camera named "{CAMERA_NAME}" could be opened ({detail}); '
                          f"set it up: {camera_setup_command(system)}")
    raise CameraBusyError(f"camera {label!r} on backend {backend!r} could not be opened: {detail}")


class PreviewSink:
    """An OpenCV window showing the frames (`--preview`); needs a display, no virtual camera.

    `closed` turns True when the user closes the window; sending then does nothing.
    """

    def __init__(self, title: str = f"{CAMERA_NAME} preview"):
        if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise AvatarError("--preview needs a display (DISPLAY is not set)")
        import cv2

        self._cv2 = cv2
        self.name = "preview window"
        self.title = title
        self.closed = False
        self.frames_sent = 0
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as e:
            raise AvatarError(f"cannot open the preview window: {' '.join(str(e).split())}") from None
        self._bgr = np.empty((FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
        self.overlay: str | None = None  # one line of status text drawn on the preview only

    def send(self, frame: np.ndarray) -> None:
        if self.closed:
            return
        cv2 = self._cv2
        if self.frames_sent and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.closed = True  # the user closed it
            return
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR, dst=self._bgr if frame.shape == self._bgr.shape else None)
        if self.overlay:
            cv2.putText(bgr, self.overlay, (8, bgr.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imshow(self.title, bgr)
        cv2.waitKey(1)
        self.frames_sent += 1

    def close(self) -> None:
        if not self.closed or self.frames_sent:
            try:
                self._cv2.destroyWindow(self.title)
                self._cv2.waitKey(1)
            except Exception:
                pass
        self.closed = True

    def __enter__(self) -> PreviewSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordingBackend:
    """A pyvirtualcam backend that keeps no device: it counts frames and stamps when each arrived
    (`bench live` and tests register it with pyvirtualcam.register_backend).

    Class attributes collect every instance so a test can look at a camera the daemon closed.
    """

    instances: list["RecordingBackend"] = []
    capacity = 1 << 16  # send stamps kept (27 minutes at 40 FPS); later ones are counted only

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw):
        self.width, self.height, self.fps = width, height, fps
        self._device = device or "recording"
        self._fourcc = fourcc
        self.sent_at = np.zeros(self.capacity, dtype=np.float64)
        self.frames = 0
        self.closed = False
        self.last_frame: np.ndarray | None = None
        type(self).instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        if self.closed:
            raise RuntimeError("camera closed")
        if self.frames < self.capacity:
            self.sent_at[self.frames] = time.monotonic()
        self.frames += 1
        self.last_frame = frame

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return self._device

    def native_fourcc(self) -> int:
        return self._fourcc
