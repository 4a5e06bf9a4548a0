"""The tray's menu as data: what it shows for a state, and what each choice changes.

Pure: no pystray, no display, no files. `build_menu(state)` gives a tree of `MenuNode`s whose
items carry `Action`s; `apply(state, action)` returns the new state and the `Effect`s that the
app must carry out (talk to the daemon, save the settings, open a dialog...). tray/app.py turns
the tree into a pystray menu and runs the effects; tests walk the same tree without a display.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from avatar.controls import GAZE_TARGETS, MOODS
from avatar.settings import DEFAULT_PORTRAIT_ID, EXPRESSIVENESS, FRAMINGS, Settings

# What the daemon is doing, as the icon's status dot and the menu's first line show it.
STATUSES = {
    "starting": "Starting…",
    "running": "Running",
    "paused": "Paused",
    "no_microphone": "No microphone",
    "no_camera": "No virtual camera",
    "error": "Stopped by an error",
    "menu_only": "Not rendering (--no-live)",
    "stopped": "Not running",
}


@dataclass(frozen=True)
class Action:
    """What a menu item does, as data: e.g. Action("set_mood", "happy")."""

    kind: str
    value: Any = None


@dataclass(frozen=True)
class Effect:
    """Something the app must do after an action: e.g. Effect("set_controls", Controls(...))."""

    kind: str
    value: Any = None


@dataclass(frozen=True)
class MenuNode:
    """One menu entry. `checked` is None for plain items, True/False for check and radio items;
    a node with `children` is a submenu; `separator` nodes have no text."""

    text: str = ""
    action: Action | None = None
    children: tuple[MenuNode, ...] = ()
    checked: bool | None = None
    radio: bool = False
    enabled: bool = True
    separator: bool = False

    def find(self, *path: str) -> MenuNode:
        """The descendant reached by following item texts (KeyError if there is none)."""
        node = self
        for text in path:
            for child in node.children:
                if child.text == text:
                    node = child
                    break
            else:
                raise KeyError(f"no menu item {text!r} under {node.text or 'the menu'!r}")
        return node


SEPARATOR = MenuNode(separator=True)


@dataclass(frozen=True)
class PortraitItem:
    """A library entry as the menu shows it."""

    id: str
    name: str
    problem: str | None = None
    builtin: bool = False


@dataclass(frozen=True)
class DaemonStatus:
    """A snapshot of the live daemon for the icon and tooltip."""

    state: str = "starting"  # a key of STATUSES
    fps: float | None = None  # fresh frames per second over the last second
    latency_ms: float | None = None  # audio-to-camera, median over the recent window
    message: str = ""  # the one-line reason for no_microphone / no_camera / error


@dataclass(frozen=True)
class TrayState:
    settings: Settings = field(default_factory=Settings)
    portraits: tuple[PortraitItem, ...] = ()
    status: DaemonStatus = field(default_factory=DaemonStatus)
    autostart: bool = False
    busy: str = ""  # a long task in progress, e.g. "Analysing grace.jpg…"

    def portrait(self) -> PortraitItem | None:
        return next((p for p in self.portraits if p.id == self.settings.portrait), None)


# ---- the menu ------------------------------------------------------------------------------------

def _radio(options, current: str, kind: str, label=str.capitalize) -> tuple[MenuNode, ...]:
    return tuple(MenuNode(label(o), Action(kind, o), checked=o == current, radio=True) for o in options)


def _portrait_label(p: PortraitItem) -> str:
    return f"{p.name} (unavailable: {p.problem})" if p.problem else p.name


def build_menu(state: TrayState) -> MenuNode:
    """The whole tray menu for `state` (the root node; its children are the top-level items)."""
    s = state.settings
    current = state.portrait()
    portraits = tuple(MenuNode(_portrait_label(p), Action("set_portrait", p.id), checked=p.id == s.portrait,
                               radio=True, enabled=p.problem is None) for p in state.portraits)
    can_remove = current is not None and not current.builtin
    portraits += (SEPARATOR,
                  MenuNode("Add portrait…", Action("add_portrait"), enabled=not state.busy),
                  MenuNode("Remove current", Action("remove_portrait", s.portrait), enabled=can_remove))
    status = STATUSES.get(state.status.state, state.status.state)
    if state.busy:
        status = f"{status} · {state.busy}"
    pause = "Resume" if s.paused else "Pause"
    return MenuNode(children=(
        MenuNode(status, enabled=False),
        SEPARATOR,
        MenuNode("Portraits", children=portraits),
        MenuNode("Mood", children=_radio(MOODS, s.mood, "set_mood")),
        MenuNode("Gaze", children=_radio(GAZE_TARGETS, s.gaze, "set_gaze")),
        MenuNode("Framing", children=_radio(FRAMINGS, s.framing, "set_framing")),
        MenuNode("Expressiveness", children=_radio(EXPRESSIVENESS, s.expressiveness, "set_expressiveness")),
        SEPARATOR,
        MenuNode(pause, Action("toggle_pause")),
        MenuNode("Preview window", Action("toggle_preview"), checked=s.preview),
        MenuNode("Open portraits folder", Action("open_portraits_folder")),
        MenuNode("Start at login", Action("toggle_autostart"), checked=state.autostart),
        MenuNode("Doctor…", Action("doctor")),
        SEPARATOR,
        MenuNode("Quit", Action("quit")),
    ))


def walk(node: MenuNode, depth: int = 0):
    """(depth, node) for every node under `node`, depth first, in menu order."""
    for child in node.children:
        yield depth, child
        yield from walk(child, depth + 1)


def format_menu(tree: MenuNode) -> str:
    """The menu as indented text (`vasa-avatar-tray --print-menu`): (•)/( ) radio, [x]/[ ] check,
    `-` items that are greyed out, `---` separators."""
    lines = []
    for depth, node in walk(tree):
        if node.separator:
            text = "---"
        else:
            mark = "" if node.checked is None else ("(•) " if node.checked else "( ) ") if node.radio else \
                ("[x] " if node.checked else "[ ] ")
            text = f"{mark}{node.text}" + ("" if node.enabled else "  (-)")
        lines.append("  " * depth + text)
    return "\n".join(lines)


def tooltip(state: TrayState) -> str:
    """The icon's tooltip: portrait, mood, frame rate and latency, or what is wrong."""
    p = state.portrait()
    parts = [f"VASA Avatar: {p.name if p else state.settings.portrait}", state.settings.mood]
    st = state.status
    if st.state == "running":
        if st.fps is not None:
            parts.append(f"{st.fps:.0f} fps")
        if st.latency_ms is not None:
            parts.append(f"{st.latency_ms:.0f} ms")
    else:
        parts.append(STATUSES.get(st.state, st.state) + (f": {st.message}" if st.message else ""))
    if state.busy:
        parts.append(state.busy)
    return " · ".join(parts)


