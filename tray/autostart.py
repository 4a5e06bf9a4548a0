"""Start at login: the tray app launched when the user logs in, per OS.

- Linux (and other freedesktop systems): $XDG_CONFIG_HOME/autostart/vasa-avatar.desktop
  (XDG_CONFIG_HOME defaults to ~/.config), the XDG autostart spec every desktop honours.
- Windows: "VASA Avatar.vbs" in the user's Startup folder (%APPDATA%\\Microsoft\\Windows\\Start Menu\\
  Programs\\Startup). A .vbs starts the app with no console window, which a .bat would flash.
- macOS: ~/Library/LaunchAgents/org.vasa-avatar.tray.plist with RunAtLoad, which launchd reads at login.

The launched command is the `vasa-avatar-tray` script when it is on PATH, else this Python running
`-m tray` (so a checkout without the script installed works too).
"""

from __future__ import annotations

import os
import platform
import plistlib
import shutil
import sys
from pathlib import Path

APP_ID = "vasa-avatar"
LAUNCH_AGENT_LABEL = "org.vasa-avatar.tray"


def _system(system: str | None) -> str:
    return system or platform.system()


def launch_command() -> list[str]:
    """The argv that starts the tray app."""
    script = shutil.which("vasa-avatar-tray")
    if script:
        return [script]
    python = Path(sys.executable)
    if os.name == "nt":  # pythonw: no console window
        windowed = python.with_name("pythonw.exe")
        if windowed.is_file():
            python = windowed
    return [str(python), "-m", "tray"]


def entry_path(system: str | None = None) -> Path:
    """The file that makes the app start at login on `system` (platform.system() name)."""
    system = _system(system)
    home = Path(os.environ.get("HOME") or Path.home())
    if system == "Windows":
        appdata = os.environ.get("APPDATA")
        base = Path(appdata) if appdata else home / "AppData" / "Roaming"
        return base / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup" / "VASA Avatar.vbs"
    if system == "Darwin":
        return home / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and Path(config).is_absolute() else home / ".config"
    return base / "autostart" / f"{APP_ID}.desktop"


def _desktop_quote(arg: str) -> str:
    """An Exec= argument per the desktop entry spec: quoted when it has reserved characters; inside
    quotes ", `, $ and \\ are escaped with a backslash, then the value's own escaping doubles every
    backslash (so a literal backslash is written as four); a literal % is written %%."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in " \t\n\"'\\><~|&;$*?#()`"):
        return arg
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg)
    return '"' + escaped.replace("\\", "\\\\") + '"'


def desktop_entry(command: list[str]) -> str:
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Name=VASA Avatar",
        "Comment=Talking-face virtual camera (tray)",
        "Exec=" + " ".join(_desktop_quote(a) for a in command),
        "Terminal=false",
        "X-GNOME-Autostart-enabled=true",
        "",
    ])


def windows_script(command: list[str]) -> str:
    # each argument in quotes, and in a VBScript string literal a quote is written twice
    # (Windows paths cannot contain quotes, so none need escaping inside an argument)
    line = " ".join(f'""{a}""' for a in command)
    return f'CreateObject("WScript.Shell").Run "{line}", 0, False\r\n'


def launch_agent(command: list[str]) -> bytes:
    return plistlib.dumps({"Label": LAUNCH_AGENT_LABEL, "ProgramArguments": command, "RunAtLoad": True,
                           "ProcessType": "Interactive"})


def enable(*, system: str | None = None, command: list[str] | None = None) -> Path:
    """Make the tray app start at login; returns the file written (atomically)."""
    system = _system(system)
    command = command or launch_command()
    path = entry_path(system)
    if system == "Windows":
        data = windows_script(command).encode("utf-8")
    elif system == "Darwin":
        data = launch_agent(command)
    else:
        data = desktop_entry(command).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def disable(*, system: str | None = None) -> bool:
    """Stop starting at login. Returns whether there was an entry to remove."""
    path = entry_path(system)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def is_enabled(*, system: str | None = None) -> bool:
    return entry_path(system).is_file()
