"""The user's settings, shared by the tray and `vasa-avatar run`: portrait, mood, gaze, framing...

Stored as JSON in platformdirs' user_config_dir("vasa-avatar")/settings.json ($VASA_AVATAR_CONFIG
overrides the folder, for tests). Writes are atomic (temp file + fsync + os.replace), so a crash
mid-write leaves the old file. A file that cannot be read as settings is logged once, moved aside
to settings.json.bad (kept, not lost) and the defaults are used: a damaged file never stops the
app. A single bad value (an unknown mood, say) falls back to its default and keeps the others.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from avatar.errors import AvatarError

log = logging.getLogger(__name__)

APP_NAME = "vasa-avatar"
SETTINGS_FILE = "settings.json"
DEFAULT_PORTRAIT_ID = "astronaut"  # the bundled portrait, always in the library (avatar/library.py)

# Framing presets -> Controls.head_distance (1.0 = head and shoulders; smaller is closer).
FRAMINGS: dict[str, float] = {"close": 0.75, "medium": 1.0, "far": 1.35}
# Expressiveness presets -> Controls.expressiveness (motion intensity, 1 = natural).
EXPRESSIVENESS: dict[str, float] = {"low": 0.5, "normal": 1.0, "high": 1.6}


def config_dir() -> Path:
    """$VASA_AVATAR_CONFIG if set, else the user config dir for vasa-avatar."""
    root = os.environ.get("VASA_AVATAR_CONFIG")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME))


def cache_dir(kind: str) -> Path:
    """$VASA_AVATAR_CACHE/<kind> if set, else the user cache dir's vasa-avatar/<kind> (rigs, engines)."""
    root = os.environ.get("VASA_AVATAR_CACHE")
    if root:
        return Path(root) / kind
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME)) / kind


def data_dir() -> Path:
    """$VASA_AVATAR_DATA if set, else the user data dir for vasa-avatar (the portrait library lives here)."""
    root = os.environ.get("VASA_AVATAR_DATA")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def settings_path() -> Path:
    return config_dir() / SETTINGS_FILE


@dataclass(frozen=True)
class Settings:
    """What the user chose in the tray (or `vasa-avatar run` reads). Names, not numbers: the presets
    above turn them into Controls. `mic` is part of a device name (None = the system default)."""

    portrait: str = DEFAULT_PORTRAIT_ID  # a library id (avatar/library.py)
    mood: str = "neutral"  # a key of avatar.controls.MOODS
    gaze: str = "camera"  # a key of avatar.controls.GAZE_TARGETS
    framing: str = "medium"  # a key of FRAMINGS
    expressiveness: str = "normal"  # a key of EXPRESSIVENESS
    preview: bool = False  # show the preview window
    mic: str | None = None
    paused: bool = False
    badge: bool = True  # the visible "AI" disclosure badge

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not check_value(f.name, value):
                choices = _choices().get(f.name)
                allowed = f"use one of {', '.join(choices)}" if choices else "see avatar/settings.py"
                raise AvatarError(f"setting {f.name} cannot be {value!r}: {allowed}")

    @property
    def head_distance(self) -> float:
        return FRAMINGS[self.framing]

    def to_controls(self, **overrides):
        """The Controls these settings stand for (`overrides`: other Controls fields, e.g. seed)."""
        from avatar.controls import Controls

        return Controls(mood=self.mood, gaze=self.gaze, head_distance=FRAMINGS[self.framing],
                        expressiveness=EXPRESSIVENESS[self.expressiveness], **overrides)


def _choices() -> dict[str, tuple[str, ...]]:
    from avatar.controls import GAZE_TARGETS, MOODS

    return {"mood": tuple(MOODS), "gaze": tuple(GAZE_TARGETS), "framing": tuple(FRAMINGS),
            "expressiveness": tuple(EXPRESSIVENESS)}


def check_value(name: str, value) -> bool:
    """Whether `value` is acceptable for the Settings field `name`."""
    choices = _choices()
    if name in choices:
        return value in choices[name]
    if name in ("preview", "paused", "badge"):
        return isinstance(value, bool)
    if name == "portrait":
        return isinstance(value, str) and bool(value)
    if name == "mic":
        return value is None or (isinstance(value, str) and bool(value.strip()))
    return False


def settings_from_dict(data: dict) -> tuple[Settings, list[str]]:
    """Settings from a decoded JSON object: unknown keys ignored, each bad value replaced by its
    default. Returns the settings and the names of the fields that were replaced."""
    defaults = Settings()
    values, bad = {}, []
    for f in fields(Settings):
        if f.name not in data:
            continue
        if check_value(f.name, data[f.name]):
            values[f.name] = data[f.name]
        else:
            bad.append(f.name)
    return replace(defaults, **values), bad


def write_json_atomic(path: Path, data) -> None:
    """Write `data` as JSON to `path` so that readers see the old file or the new one, never half:
    a temp file in the same folder, fsync, os.replace, then fsync of the folder (POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json_or_set_aside(path: Path, what: str):
    """The decoded JSON in `path`, or None when it is missing. A file that is not valid JSON is
    logged, renamed to `<name>.bad` (replacing an older one) and None is returned."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read %s %s (%s); using defaults", what, path, e.strerror or e)
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        set_aside(path, what, f"not valid JSON: {e}")
        return None


def set_aside(path: Path, what: str, reason: str) -> None:
    bad = path.with_name(path.name + ".bad")
    try:
        os.replace(path, bad)
        log.warning("%s %s is damaged (%s); moved it to %s and started from defaults", what, path, reason, bad)
    except OSError as e:
        log.warning("%s %s is damaged (%s) and could not be moved aside (%s); using defaults",
                    what, path, reason, e.strerror or e)


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """The saved settings, or the defaults when there are none. Never raises for a bad file."""
    path = Path(path) if path is not None else settings_path()
    data = read_json_or_set_aside(path, "settings file")
    if data is None:
        return Settings()
    if not isinstance(data, dict):
        set_aside(path, "settings file", f"expected a JSON object, found {type(data).__name__}")
        return Settings()
    settings, bad = settings_from_dict(data)
    if bad:
        log.warning("settings file %s: ignored unusable %s; using the default%s", path, ", ".join(bad),
                    "s" if len(bad) > 1 else "")
    return settings


def save_settings(settings: Settings, path: str | os.PathLike | None = None) -> Path:
    """Write `settings` atomically; returns the file written."""
    path = Path(path) if path is not None else settings_path()
    write_json_atomic(path, asdict(settings))
    return path
