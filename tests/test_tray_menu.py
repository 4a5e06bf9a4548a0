"""The tray without a display: the menu model (every item, radio state, actions), the controller
driving a recording fake daemon, start at login, the icon image, the pystray conversion (dummy
back-end) and `vasa-avatar-tray --print-menu`."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from avatar import library
from avatar.controls import GAZE_TARGETS, MOODS, Controls
from avatar.settings import Settings, load_settings, save_settings
from tray import autostart
from tray.app import DOT_COLOURS, TrayController, icon_image
from tray.menu import Action, DaemonStatus, Effect, PortraitItem, TrayState, apply, build_menu, format_menu, \
    icon_status, tooltip, walk

REPO = Path(__file__).resolve().parent.parent
GRACE = REPO / "tests" / "data" / "faces" / "grace_hopper.jpg"
TOP = ["Portraits", "Mood", "Gaze", "Framing", "Expressiveness", "Pause", "Preview window", "Open portraits folder",
       "Start at login", "Doctor…", "Quit"]
PORTRAITS = (PortraitItem("astronaut", "Astronaut (bundled)", builtin=True), PortraitItem("grace", "Grace"),
             PortraitItem("gone", "Gone", problem="photo file is missing (/x/gone.jpg)"))


def state(**settings) -> TrayState:
    return TrayState(settings=Settings(**settings), portraits=PORTRAITS, status=DaemonStatus("running"))


def texts(node) -> list[str]:
    return [c.text for c in node.children if not c.separator]


def checked(node) -> list[str]:
    return [c.text for c in node.children if c.checked]


# ---- the model -----------------------------------------------------------------------------------

def test_every_item_is_present():
    tree = build_menu(state())
    assert texts(tree)[1:] == TOP  # [0] is the status line
    assert tree.children[0].text == "Running" and not tree.children[0].enabled
    assert texts(tree.find("Mood")) == ["Neutral", "Happy", "Surprised", "Chill", "Serious", "Sad"]
    assert [t.lower() for t in texts(tree.find("Mood"))] == list(MOODS)
    assert [t.lower() for t in texts(tree.find("Gaze"))] == list(GAZE_TARGETS) == \
        ["camera", "wander", "left", "right", "up", "down"]
    assert texts(tree.find("Framing")) == ["Close", "Medium", "Far"]
    assert texts(tree.find("Expressiveness")) == ["Low", "Normal", "High"]
    assert texts(tree.find("Portraits")) == ["Astronaut (bundled)", "Grace",
                                             "Gone (unavailable: photo file is missing (/x/gone.jpg))",
                                             "Add portrait…", "Remove current"]
    for depth, node in walk(tree):  # every enabled leaf does something
        if not node.separator and not node.children and node.enabled:
            assert node.action is not None, node.text


def test_radio_and_check_state_follow_the_settings():
    tree = build_menu(state(portrait="grace", mood="sad", gaze="left", framing="far", expressiveness="high",
                            preview=True))
    assert checked(tree.find("Portraits")) == ["Grace"]
    assert checked(tree.find("Mood")) == ["Sad"]
    assert checked(tree.find("Gaze")) == ["Left"]
    assert checked(tree.find("Framing")) == ["Far"]
    assert checked(tree.find("Expressiveness")) == ["High"]
    for menu in ("Portraits", "Mood", "Gaze", "Framing", "Expressiveness"):
        radios = [c for c in tree.find(menu).children if c.checked is not None]
        assert radios and all(c.radio for c in radios)
    assert tree.find("Preview window").checked is True and not tree.find("Preview window").radio
    assert build_menu(state()).find("Preview window").checked is False
    assert tree.find("Start at login").checked is False
    assert build_menu(replace(state(), autostart=True)).find("Start at login").checked is True
    # unusable portraits cannot be chosen; the bundled one cannot be removed
    assert not tree.find("Portraits", "Gone (unavailable: photo file is missing (/x/gone.jpg))").enabled
    assert tree.find("Portraits", "Remove current").enabled
    assert not build_menu(state()).find("Portraits", "Remove current").enabled


def test_every_radio_choice_changes_the_state_it_shows():
    s0 = state()
    tree = build_menu(s0)
    n = 0
    for menu in ("Portraits", "Mood", "Gaze", "Framing", "Expressiveness"):
        for item in tree.find(menu).children:
            if item.checked is None or not item.enabled:
                continue
            s1, effects = apply(s0, item.action)
            if item.checked:  # choosing what is chosen: nothing
                assert (s1, effects) == (s0, ())
                continue
            assert checked(build_menu(s1).find(menu)) == [item.text]
            assert effects[-1] == Effect("save_settings", s1.settings)
            n += 1
    assert n == 1 + 5 + 5 + 2 + 2


def test_mood_gaze_expressiveness_framing_effects():
    s1, effects = apply(state(), Action("set_mood", "happy"))
    assert s1.settings.mood == "happy"
    assert effects == (Effect("set_controls", Controls(mood="happy")), Effect("save_settings", s1.settings))
    _, effects = apply(s1, Action("set_gaze", "wander"))
    assert effects[0] == Effect("set_controls", Controls(mood="happy", gaze="wander"))
    _, effects = apply(s1, Action("set_expressiveness", "low"))
    assert effects[0].value.expressiveness == 0.5
    s2, effects = apply(s1, Action("set_framing", "close"))
    # framing is baked into the rig: the portrait is reloaded at the new distance, then the controls
    assert [e.kind for e in effects] == ["switch_portrait", "set_controls", "save_settings"]
    assert effects[0].value == ("astronaut", 0.75)
    assert effects[1].value.head_distance == 0.75
    with pytest.raises(Exception, match="mood cannot be 'furious'"):
        apply(state(), Action("set_mood", "furious"))
    with pytest.raises(ValueError, match="unknown tray action"):
        apply(state(), Action("fly"))


def test_portrait_pause_preview_and_other_actions():
    s1, effects = apply(state(framing="far"), Action("set_portrait", "grace"))
    assert s1.settings.portrait == "grace"
    assert effects[0] == Effect("switch_portrait", ("grace", 1.35))
    assert apply(state(), Action("set_portrait", "gone")) == (state(), ())  # unusable: ignored
    assert apply(state(), Action("set_portrait", "nobody")) == (state(), ())

    s2, effects = apply(state(), Action("toggle_pause"))
    assert s2.settings.paused and effects[0] == Effect("set_paused", True)
    assert texts(build_menu(s2))[1:][5] == "Resume" and "Pause" not in texts(build_menu(s2))
    assert icon_status(s2) == "paused"
    s3, effects = apply(s2, Action("toggle_pause"))
    assert not s3.settings.paused and effects[0] == Effect("set_paused", False)

    s4, effects = apply(state(), Action("toggle_preview"))
    assert s4.settings.preview and effects[0] == Effect("set_preview", True)
    s5, effects = apply(s4, Action("preview_closed"))  # the user closed the window: unchecked, saved
    assert not s5.settings.preview and [e.kind for e in effects] == ["save_settings"]

    assert apply(state(), Action("add_portrait"))[1] == (Effect("add_portrait_dialog"),)
    assert apply(state(portrait="grace"), Action("remove_portrait", "grace"))[1] == \
        (Effect("remove_portrait_dialog", "grace"),)
    assert apply(state(), Action("remove_portrait", "astronaut"))[1] == ()
    assert apply(state(), Action("toggle_autostart")) == (replace(state(), autostart=True),
                                                         (Effect("set_autostart", True),))
    assert apply(state(), Action("doctor"))[1] == (Effect("doctor"),)
    assert apply(state(), Action("quit"))[1] == (Effect("quit"),)


def test_current_portrait_vanishing_falls_back_to_the_bundled_one():
    s = state(portrait="grace", framing="close")
    s1, effects = apply(s, Action("portraits_changed", PORTRAITS[:1]))
    assert s1.settings.portrait == "astronaut"
    assert effects[0] == Effect("switch_portrait", ("astronaut", 0.75))
    s2, effects = apply(s, Action("portraits_changed", PORTRAITS[:2]))  # still there: nothing to do
    assert s2.settings == s.settings and effects == ()


def test_tooltip_and_status():
    s = replace(state(mood="happy"), status=DaemonStatus("running", fps=39.6, latency_ms=61.7))
    assert tooltip(s) == "VASA Avatar: Astronaut (bundled) · happy · 40 fps · 62 ms"
    s = replace(s, status=DaemonStatus("no_microphone", message="no input device found"))
    assert tooltip(s) == "VASA Avatar: Astronaut (bundled) · happy · No microphone: no input device found"
    assert icon_status(s) == "no_microphone"
    assert build_menu(s).children[0].text == "No microphone"
    s = replace(s, busy="analysing me.jpg…")
    assert tooltip(s).endswith("analysing me.jpg…")
    assert build_menu(s).children[0].text == "No microphone · analysing me.jpg…"
    assert not build_menu(s).find("Portraits", "Add portrait…").enabled


def test_format_menu():
    text = format_menu(build_menu(state(mood="chill")))
    lines = text.splitlines()
    assert lines[:3] == ["Running  (-)", "---", "Portraits"]
    assert "  (•) Chill" in lines and "  ( ) Neutral" in lines and "[ ] Preview window" in lines
    assert "  Remove current  (-)" in lines
    for item in TOP:
        assert any(line.endswith(item) for line in lines), item


# ---- the controller with a recording fake daemon ---------------------------------------------------

class FakeDaemon:
    """Implements tray.app.Daemon and records every call. Portrait switches finish when the test
    says so (`finish`), like the real one that loads the rig on a background thread."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.pending = []
        self.state = DaemonStatus("running", fps=40.0, latency_ms=55.0)

    def start(self):
        self.calls.append(("start",))

    def stop(self):
        self.calls.append(("stop",))

    def set_controls(self, controls):
        self.calls.append(("set_controls", controls))

    def switch_portrait(self, path, *, head_distance, on_done):
        self.calls.append(("switch_portrait", Path(path), head_distance))
        self.pending.append(on_done)

    def finish(self, error=None):
        self.pending.pop(0)(error)

    def set_paused(self, paused):
        self.calls.append(("set_paused", paused))

    def set_preview(self, on):
        self.calls.append(("set_preview", on))

    def status(self):
        return self.state


