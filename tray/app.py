"""`vasa-avatar-tray`: the system-tray app that runs the live daemon and switches what it shows.

    menu click ─► TrayController.dispatch(Action) ─► tray.menu.apply ─► new TrayState + Effects
                                                          │
          LiveHandle (the daemon) ◄── set_controls / switch_portrait / set_paused / set_preview
          settings.json ◄── save_settings        dialogs, library, autostart ◄── the other effects
    every second: LiveHandle.status() ─► TrayState.status ─► icon dot, tooltip, menu status line

- The menu is data (tray/menu.py); TrayIcon turns it into a pystray menu and rebuilds it when the
  state changes. pystray is imported only when the icon is made, so `--print-menu` and the tests
  of the controller need no display.
- Switching mood, gaze or expressiveness replaces the generator's control tensor between frames
  (Pipeline.set_controls): it takes effect on the next 25 ms tick and the generator glides there.
- Switching portrait or framing loads the rig on a background thread (from the rig cache: tens of
  ms; a photo not seen before: seconds of analysis) while the old portrait keeps talking, then
  swaps it in with Pipeline.set_rig between two frames. The camera is never reopened.
- Pause keeps the camera fed with a still of the portrait wearing the "AI · PAUSED" badge; the
  decoder is skipped meanwhile (the motion generator keeps running so resuming is seamless).
- Dialogs (file chooser, consent question, doctor output) run as separate processes (zenity,
  kdialog, or a small tkinter script), so no second GUI toolkit runs inside the tray's main loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image, ImageDraw

from avatar import library
from avatar.errors import AvatarError
from avatar.settings import Settings, data_dir, load_settings, save_settings, settings_path
from tray import autostart
from tray.menu import Action, DaemonStatus, Effect, PortraitItem, TrayState, apply, build_menu, format_menu, \
    icon_status, tooltip

log = logging.getLogger("tray")

APP_NAME = "vasa-avatar"
STATUS_EVERY_S = 1.0  # tooltip and status dot refresh
MIC_RETRY_S = 3.0  # a missing microphone is looked for again this often
DOCTOR_TIMEOUT_S = 120
PHOTO_PATTERNS = "*.jpg *.jpeg *.png *.webp *.bmp *.tif *.tiff *.JPG *.JPEG *.PNG"
CONSENT_QUESTION = ("Do you have the consent of the person in this photo to animate their face?\n\n"
                    "Only add photos of yourself or of people who agreed to it. The video will carry a "
                    "visible \"AI\" badge and an invisible watermark.")
HEADLESS_ADD = "adding a portrait needs a desktop session; in a terminal use: vasa-avatar portraits add PHOTO --i-have-consent"

# Status dot colours (RGB): green running, amber paused, red no microphone / error, violet no camera.
DOT_COLOURS = {
    "running": (46, 204, 64),
    "paused": (255, 176, 0),
    "no_microphone": (229, 57, 53),
    "no_camera": (142, 68, 173),
    "error": (229, 57, 53),
    "starting": (158, 158, 158),
    "menu_only": (158, 158, 158),
    "stopped": (158, 158, 158),
}


# ---- the icon image -------------------------------------------------------------------------------

def icon_image(status: str, *, size: int = 64) -> Image.Image:
    """The tray icon: a head-and-shoulders glyph on a rounded square, and a status dot in the
    lower right corner coloured by `status` (a key of DOT_COLOURS). Drawn 4x and reduced, so the
    edges are smooth at any size."""
    s = size * 4
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=(48, 63, 159, 255))
    white = (245, 245, 250, 255)
    d.ellipse((s * 0.30, s * 0.16, s * 0.62, s * 0.52), fill=white)  # head
    d.pieslice((s * 0.12, s * 0.56, s * 0.80, s * 1.24), 180, 360, fill=white)  # shoulders
    r = s * 0.21
    cx, cy = s - r - s * 0.02, s - r - s * 0.02
    d.ellipse((cx - r - s * 0.04, cy - r - s * 0.04, cx + r + s * 0.04, cy + r + s * 0.04), fill=(255, 255, 255, 255))
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*DOT_COLOURS.get(status, DOT_COLOURS["error"]), 255))
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ---- what the controller needs from the daemon and from the desktop -------------------------------

class Daemon(Protocol):
    """The live daemon as the tray drives it (LiveHandle; tests use a recording fake)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def set_controls(self, controls) -> None: ...

    def switch_portrait(self, path: Path, *, head_distance: float,
                        on_done: Callable[[str | None], None]) -> None: ...

    def set_paused(self, paused: bool) -> None: ...

    def set_preview(self, on: bool) -> None: ...

    def status(self) -> DaemonStatus: ...


