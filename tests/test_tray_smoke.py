"""The tray for real.

1. `LiveHandle` (tray/daemon.py) runs the real live daemon with the real engines on a fake
   microphone (FileAudioBackend playing the bundled voice) and a recording virtual camera: portrait
   switches, pause and controls act while it runs, the camera is never reopened, no tick goes
   without a frame; a missing microphone or camera is a status, not a crash.
2. `vasa-avatar-tray --no-live` under Xvfb with pystray's gtk back-end, docked in `trayer` (an
   XEmbed tray host) inside a D-Bus session: right click opens the menu, the keyboard picks
   Mood > Happy, the choice is saved, and Quit ends the app. Screenshots are taken on the way
   (set VASA_AVATAR_TRAY_SCREENSHOTS=DIR to keep them). Skipped, with the reason, when Xvfb,
   xdotool, ImageMagick, trayer, dbus-run-session or GTK 3's Python bindings are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pyvirtualcam
from PIL import Image

from avatar.camera import RecordingBackend
from avatar.controls import Controls, controls_tensor
from avatar.library import BUILTIN_PATH
from avatar.media import open_audio
from avatar.mic import FileAudioBackend
from avatar.rig import load_rig
from tray.daemon import LiveHandle, paused_frame

REPO = Path(__file__).resolve().parent.parent
GRACE = REPO / "tests" / "data" / "faces" / "grace_hopper.jpg"
CAMERA_BACKEND = "vasa-tray-test-camera"
FRAME_SHAPE = (512, 512, 3)


# ---- 1. the live daemon handle with fake devices ----------------------------------------------------

@pytest.fixture
def voice():
    with open_audio(BUILTIN_PATH.parent / "voice.wav") as src:
        return np.concatenate(list(src.blocks(400)))


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def shown(camera) -> np.ndarray:
    return camera.last_frame.reshape(FRAME_SHAPE)  # pyvirtualcam hands backends flattened frames


@pytest.mark.slow
def test_live_handle_switches_portrait_pause_and_controls_while_running(voice, rig_cache):
    pyvirtualcam.register_backend(CAMERA_BACKEND, RecordingBackend)
    RecordingBackend.instances.clear()
    astronaut, grace = load_rig(BUILTIN_PATH), load_rig(GRACE)  # cached for the handle (and analysed here once)
    # the DSP audio model: this test is about switching, not about the trained encoder's weights
    handle = LiveHandle(portrait=BUILTIN_PATH, controls=Controls(), audio_model="dsp",
                        audio_backend=FileAudioBackend(voice, samplerate=16_000), camera_backend=CAMERA_BACKEND)
    handle.start()
    try:
        wait_for(lambda: handle.status().state == "running", 120, "the daemon to run")
        (camera,) = RecordingBackend.instances

        def distance(frame, rig):  # mean absolute difference to a portrait at rest, 0..255
            return float(np.abs(frame.astype(np.int16) - rig.image.numpy()).mean())

        wait_for(lambda: camera.last_frame is not None, 10, "a frame")
        assert distance(shown(camera), astronaut) < 0.5 * distance(shown(camera), grace)

        # mood: the generator's control input is replaced at once (it is read once per tick)
        handle.set_controls(Controls(mood="happy"))
        assert handle._ticker.controls.equal(controls_tensor(Controls(mood="happy")))
        wait_for(lambda: handle._ticker._pending_controls is None, 1.0, "the next tick to take the controls")
        assert handle._ticker.inner.pipeline.controls.equal(controls_tensor(Controls(mood="happy")))

        # portrait: loaded from the rig cache on the switcher thread and swapped in between frames
        done = []
        t0 = time.monotonic()
        handle.switch_portrait(GRACE, head_distance=1.0, on_done=lambda error: done.append((error, time.monotonic())))
        wait_for(lambda: done, 10, "the portrait switch")
        assert done[0][0] is None and done[0][1] - t0 < 1.0
        wait_for(lambda: distance(shown(camera), grace) < 0.5 * distance(shown(camera), astronaut), 1.0,
                 "the new portrait on the camera within 1 s")
        time.sleep(0.5)
        stamps = camera.sent_at[:min(camera.frames, camera.capacity)]
        gaps = np.diff(stamps[stamps >= t0 - 0.5])
        assert gaps.size >= 30 and gaps.max() < 0.2, "the camera kept getting frames through the switch"
        assert len(RecordingBackend.instances) == 1 and not camera.closed  # never reopened

        # a photo not seen before: analysed on the switcher thread while the current one keeps talking
        mirrored = rig_cache.parent / "grace_mirrored.png"
        Image.open(GRACE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
        t1 = time.monotonic()
        handle.switch_portrait(mirrored, head_distance=1.0, on_done=lambda error: done.append((error, time.monotonic())))
        meanwhile = []  # (time, distance of the camera's frame to the old portrait) during the analysis
        while len(done) < 2 and time.monotonic() - t1 < 120:
            meanwhile.append((time.monotonic(), distance(shown(camera), grace)))
            time.sleep(0.1)
        assert done[1][0] is None
        assert done[1][1] - t1 > 1.0  # a real analysis, not a cache hit
        stamps = camera.sent_at[:min(camera.frames, camera.capacity)]
        gaps = np.diff(stamps[(stamps >= t1) & (stamps <= done[1][1])])
        assert gaps.max() < 0.2, "frames kept going out while the photo was analysed"
        before = [d for t, d in meanwhile if t < done[1][1] - 0.1]
        assert len(before) >= 5 and max(before) < 20, "the old portrait kept talking until the new one was ready"
        new = load_rig(mirrored)
        wait_for(lambda: distance(shown(camera), new) < 0.5 * distance(shown(camera), grace), 1.0,
                 "the analysed portrait on the camera")

        # a photo without a face: reported through on_done, the current portrait stays
        wall = rig_cache.parent / "wall.png"
        Image.new("RGB", (320, 400), (90, 120, 150)).save(wall)
        handle.switch_portrait(wall, head_distance=1.0, on_done=lambda error: done.append((error, 0)))
        wait_for(lambda: len(done) == 3, 60, "the failed switch")
        assert "no face" in done[2][0]
        time.sleep(0.2)
        assert distance(shown(camera), new) < 0.5 * distance(shown(camera), grace)
        grace = new  # what the paused still shows below

        # pause: the camera keeps getting the badged still; resume: live frames again
        handle.set_paused(True)
        still = handle._ticker._still  # the portrait at rest, badged "AI · PAUSED" and watermarked
        assert np.abs(still.astype(int) - paused_frame(grace.image.numpy())).mean() < 3.0  # + the watermark
        wait_for(lambda: np.array_equal(shown(camera), still), 1.0, "the paused still within 1 s")
        n = camera.frames
        time.sleep(0.5)
        assert camera.frames - n >= 10 and np.array_equal(shown(camera), still)
        assert handle.status().state in ("paused", "running")  # status is refreshed once a second
        wait_for(lambda: handle.status().state == "paused", 2.0, "the paused status")
        handle.set_paused(False)
        wait_for(lambda: not np.array_equal(shown(camera), still), 2.0, "live frames after resuming")
    finally:
        handle.stop()
    assert camera.closed  # released on stop


@pytest.mark.slow
def test_live_handle_reports_missing_microphone_and_camera(voice, rig_cache):
    pyvirtualcam.register_backend(CAMERA_BACKEND, RecordingBackend)
    mic = FileAudioBackend(voice, samplerate=16_000)
    mic.unplug()
    handle = LiveHandle(portrait=BUILTIN_PATH, controls=Controls(), audio_model="dsp", audio_backend=mic,
                        camera_backend="no-such-camera-backend")
    handle.start()
    try:
        status = wait_for(lambda: handle.status().state == "no_microphone" and handle.status(), 120,
                          "the no-microphone status")
        assert status.message.startswith("no microphone found"), status.message
        mic.replug()  # looked for again every MIC_RETRY_S
        status = wait_for(lambda: handle.status().state == "no_camera" and handle.status(), 20,
                          "the no-camera status once the microphone is back")
        assert "no-such-camera-backend" in status.message
    finally:
        handle.stop()


def test_preview_process_without_a_display_turns_itself_off(monkeypatch):
    from tray.preview import PreviewProcess

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    reasons = []
    preview = PreviewProcess(True, reasons.append)
    frame = np.zeros(FRAME_SHAPE, np.uint8)
    end = time.monotonic() + 60
    while not reasons and time.monotonic() < end:  # the pacing thread's calls: never blocking
        t = time.monotonic()
        preview.send(frame)
        assert time.monotonic() - t < 0.1
        time.sleep(0.025)
    assert reasons == ["--preview needs a display (DISPLAY is not set)"]
    assert not preview.want
    preview.send(frame)  # off: no new window process
    assert preview._proc is None


# ---- 2. the real tray icon and menu under Xvfb --------------------------------------------------------

TOOLS = {"Xvfb": "xvfb", "xdotool": "xdotool", "import": "imagemagick", "trayer": "trayer",
         "dbus-run-session": "dbus (dbus-bin)"}
SYSTEM_GI = Path("/usr/lib/python3/dist-packages/gi")  # Debian's python3-gi


def _missing_tools() -> list[str]:
    return [f"{tool} (apt {pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]


class XSession:
    """Xvfb on a free display plus trayer as the tray host; both stopped on close."""

    def __init__(self, tmp: Path):
        read, write = os.pipe()
        self.xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "640x480x24",
                                      "-nolisten", "tcp"], pass_fds=(write,), stderr=subprocess.DEVNULL)
        os.close(write)
        with os.fdopen(read) as f:
            number = f.readline().strip()
        if not number:
            self.xvfb.kill()
            pytest.skip("Xvfb did not start")
        self.display = f":{number}"
        self.env = {**os.environ, "DISPLAY": self.display}
        self.trayer = subprocess.Popen(["trayer", "--edge", "top", "--align", "right", "--widthtype", "pixel",
                                        "--width", "80", "--height", "32"], env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def xdotool(self, *args: str) -> str:
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True,
                              timeout=30).stdout

    def screenshot(self, path: Path) -> np.ndarray:
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True, timeout=30)
        return np.asarray(Image.open(path).convert("RGB"))

    def close(self) -> None:
        for proc in (self.trayer, self.xvfb):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _gtk_python_path(session: XSession, tmp: Path) -> str | None:
    """A PYTHONPATH entry that makes GTK 3's bindings importable here, or None (skip)."""
    check = [sys.executable, "-c", "import gi; gi.require_version('Gtk', '3.0'); from gi.repository import Gtk; "
                                   "assert Gtk.init_check()[0]"]
    if subprocess.run(check, env=session.env, capture_output=True, timeout=60).returncode == 0:
        return ""
    if not SYSTEM_GI.is_dir():
        return None
    # PyPI's PyGObject is source-only (needs cairo/gobject-introspection headers); Debian's python3-gi
    # matches this Python's ABI when the versions match. Expose only `gi`, not all of dist-packages.
    (tmp / "gi-only").mkdir()
    (tmp / "gi-only" / "gi").symlink_to(SYSTEM_GI)
    env = {**session.env, "PYTHONPATH": str(tmp / "gi-only")}
    return str(tmp / "gi-only") if subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0 \
        else None