def icon_status(state: TrayState) -> str:
    """Which status dot the icon wears (a key of STATUSES)."""
    if state.settings.paused and state.status.state == "running":
        return "paused"
    return state.status.state


# ---- actions -------------------------------------------------------------------------------------

_SETTING_ACTIONS = {"set_mood": "mood", "set_gaze": "gaze", "set_framing": "framing",
                    "set_expressiveness": "expressiveness"}


def apply(state: TrayState, action: Action) -> tuple[TrayState, tuple[Effect, ...]]:
    """The state after `action` and the effects the app must carry out, in order.

    Settings changes always end with Effect("save_settings", settings). Choosing what is already
    chosen changes nothing and has no effects.
    """
    s = state.settings
    kind, value = action.kind, action.value

    def changed(**kw) -> tuple[TrayState, list[Effect]]:
        new = replace(s, **kw)
        return replace(state, settings=new), []

    if kind in _SETTING_ACTIONS:
        name = _SETTING_ACTIONS[kind]
        if getattr(s, name) == value:
            return state, ()
        new_state, effects = changed(**{name: value})  # Settings validates the value
        new = new_state.settings
        if kind == "set_framing":  # framing is baked into the rig: rebuild it for the new distance
            effects.append(Effect("switch_portrait", (new.portrait, new.head_distance)))
        effects.append(Effect("set_controls", new.to_controls()))
    elif kind == "set_portrait":
        item = next((p for p in state.portraits if p.id == value), None)
        if value == s.portrait or item is None or item.problem:
            return state, ()
        new_state, effects = changed(portrait=value)
        effects.append(Effect("switch_portrait", (value, s.head_distance)))
    elif kind == "toggle_pause":
        new_state, effects = changed(paused=not s.paused)
        effects.append(Effect("set_paused", not s.paused))
    elif kind == "toggle_preview":
        new_state, effects = changed(preview=not s.preview)
        effects.append(Effect("set_preview", not s.preview))
    elif kind == "preview_closed":  # the user closed the preview window itself
        if not s.preview:
            return state, ()
        new_state, effects = changed(preview=False)
    elif kind == "portraits_changed":  # the library was read again: value is the new PortraitItems
        items = tuple(value)
        new_state, effects = replace(state, portraits=items), []
        if not any(p.id == s.portrait and p.problem is None for p in items):
            # the current portrait went away: back to the bundled one
            new_state = replace(new_state, settings=replace(s, portrait=DEFAULT_PORTRAIT_ID))
            effects.append(Effect("switch_portrait", (DEFAULT_PORTRAIT_ID, s.head_distance)))
        else:
            return new_state, ()
    elif kind == "portrait_failed":  # value: (failed id, id to go back to)
        failed, previous = value
        if s.portrait != failed:
            return state, ()
        new_state, effects = changed(portrait=previous)
    elif kind == "daemon_status":
        return replace(state, status=value), ()
    elif kind == "busy":
        return replace(state, busy=value or ""), ()
    elif kind == "toggle_autostart":
        return replace(state, autostart=not state.autostart), (Effect("set_autostart", not state.autostart),)
    elif kind == "autostart_is":
        return replace(state, autostart=bool(value)), ()
    elif kind == "add_portrait":
        return state, (Effect("add_portrait_dialog"),)
    elif kind == "remove_portrait":
        item = next((p for p in state.portraits if p.id == value), None)
        if item is None or item.builtin:
            return state, ()
        return state, (Effect("remove_portrait_dialog", value),)
    elif kind == "open_portraits_folder":
        return state, (Effect("open_portraits_folder"),)
    elif kind == "doctor":
        return state, (Effect("doctor"),)
    elif kind == "quit":
        return state, (Effect("quit"),)
    else:
        raise ValueError(f"unknown tray action {kind!r}")
    effects.append(Effect("save_settings", new_state.settings))
    return new_state, tuple(effects)
