"""`vasa-avatar-tray`: the system-tray app that runs the live daemon and switches what it shows.

    menu click ─► TrayController.dispatch(Action) ─► tray.menu.apply ─► new TrayState + Effects
                                                          │
          LiveHandle (tray/daemon.py) ◄── set_controls / switch_portrait / set_paused / set_preview
          settings.json ◄── save_settings        dialogs, library, autostart ◄── the other effects
    every second: LiveHandle.status() ─► TrayState.status ─► icon dot, tooltip, menu status line

The menu is data (tray/menu.py); TrayIcon turns it into a pystray menu and rebuilds it when the
state changes. pystray is imported only when the icon is made, so `--print-menu` and the
controller's tests need no display. Long work (dialogs, adding a portrait, doctor) runs on
worker threads, never on the tray's main loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from avatar import library
from avatar.errors import AvatarError
from avatar.memory import steady_heap
from avatar.settings import Settings, load_settings, save_settings, settings_path
from tray import autostart, log_path
from tray.daemon import STATUS_EVERY_S, Daemon, LiveHandle
from tray.dialogs import UI, DesktopUI, has_display
from tray.menu import Action, DaemonStatus, Effect, PortraitItem, TrayState, apply, build_menu, format_menu, \
    icon_status, tooltip

log = logging.getLogger("tray")

APP_NAME = "vasa-avatar"
DOCTOR_TIMEOUT_S = 120
CONSENT_QUESTION = ("Do you have the consent of the person in this photo to animate their face?\n\n"
                    "Only add photos of yourself or of people who agreed to it. The video will carry a "
                    "visible \"AI\" badge and an invisible watermark.")

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
        if self.state.settings != before.settings:
            log.info("settings: %s", ", ".join(f"{k}={v}" for k, v in vars(self.state.settings).items()
                                                if getattr(before.settings, k) != v))
        if self.state != before:
            for listener in list(self.listeners):
                listener(self.state)
        return self.state

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
        self._quitting = False
        controller.listeners.append(self.refresh)
        controller.on_quit.append(self.stop)

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

        try:
            self.icon.run(setup=setup)
        except Exception:
            if not self._quitting:
                raise
            # pystray's gtk back-end hides its notification on the way out and raises when the
            # desktop has no notification service; the icon is gone by then
            log.debug("tray back-end failed while closing", exc_info=True)

    def stop(self) -> None:
        self._quitting = True
        self.icon.stop()


# ---- entry point ---------------------------------------------------------------------------------

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
    steady_heap()
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
                            paused=settings.paused, preview=settings.preview, badge=settings.badge,
                            on_preview_closed=lambda reason: _preview_closed(holder["c"], reason))
    ui = DesktopUI()
    controller = TrayController(daemon=daemon, ui=ui, settings=settings)
    holder["c"] = controller
    icon = TrayIcon(controller)
    ui.notifier = icon.notify
    stopping = threading.Event()

    def ticker():
        while not stopping.wait(STATUS_EVERY_S):
            controller.poll_daemon()

    def request_quit():
        controller.dispatch(Action("quit"))

    glib = _uses_glib(icon.icon)

    def ready():
        if glib:
            _stop_on_signals(request_quit, glib=True)
        if daemon is not None:
            daemon.start()
        threading.Thread(target=ticker, name="tray-status", daemon=True).start()

    if not glib:
        _stop_on_signals(request_quit, glib=False)
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