def bright_pixels(img: np.ndarray) -> int:
    """Light menu pixels on the black root window, the trayer panel (top right corner) left out."""
    light = (img > 200).all(axis=2)
    light[:40, -90:] = False
    return int(light.sum())


def test_tray_menu_under_xvfb_switches_mood(tmp_path):
    missing = _missing_tools()
    if missing:
        pytest.skip("needs " + ", ".join(missing))
    session = XSession(tmp_path)
    app = None
    try:
        gi_path = _gtk_python_path(session, tmp_path)
        if gi_path is None:
            pytest.skip("GTK 3's Python bindings are not importable (apt install gir1.2-gtk-3.0 python3-gi)")
        config, data = tmp_path / "config", tmp_path / "data"
        env = {**session.env, "PYSTRAY_BACKEND": "gtk", "NO_AT_BRIDGE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (gi_path, str(REPO)) if p),
               "VASA_AVATAR_CONFIG": str(config), "VASA_AVATAR_DATA": str(data),
               "VASA_AVATAR_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home"),
               "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
        log = open(tmp_path / "app.out", "w")
        app = subprocess.Popen(["dbus-run-session", "--", sys.executable, "-m", "tray", "--no-live", "-v"],
                               env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        keep = os.environ.get("VASA_AVATAR_TRAY_SCREENSHOTS")

        def output() -> str:
            return (tmp_path / "app.out").read_text()

        def icon_window() -> str:
            assert app.poll() is None, f"the tray app exited:\n{output()}"
            ids = session.xdotool("search", "--onlyvisible", "--classname", "^vasa-avatar$").split()
            return ids[0] if ids else ""

        icon = wait_for(icon_window, 120, "the tray icon to dock in trayer")

        def icon_drawn() -> bool:  # the icon's blue square (tray.app.icon_image) shows in the panel
            panel = session.screenshot(tmp_path / "docked.png")[:32, -80:].astype(int)
            return int((np.abs(panel - (48, 63, 159)).max(axis=2) < 40).sum()) > 200

        wait_for(icon_drawn, 30, "the icon image in the tray")
        assert bright_pixels(session.screenshot(tmp_path / "docked.png")) < 500  # no menu yet

        def open_menu() -> np.ndarray:
            for _ in range(3):
                session.xdotool("mousemove", "--window", icon, "16", "15", "click", "3")
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    img = session.screenshot(tmp_path / "menu.png")
                    if bright_pixels(img) > 20_000:
                        return img
                    time.sleep(0.3)
            raise AssertionError(f"right click did not open the menu:\n{output()}")

        def keys(*names: str) -> None:
            for name in names:
                session.xdotool("key", name)
                time.sleep(0.4)

        menu = open_menu()
        keys("Down", "Down", "Right", "Down")  # Portraits, Mood, open it (Neutral), Happy
        with_mood = session.screenshot(tmp_path / "mood_menu.png")
        left = int(np.flatnonzero((menu > 200).all(axis=2).any(axis=0))[0])  # the menu's left edge
        assert bright_pixels(with_mood[:, :left - 2]) > 5_000, "the Mood submenu did not open beside the menu"
        keys("Return")
        settings = config / "settings.json"
        wait_for(lambda: settings.is_file() and json.loads(settings.read_text())["mood"] == "happy", 15,
                 "mood=happy in settings.json")
        assert "settings: mood=happy" in (data / "tray.log").read_text()

        open_menu()  # rebuilt menu: Happy is now the checked radio item
        keys("Down", "Down", "Right", "Down")
        session.screenshot(tmp_path / "mood_after.png")
        keys("Escape", "Escape")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for name in ("docked.png", "mood_menu.png", "mood_after.png"):
                shutil.copy(tmp_path / name, Path(keep) / name)

        open_menu()
        keys("Up", "Return")  # the last item: Quit
        assert app.wait(30) == 0, output()
        assert "tray: quit" in (data / "tray.log").read_text()
        assert json.loads(settings.read_text())["mood"] == "happy"
    finally:
        if app is not None and app.poll() is None:
            os.killpg(app.pid, signal.SIGTERM)
            app.wait(10)
        session.close()
