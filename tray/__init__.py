"""The system-tray app (`vasa-avatar-tray`).

    menu.py      the menu as data: build_menu(state), apply(state, action) -> state, effects (pure)
    app.py       TrayController (runs the effects), the pystray icon, main()
    daemon.py    LiveHandle: the live daemon with switches that act between frames
    dialogs.py   file chooser, consent question, doctor report (zenity / kdialog / tkinter)
    autostart.py start at login on Linux, Windows and macOS
"""

from pathlib import Path


def log_path() -> Path:
    """The tray's log file (the tray has no terminal): <data dir>/tray.log."""
    from avatar.settings import data_dir

    return data_dir() / "tray.log"