class FakeUI:
    def __init__(self, photo=None, answers=()):
        self.photo = photo
        self.answers = list(answers)
        self.asked, self.notes, self.texts, self.opened = [], [], [], []

    def choose_photo(self):
        return self.photo

    def confirm(self, title, question):
        self.asked.append(question)
        return self.answers.pop(0)

    def show_text(self, title, text):
        self.texts.append((title, text))

    def notify(self, message):
        self.notes.append(message)

    def open_folder(self, path):
        self.opened.append(path)


@pytest.fixture
def home(tmp_path, monkeypatch, rig_cache):
    monkeypatch.setenv("VASA_AVATAR_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("VASA_AVATAR_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / "xdg"))
    return tmp_path


def controller(ui=None, settings=None):
    daemon = FakeDaemon()
    c = TrayController(daemon=daemon, ui=ui or FakeUI(), settings=settings)
    seen = []
    c.listeners.append(seen.append)
    return c, daemon, seen


def test_switching_mood_calls_the_daemon_and_saves(home):
    c, daemon, seen = controller()
    c.dispatch(Action("set_mood", "happy"))
    assert daemon.calls == [("set_controls", Controls(mood="happy"))]
    assert load_settings().mood == "happy"
    assert seen[-1].settings.mood == "happy"
    c.dispatch(Action("set_mood", "happy"))  # no change: no call, no listener
    assert len(daemon.calls) == 1 and len(seen) == 1
    c.dispatch(Action("toggle_pause"))
    c.dispatch(Action("toggle_preview"))
    assert daemon.calls[1:] == [("set_paused", True), ("set_preview", True)]
    assert load_settings() == Settings(mood="happy", paused=True, preview=True)
    c.dispatch(Action("set_framing", "far"))
    assert daemon.calls[3] == ("switch_portrait", library.BUILTIN_PATH, 1.35)
    assert daemon.calls[4] == ("set_controls", Controls(mood="happy", head_distance=1.35))
    assert c.state.busy.startswith("loading")
    daemon.finish()
    assert c.state.busy == ""