class UI(Protocol):
    """Dialogs and desktop actions (DesktopUI; tests use a scripted fake)."""

    def choose_photo(self) -> Path | None: ...

    def confirm(self, title: str, question: str) -> bool: ...

    def show_text(self, title: str, text: str) -> None: ...

    def notify(self, message: str) -> None: ...

    def open_folder(self, path: Path) -> None: ...


# ---- the controller ------------------------------------------------------------------------------

def portrait_items(entries) -> tuple[PortraitItem, ...]:
    return tuple(PortraitItem(e.id, e.name, e.problem, e.builtin) for e in entries)


class TrayController:
    """Holds the TrayState, applies actions (tray.menu.apply) and carries out their effects.

    Thread-safe: menu clicks, the status timer and dialog threads all call `dispatch`. Listeners
    (the icon) are called with the new state after each change.
    """

    def __init__(self, *, daemon: Daemon | None, ui: UI, settings: Settings | None = None,
                 settings_file: Path | None = None):
        self.daemon = daemon
        self.ui = ui
        self.settings_file = settings_file or settings_path()
        settings = settings if settings is not None else load_settings(self.settings_file)
        items = portrait_items(library.list_portraits())
        state = TrayState(settings=settings, portraits=(),
                          status=DaemonStatus("starting" if daemon is not None else "menu_only"),
                          autostart=autostart.is_enabled())
        # the saved portrait may have gone: portraits_changed falls back to the bundled one
        state, _ = apply(state, Action("portraits_changed", items))
        self.state = state
        self._shown_portrait = state.settings.portrait  # what the daemon shows: a failed switch goes back to it
        self.listeners: list[Callable[[TrayState], None]] = []
        self.on_quit: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._workers: list[threading.Thread] = []

    # -- state
    def dispatch(self, action: Action) -> TrayState:
        with self._lock:
            before = self.state
            self.state, effects = apply(before, action)
        for effect in effects:
            try:
                self._run(effect)
            except AvatarError as e:
                self.ui.notify(str(e))
            except Exception:  # a bug: keep the tray alive, say where to look
                log.exception("tray action %s failed", effect.kind)
                self.ui.notify(f"{effect.kind.replace('_', ' ')} failed; see the log {log_path()}")
        if self.state != before:
            for listener in list(self.listeners):
                listener(self.state)
        return self.state

    def portrait_path(self, portrait_id: str) -> Path:
        return library.resolve(portrait_id).path

    def refresh_portraits(self) -> None:
        self.dispatch(Action("portraits_changed", portrait_items(library.list_portraits())))

    def poll_daemon(self) -> None:
        if self.daemon is not None:
            self.dispatch(Action("daemon_status", self.daemon.status()))

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for dialog and library threads started by effects (tests, shutdown)."""
        end = time.monotonic() + timeout
        for t in list(self._workers):
            t.join(max(0.0, end - time.monotonic()))

    def _background(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"tray-{target.__name__}")
        self._workers = [w for w in self._workers if w.is_alive()] + [t]
        t.start()

    # -- effects
    def _run(self, effect: Effect) -> None:
        kind, value = effect.kind, effect.value
        daemon = self.daemon
        if kind == "save_settings":
            try:
                save_settings(value, self.settings_file)
            except OSError as e:
                log.warning("cannot save settings to %s: %s", self.settings_file, e)
                self.ui.notify(f"cannot save settings ({e.strerror or e}); they last until you quit")
        elif kind == "set_controls":
            if daemon is not None:
                daemon.set_controls(value)
        elif kind == "switch_portrait":
            portrait_id, head_distance = value
            if daemon is None:
                return
            previous = self._shown_portrait
            entry = library.resolve(portrait_id)
            self.dispatch(Action("busy", f"loading {entry.name}…"))

            def done(error: str | None, portrait_id=portrait_id, previous=previous):
                if error is None:
                    self._shown_portrait = portrait_id
                else:
                    log.warning("portrait %r not shown: %s", portrait_id, error)
                    self.ui.notify(f"cannot show portrait {entry.name}: {error}")
                    self.dispatch(Action("portrait_failed", (portrait_id, previous)))
                self.dispatch(Action("busy", ""))

            daemon.switch_portrait(entry.path, head_distance=head_distance, on_done=done)
        elif kind == "set_paused":
            if daemon is not None:
                daemon.set_paused(value)
        elif kind == "set_preview":
            if daemon is not None:
                daemon.set_preview(value)
        elif kind == "set_autostart":
            try:
                autostart.enable() if value else autostart.disable()
            except OSError as e:
                self.ui.notify(f"cannot change start at login: {e.strerror or e}")
                self.dispatch(Action("autostart_is", autostart.is_enabled()))
        elif kind == "add_portrait_dialog":
            self._background(self._add_portrait)
        elif kind == "remove_portrait_dialog":
            self._background(self._remove_portrait, value)
        elif kind == "open_portraits_folder":
            folder = library.portraits_dir()
            folder.mkdir(parents=True, exist_ok=True)
            self.ui.open_folder(folder)
        elif kind == "doctor":
            self._background(self._doctor)
        elif kind == "quit":
            self.quit()
        else:
            raise ValueError(f"unknown tray effect {kind!r}")

    def _add_portrait(self) -> None:
        path = self.ui.choose_photo()
        if path is None:
            return
        if not self.ui.confirm("Add portrait", CONSENT_QUESTION):
            self.ui.notify(f"{Path(path).name} was not added: {library.CONSENT_REFUSED}")
            return
        self.dispatch(Action("busy", f"analysing {Path(path).name}…"))
        try:
            entry = library.add_portrait(path, consent=True, head_distance=self.state.settings.head_distance)
        except AvatarError as e:
            self.ui.notify(f"{Path(path).name} was not added: {e}")
            return
        finally:
            self.dispatch(Action("busy", ""))
        self.refresh_portraits()
        self.dispatch(Action("set_portrait", entry.id))

    def _remove_portrait(self, portrait_id: str) -> None:
        entry = library.get(portrait_id)
        if not self.ui.confirm("Remove portrait", f"Remove {entry.name} from the portrait library?\n"
                                                  "Its copy of the photo and its cached analysis are deleted."):
            return
        try:
            library.remove_portrait(portrait_id)
        except AvatarError as e:
            self.ui.notify(str(e))
        self.refresh_portraits()

    def _doctor(self) -> None:
        self.ui.show_text("VASA Avatar doctor", run_doctor())

    def quit(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        for callback in list(self.on_quit):
            callback()


def run_doctor() -> str:
    """`vasa-avatar doctor`'s report (run as a separate process: it probes devices)."""
    cmd = [sys.executable, "-m", "avatar.cli", "doctor"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return f"vasa-avatar doctor did not finish within {DOCTOR_TIMEOUT_S} s"
    out = (done.stdout + done.stderr).strip()
    return out or f"vasa-avatar doctor printed nothing (exit status {done.returncode})"


# ---- the live daemon, as the tray drives it --------------------------------------------------------

class _TrayPipeline:
    """The daemon's Pipeline with a pause switch: while paused, `render` returns the paused still
    (no decoder work) and everything else passes through, so motion state keeps flowing."""

    def __init__(self, pipeline, image: np.ndarray, *, paused: bool = False):
        self._pipeline = pipeline
        self.paused = paused
        self.set_still(image)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def set_still(self, image: np.ndarray) -> None:
        """image: (512, 512, 3) uint8 RGB, the portrait at rest (the rig's image)."""
        self.image = image
        self._still = paused_frame(image)

    def render(self, motion):
        if self.paused:
            return self._still.copy()  # a copy: sinks may draw on what they are given
        return self._pipeline.render(motion)


def paused_frame(image: np.ndarray) -> np.ndarray:
    """The portrait at rest with the "AI · PAUSED" badge: what the camera shows while paused."""
    from avatar.badge import Badge

    frame = np.array(image, dtype=np.uint8, copy=True)
    return Badge(paused=True, frame_size=frame.shape[0]).apply(frame)


class _LazyPreview:
    """A preview-window sink that opens and closes the real window on the daemon's pacing thread
    (OpenCV windows belong to the thread that made them) as the tray switches it."""

    name = "preview window"
    closed = False  # never: LiveDaemon drops a closed preview for good, this one comes and goes

    def __init__(self, want: bool, on_closed: Callable[[str | None], None]):
        self.want = want
        self.on_closed = on_closed
        self._sink = None

    def send(self, frame: np.ndarray) -> None:
        try:
            if self.want and self._sink is None:
                from avatar.camera import PreviewSink

                self._sink = PreviewSink()
            if not self.want:
                self.close()
                return
            self._sink.send(frame)
            if self._sink.closed:  # the user closed the window
                self._off(None)
        except Exception as e:  # no display, a window error: turn it off and say so once
            self._off(str(e) if isinstance(e, AvatarError) else f"preview window failed ({e})")

    def _off(self, reason: str | None) -> None:
        self.want = False
        self.close()
        self.on_closed(reason)

    def close(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.close()


class LiveHandle:
    """The live daemon (avatar.live.LiveDaemon) run on background threads with the switches the
    tray needs: controls, portrait, pause and preview change while it runs; the camera stays open.

    Start-up problems do not end it: a missing microphone is looked for again every MIC_RETRY_S, a
    missing or busy camera is retried by the daemon every 2 s (the preview works meanwhile).
    """

    def __init__(self, *, portrait: Path, controls, mic: str | None = None, paused: bool = False,
                 preview: bool = False, on_preview_closed: Callable[[str | None], None] = lambda reason: None,
                 runtime: str = "auto", camera_backend: str | None = None, audio_backend=None,
                 torch_threads: int = 1):
        self.portrait = Path(portrait)
        self.controls = controls
        self.mic = mic
        self.runtime = runtime
        self.camera_backend = camera_backend
        self.audio_backend = audio_backend
        self.torch_threads = torch_threads
        self._paused = paused
        self._preview = _LazyPreview(preview, on_preview_closed)
        self._pipeline: _TrayPipeline | None = None
        self._daemon = None
        self._state = DaemonStatus("starting")
        self._camera_problem = ""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._switch_wanted = threading.Condition(self._lock)
        self._switch_request: tuple | None = None
        self._fps_mark: tuple[float, int] | None = None
        self._thread: threading.Thread | None = None

    # -- the Daemon interface
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="tray-live", daemon=True)
        self._thread.start()
        threading.Thread(target=self._switcher, name="tray-portrait", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            daemon = self._daemon
            self._switch_wanted.notify_all()
        if daemon is not None:
            daemon.stop()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def set_controls(self, controls) -> None:
        from avatar.controls import controls_tensor

        self.controls = controls
        if self._pipeline is not None:
            self._pipeline.set_controls(controls_tensor(controls))  # read once per tick: atomic swap

    def switch_portrait(self, path: Path, *, head_distance: float, on_done: Callable[[str | None], None]) -> None:
        with self._lock:  # a request not started yet is replaced: the newest choice wins
            self._switch_request = (Path(path), head_distance, on_done)
            self._switch_wanted.notify_all()

    def set_paused(self, paused: bool) -> None:
        self._paused = paused
        if self._pipeline is not None:
            self._pipeline.paused = paused

    def set_preview(self, on: bool) -> None:
        self._preview.want = on

    def status(self) -> DaemonStatus:
        return self._state

    # -- threads
    def _switcher(self) -> None:
        """Loads requested rigs one at a time, newest request first, and swaps them in."""
        from avatar.rig import load_rig

        while not self._stopping.is_set():
            with self._lock:
                while self._switch_request is None or self._pipeline is None:
                    if self._stopping.is_set():
                        return
                    self._switch_wanted.wait(0.5)
                path, head_distance, on_done = self._switch_request
                self._switch_request = None
            try:
                rig = load_rig(path, head_distance=head_distance)
            except AvatarError as e:
                on_done(str(e))
                continue
            except Exception as e:
                log.exception("loading portrait %s failed", path)
                on_done(f"analysis failed ({type(e).__name__})")
                continue
            self._pipeline.set_rig(rig.inputs())
            self._pipeline.set_still(rig.image.numpy())
            self.portrait = path
            log.info("live: now showing %s", path.name)
            on_done(None)

    def _main(self) -> None:
        try:
            self._prepare()
        except AvatarError as e:
            self._state = DaemonStatus("error", message=str(e))
            log.warning("live daemon not started: %s", e)
            return
        except Exception as e:
            self._state = DaemonStatus("error", message=f"{type(e).__name__}; see {log_path()}")
            log.exception("live daemon failed to start")
            return
        with self._lock:
            self._switch_wanted.notify_all()
        from avatar.live import LiveDaemon
        from avatar.mic import Microphone

        while not self._stopping.is_set():
            try:
                mic = Microphone(self.mic, backend=self.audio_backend)
                mic.open()
            except AvatarError as e:
                self._state = DaemonStatus("no_microphone", message=str(e))
                self._stopping.wait(MIC_RETRY_S)
                continue
            try:
                daemon = LiveDaemon(self._pipeline, mic, camera=self._open_camera(), reopen_camera=self._reopen_camera,
                                    preview=self._preview, idle_frame=self._pipeline.image,
                                    status_every_s=STATUS_EVERY_S, on_status=self._on_status)
                with self._lock:
                    self._daemon = daemon
                if not self._stopping.is_set():
                    daemon.run(handle_signals=False)
            except Exception:
                log.exception("live daemon stopped by an error; restarting it")
                self._state = DaemonStatus("error", message=f"see {log_path()}")
                self._stopping.wait(MIC_RETRY_S)
            finally:
                with self._lock:
                    self._daemon = None
                mic.close()

    def _prepare(self) -> None:
        import torch

        from engines.runtime import create_backend

        from avatar.controls import controls_tensor
        from avatar.live import warm_up
        from avatar.pipeline import Pipeline, load_engines
        from avatar.rig import load_rig

        torch.set_num_threads(max(1, self.torch_threads))
        rig = load_rig(self.portrait, head_distance=self.controls.head_distance)
        engines = load_engines()
        backend = create_backend(self.runtime, engines=engines)
        log.info("live: engines on %s", backend.describe())
        pipeline = Pipeline(backend.engines(engines), rig.inputs(), controls_tensor(self.controls),
                            seed=self.controls.seed)
        warm_up(pipeline)
        pipeline.set_controls(controls_tensor(self.controls))  # the latest, in case they changed meanwhile
        self._pipeline = _TrayPipeline(pipeline, rig.image.numpy(), paused=self._paused)

    def _open_camera(self):
        try:
            return self._reopen_camera()
        except AvatarError:
            return None  # the daemon retries through _reopen_camera

    def _reopen_camera(self):
        from avatar.camera import open_camera

        try:
            camera = open_camera(backend=self.camera_backend)
        except AvatarError as e:
            self._camera_problem = str(e)
            raise
        self._camera_problem = ""
        return camera

    def _on_status(self, stats) -> None:
        now = time.monotonic()
        fps = None
        if self._fps_mark is not None and now > self._fps_mark[0]:
            fps = (stats.frames_new - self._fps_mark[1]) / (now - self._fps_mark[0])
        self._fps_mark = (now, stats.frames_new)
        latency = None if math.isnan(stats.latency_p50_ms) else stats.latency_p50_ms
        daemon = self._daemon
        if not stats.mic_connected:
            state, message = "no_microphone", "microphone lost; idling and retrying"
        elif daemon is not None and daemon.camera is None:
            state, message = "no_camera", self._camera_problem or "virtual camera unavailable; retrying"
        elif self._paused:
            state, message = "paused", ""
        else:
            state, message = "running", ""
        self._state = DaemonStatus(state, fps=fps, latency_ms=latency, message=message)


# ---- dialogs and desktop actions ------------------------------------------------------------------

# A tkinter dialog in its own process: argv mode ("open", "yesno", "text"), title, text.
_TK_DIALOG = r"""
import sys, tkinter as tk
from tkinter import filedialog, messagebox
mode, title, text = sys.argv[1:4]
root = tk.Tk()
root.withdraw()
if mode == "open":
    print(filedialog.askopenfilename(title=title, filetypes=[("Photos", text), ("All files", "*")]) or "")
elif mode == "yesno":
    print("yes" if messagebox.askyesno(title, text) else "no")
else:
    root.deiconify()
    root.title(title)
    box = tk.Text(root, width=100, height=30, wrap="word")
    box.insert("1.0", text)
    box.configure(state="disabled")
    box.pack(fill="both", expand=True)
    tk.Button(root, text="Close", command=root.destroy).pack(pady=4)
    root.mainloop()
"""


def has_display() -> bool:
    if platform.system() in ("Windows", "Darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class DesktopUI:
    """Dialogs through zenity, kdialog or tkinter (whichever exists, in that order), notifications
    through the tray icon. Without a display every dialog is a logged notification instead."""

    def __init__(self, notify: Callable[[str], None] | None = None):
        self._notify = notify

    def _tool(self) -> str | None:
        if not has_display():
            return None
        for tool in ("zenity", "kdialog"):
            if platform.system() == "Linux" and shutil.which(tool):
                return tool
        return "tk" if importlib.util.find_spec("tkinter") else None

    def _tk(self, mode: str, title: str, text: str) -> str:
        done = subprocess.run([sys.executable, "-c", _TK_DIALOG, mode, title, text], capture_output=True, text=True)
        return done.stdout.strip()

    def choose_photo(self) -> Path | None:
        tool = self._tool()
        if tool is None:
            self.notify(HEADLESS_ADD)
            return None
        title = "Add a portrait photo"
        if tool == "zenity":
            done = subprocess.run(["zenity", "--file-selection", f"--title={title}",
                                   f"--file-filter=Photos | {PHOTO_PATTERNS}", "--file-filter=All files | *"],
                                  capture_output=True, text=True)
            out = done.stdout.strip() if done.returncode == 0 else ""
        elif tool == "kdialog":
            done = subprocess.run(["kdialog", "--title", title, "--getopenfilename", str(Path.home()),
                                   f"{PHOTO_PATTERNS}|Photos"], capture_output=True, text=True)
            out = done.stdout.strip() if done.returncode == 0 else ""
        else:
            out = self._tk("open", title, PHOTO_PATTERNS)
        return Path(out) if out else None

    def confirm(self, title: str, question: str) -> bool:
        tool = self._tool()
        if tool is None:
            self.notify(f"{title}: needs a desktop session to ask; not done")
            return False
        if tool == "zenity":
            return subprocess.run(["zenity", "--question", f"--title={title}", f"--text={question}",
                                   "--no-markup"]).returncode == 0
        if tool == "kdialog":
            return subprocess.run(["kdialog", "--title", title, "--yesno", question]).returncode == 0
        return self._tk("yesno", title, question) == "yes"

    def show_text(self, title: str, text: str) -> None:
        tool = self._tool()
        if tool is None:
            log.warning("%s:\n%s", title, text)
            self.notify(f"{title}: report written to the log {log_path()}")
            return
        if tool == "tk":
            self._tk("text", title, text)
            return
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            if tool == "zenity":
                subprocess.run(["zenity", "--text-info", f"--title={title}", f"--filename={f.name}",
                                "--width=760", "--height=520"])
            else:
                subprocess.run(["kdialog", "--title", title, "--textbox", f.name, "760", "520"])
        finally:
            os.unlink(f.name)

    def notify(self, message: str) -> None:
        log.warning("%s", message)
        if self._notify is not None:
            try:
                self._notify(message)
            except Exception:  # no notification service: the log has it
                log.debug("notification failed", exc_info=True)

    def open_folder(self, path: Path) -> None:
        system = platform.system()
        try:
            if system == "Windows":
                os.startfile(path)  # noqa: S606 (Windows only)
            elif system == "Darwin":
                subprocess.Popen(["open", str(path)])
            elif shutil.which("xdg-open"):
                subprocess.Popen(["xdg-open", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                self.notify(f"portraits folder: {path}")
        except OSError as e:
            self.notify(f"cannot open {path}: {e.strerror or e}; open it yourself")


# ---- the pystray icon ----------------------------------------------------------------------------

class TrayIcon:
    """The pystray Icon for a TrayController: menu, status dot and tooltip follow its state."""

    def __init__(self, controller: TrayController):
        import pystray

        self._pystray = pystray
        self.controller = controller
        state = controller.state
        self._tree = build_menu(state)
        self._dot = icon_status(state)
        self._tip = ""
        self.icon = pystray.Icon(APP_NAME, icon_image(self._dot), "VASA Avatar", menu=self._menu(self._tree))
        self._set_tooltip(tooltip(state))
        controller.listeners.append(self.refresh)
        controller.on_quit.append(self.icon.stop)

    def _menu(self, tree):
        return self._pystray.Menu(*(self._item(node) for node in tree.children))

    def _item(self, node):
        pystray = self._pystray
        if node.separator:
            return pystray.Menu.SEPARATOR
        if node.children:
            return pystray.MenuItem(node.text, self._menu(node), enabled=node.enabled)
        action = node.action
        handler = (lambda icon, item: self.controller.dispatch(action)) if action is not None else None
        checked = None if node.checked is None else (lambda item, value=node.checked: value)
        return pystray.MenuItem(node.text, handler, checked=checked, radio=node.radio, enabled=node.enabled)

    def refresh(self, state: TrayState) -> None:
        tree = build_menu(state)
        if tree != self._tree:
            self._tree = tree
            self.icon.menu = self._menu(tree)
        dot = icon_status(state)
        if dot != self._dot:
            self._dot = dot
            self.icon.icon = icon_image(dot)
        self._set_tooltip(tooltip(state))

    def _set_tooltip(self, text: str) -> None:
        if text == self._tip:
            return
        self._tip = text
        self.icon.title = text
        status_icon = getattr(self.icon, "_status_icon", None)  # pystray's gtk back-end sets only the
        if status_icon is not None:  # accessible title; the hover text is the tooltip
            from gi.repository import GLib

            GLib.idle_add(status_icon.set_tooltip_text, text)

    def notify(self, message: str) -> None:
        if self.icon.HAS_NOTIFICATION and self.icon.visible:
            self.icon.notify(message, "VASA Avatar")

    def run(self, on_ready: Callable[[], None]) -> None:
        def setup(icon):
            icon.visible = True
            log.info("tray ready (%s back-end)", type(icon).__module__.rsplit(".", 1)[-1].lstrip("_"))
            on_ready()

        self.icon.run(setup=setup)


# ---- entry point ---------------------------------------------------------------------------------

def log_path() -> Path:
    return data_dir() / "tray.log"


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    try:
        log_path().parent.mkdir(parents=True, exist_ok=True)
        file = RotatingFileHandler(log_path(), maxBytes=1_000_000, backupCount=1, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)
    except OSError as e:
        logging.getLogger("tray").warning("no log file (%s)", e)


def _uses_glib(icon) -> bool:
    return type(icon).__module__.rsplit(".", 1)[-1] in ("_gtk", "_appindicator")


def _stop_on_signals(stop: Callable[[], None], *, glib: bool) -> None:
    """SIGINT/SIGTERM quit cleanly (camera released). Under GLib's main loop a Python handler would
    only run when the loop hands control back to Python, so GLib delivers them; this must run on
    the loop, after pystray's gtk set-up has reset SIGINT to its default."""
    if glib:
        from gi.repository import GLib

        def install():
            for sig in (signal.SIGINT, signal.SIGTERM):
                GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, lambda *_: (stop(), False)[1])
            return False

        GLib.idle_add(install)
    elif threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: threading.Thread(target=stop, daemon=True).start())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vasa-avatar-tray", description="VASA Avatar in the system tray: runs the "
                                "live virtual camera and switches portraits, moods and framing from its menu.")
    p.add_argument("--print-menu", action="store_true", help="print the tray menu for the saved settings and exit")
    p.add_argument("--list-devices", action="store_true", help="list microphones and virtual cameras and exit")
    p.add_argument("--no-live", action="store_true",
                   help="menu and settings only: do not start the microphone, engines or camera")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens to the terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.print_menu:
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            state = TrayState(settings=load_settings(), autostart=autostart.is_enabled(),
                              status=DaemonStatus("stopped"))
            state, _ = apply(state, Action("portraits_changed", portrait_items(library.list_portraits())))
            print(format_menu(build_menu(state)))
            return 0
        if args.list_devices:
            from avatar.live import describe_devices

            print(describe_devices())
            return 0
        _setup_logging(args.verbose)
        return run_tray(live=not args.no_live)
    except AvatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_tray(*, live: bool = True) -> int:
    """Show the tray icon until Quit (or SIGINT/SIGTERM); with `live`, run the daemon behind it."""
    if os.environ.get("PYSTRAY_BACKEND") == "dummy":
        raise AvatarError("PYSTRAY_BACKEND=dummy cannot show a tray icon (it is for tests); "
                          "unset it, or use vasa-avatar run")
    if platform.system() == "Linux" and not has_display():
        raise AvatarError("the tray needs a desktop session (DISPLAY is not set); "
                          "without one use: vasa-avatar run")
    try:
        from gi.repository import GLib

        GLib.set_prgname(APP_NAME)  # the tray icon's window name (what a tray host shows)
    except ImportError:
        pass
    settings = load_settings()
    holder: dict[str, TrayController] = {}
    daemon = None
    if live:
        entry = library.resolve(settings.portrait)
        daemon = LiveHandle(portrait=entry.path, controls=settings.to_controls(), mic=settings.mic,
                            paused=settings.paused, preview=settings.preview,
                            on_preview_closed=lambda reason: _preview_closed(holder["c"], reason))
    ui = DesktopUI()
    controller = TrayController(daemon=daemon, ui=ui, settings=settings)
    holder["c"] = controller
    icon = TrayIcon(controller)
    ui._notify = icon.notify
    stopping = threading.Event()

    def ticker():
        while not stopping.wait(STATUS_EVERY_S):
            controller.poll_daemon()

    def quit():
        controller.dispatch(Action("quit"))

    glib = _uses_glib(icon.icon)

    def ready():
        if glib:
            _stop_on_signals(quit, glib=True)
        if daemon is not None:
            daemon.start()
        threading.Thread(target=ticker, name="tray-status", daemon=True).start()

    if not glib:
        _stop_on_signals(quit, glib=False)
    try:
        icon.run(on_ready=ready)
    finally:
        stopping.set()
        if daemon is not None:
            daemon.stop()
    log.info("tray: quit")
    return 0


def _preview_closed(controller: TrayController, reason: str | None) -> None:
    if reason:
        controller.ui.notify(reason)
    controller.dispatch(Action("preview_closed"))


if __name__ == "__main__":
    sys.exit(main())