def test_status_polling_updates_dot_and_tooltip(home):
    c, daemon, seen = controller()
    assert c.state.status.state == "starting"
    c.poll_daemon()
    assert icon_status(c.state) == "running" and "40 fps · 55 ms" in tooltip(c.state)
    daemon.state = DaemonStatus("no_camera", message="no virtual camera named \"VASA Avatar\"")
    c.poll_daemon()
    assert icon_status(seen[-1]) == "no_camera"


def test_add_switch_fail_and_remove_portraits(home):
    ui = FakeUI(photo=GRACE, answers=[False])
    c, daemon, _ = controller(ui)
    c.dispatch(Action("add_portrait"))
    c.wait_idle()
    assert ui.asked and "consent" in ui.asked[0]
    assert "consent (--i-have-consent)" in ui.notes[-1]
    assert [e.id for e in library.list_portraits()] == ["astronaut"] and daemon.calls == []

    ui.answers = [True]
    c.dispatch(Action("add_portrait"))
    c.wait_idle(120)
    assert [p.id for p in c.state.portraits] == ["astronaut", "grace-hopper"]
    assert c.state.settings.portrait == "grace-hopper" and load_settings().portrait == "grace-hopper"
    stored = library.get("grace-hopper").path
    assert daemon.calls[-1] == ("switch_portrait", stored, 1.0)
    daemon.finish()  # shown

    # a switch that fails goes back to what is shown
    c.dispatch(Action("set_portrait", "astronaut"))
    daemon.finish("cannot read portrait")
    assert c.state.settings.portrait == "grace-hopper" and load_settings().portrait == "grace-hopper"
    assert "cannot read portrait" in ui.notes[-1]

    ui.answers = [True]
    c.dispatch(Action("remove_portrait", "grace-hopper"))
    c.wait_idle()
    assert not stored.exists()
    assert [p.id for p in c.state.portraits] == ["astronaut"]
    assert c.state.settings.portrait == "astronaut"
    assert daemon.calls[-1] == ("switch_portrait", library.BUILTIN_PATH, 1.0)


def test_saved_portrait_that_went_missing_starts_on_the_bundled_one(home):
    save_settings(Settings(portrait="deleted-one", mood="serious"))
    c, _, _ = controller()
    assert c.state.settings.portrait == "astronaut" and c.state.settings.mood == "serious"
    assert checked(build_menu(c.state).find("Portraits")) == ["Astronaut (bundled)"]


def test_autostart_doctor_folder_and_quit(home):
    ui = FakeUI()
    c, daemon, _ = controller(ui)
    c.dispatch(Action("toggle_autostart"))
    desktop = home / "home" / "xdg" / "autostart" / "vasa-avatar.desktop"
    assert desktop.is_file() and c.state.autostart
    c.dispatch(Action("toggle_autostart"))
    assert not desktop.exists() and not c.state.autostart
    c.dispatch(Action("open_portraits_folder"))
    assert ui.opened == [library.portraits_dir()] and library.portraits_dir().is_dir()
    quits = []
    c.on_quit.append(lambda: quits.append(1))
    c.dispatch(Action("quit"))
    assert daemon.calls[-1] == ("stop",) and quits == [1]


# ---- start at login -------------------------------------------------------------------------------

def test_autostart_linux(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    path = tmp_path / ".config" / "autostart" / "vasa-avatar.desktop"
    assert not autostart.is_enabled(system="Linux")
    assert autostart.enable(system="Linux", command=["/opt/my apps/vasa-avatar-tray"]) == path
    text = path.read_text()
    assert "[Desktop Entry]" in text and 'Exec="/opt/my apps/vasa-avatar-tray"' in text
    assert autostart.is_enabled(system="Linux")
    assert autostart.disable(system="Linux") and not path.exists()
    assert not autostart.disable(system="Linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert autostart.enable(system="Linux") == tmp_path / "xdg" / "autostart" / "vasa-avatar.desktop"
    exec_line = next(line for line in autostart.entry_path("Linux").read_text().splitlines()
                     if line.startswith("Exec="))
    cmd = autostart.launch_command()
    assert exec_line.startswith("Exec=" + cmd[0]) and (len(cmd) == 1 or exec_line.endswith("-m tray"))


def test_autostart_windows_and_macos_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("APPDATA", str(tmp_path / "AppData"))
    cmd = [r"C:\Program Files\Python\pythonw.exe", "-m", "tray"]
    vbs = autostart.enable(system="Windows", command=cmd)
    assert vbs == tmp_path / "AppData" / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup" / \
        "VASA Avatar.vbs"
    assert vbs.read_bytes() == (b'CreateObject("WScript.Shell").Run """C:\\Program Files\\Python\\pythonw.exe"" '
                                b'""-m"" ""tray""", 0, False\r\n')
    plist = autostart.enable(system="Darwin", command=cmd)
    assert plist == tmp_path / "Library" / "LaunchAgents" / "org.vasa-avatar.tray.plist"
    data = plistlib.loads(plist.read_bytes())
    assert data["ProgramArguments"] == cmd and data["RunAtLoad"] is True
    assert autostart.is_enabled(system="Darwin") and autostart.disable(system="Darwin")
    assert not autostart.is_enabled(system="Darwin")


# ---- the icon, the pystray menu, --print-menu --------------------------------------------------------

def test_icon_dot_shows_the_status():
    images = {}
    for status, colour in DOT_COLOURS.items():
        img = np.asarray(icon_image(status, size=64).convert("RGB")).astype(int)
        dot = img[64 - 15, 64 - 15]  # the dot's centre
        assert np.abs(dot - colour).max() <= 3, (status, dot)
        images[status] = img
    assert np.abs(images["running"] - images["paused"]).max() > 100
    body = images["running"][20:30, 5:10]  # away from the dot: the same in every status
    assert all((img[20:30, 5:10] == body).all() for img in images.values())


def test_pystray_menu_from_the_model(monkeypatch):
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")
    import pystray

    if not pystray.Icon.__module__.endswith("_base"):
        pytest.skip(f"pystray was already imported with another back-end ({pystray.Icon.__module__})")
    from tray.app import TrayIcon

    class Recorder:
        def __init__(self):
            self.state = state(mood="serious")
            self.listeners, self.on_quit, self.actions = [], [], []

        def dispatch(self, action):
            self.actions.append(action)

    rec = Recorder()
    icon = TrayIcon(rec).icon
    items = list(icon.menu)
    assert [i.text for i in items if i is not pystray.Menu.SEPARATOR][1:] == TOP
    mood = next(i for i in items if i.text == "Mood")
    entries = list(mood.submenu)
    assert [i.text for i in entries] == ["Neutral", "Happy", "Surprised", "Chill", "Serious", "Sad"]
    assert [i.checked for i in entries] == [False, False, False, False, True, False]
    assert all(i.radio for i in entries)
    entries[1](icon)  # click "Happy"
    assert rec.actions == [Action("set_mood", "happy")]
    preview = next(i for i in items if i.text == "Preview window")
    assert preview.checked is False and not preview.radio
    assert rec.listeners and rec.on_quit  # the icon follows the controller's state and quits with it


def test_print_menu_command(tmp_path):
    env = {**os.environ, "VASA_AVATAR_CONFIG": str(tmp_path / "c"), "VASA_AVATAR_DATA": str(tmp_path / "d"),
           "HOME": str(tmp_path / "h"), "XDG_CONFIG_HOME": str(tmp_path / "h" / "xdg"),
           "PYTHONPATH": str(REPO)}
    env.pop("DISPLAY", None)  # no display needed
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "settings.json").write_text('{"mood": "surprised", "framing": "close", "preview": true}')
    done = subprocess.run([sys.executable, "-m", "tray", "--print-menu"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Not running  (-)"
    assert "  (•) Surprised" in lines and "  (•) Close" in lines and "  (•) Astronaut (bundled)" in lines
    assert "[x] Preview window" in lines and "[ ] Start at login" in lines and lines[-1] == "Quit"
    expected = format_menu(build_menu(apply(
        TrayState(settings=Settings(mood="surprised", framing="close", preview=True),
                  status=DaemonStatus("stopped")),
        Action("portraits_changed", (PortraitItem("astronaut", "Astronaut (bundled)", builtin=True),)))[0]))
    assert done.stdout == expected + "\n"


def test_unsaveable_settings_are_reported_not_fatal(home):
    blocker = home / "not-a-folder"
    blocker.write_text("")
    ui = FakeUI()
    daemon = FakeDaemon()
    c = TrayController(daemon=daemon, ui=ui, settings=Settings(), settings_file=blocker / "settings.json")
    c.dispatch(Action("set_mood", "chill"))
    assert c.state.settings.mood == "chill" and daemon.calls == [("set_controls", Controls(mood="chill"))]
    assert ui.notes and ui.notes[-1].startswith("cannot save settings")


def test_desktop_dialogs_without_a_display(monkeypatch):
    from tray.dialogs import HEADLESS_ADD, DesktopUI

    monkeypatch.setattr("platform.system", lambda: "Linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    notes = []
    ui = DesktopUI(notifier=notes.append)
    assert ui.choose_photo() is None and notes == [HEADLESS_ADD]
    assert ui.confirm("Add portrait", "consent?") is False  # never a silent yes
    assert "vasa-avatar portraits add" in HEADLESS_ADD
