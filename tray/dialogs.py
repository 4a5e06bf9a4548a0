"""Dialogs and desktop actions for the tray: file chooser, yes/no question, text report, opening
a folder, notifications.

Each dialog runs as its own process (zenity, kdialog, or a small tkinter script, whichever exists
in that order), so no second GUI toolkit runs inside the tray's main loop and a dialog never blocks
the menu. Without a display every dialog becomes a logged notification.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Protocol

from tray import log_path

log = logging.getLogger("tray")

PHOTO_PATTERNS = "*.jpg *.jpeg *.png *.webp *.bmp *.tif *.tiff *.JPG *.JPEG *.PNG"
HEADLESS_ADD = ("adding a portrait needs a desktop session; in a terminal use: "
                "vasa-avatar portraits add PHOTO --i-have-consent")
NO_DIALOG_ADD = ("no file dialog available (install zenity, or Tk for Python: python3-tk); in a terminal use: "
                 "vasa-avatar portraits add PHOTO --i-have-consent")


class UI(Protocol):
    """Dialogs and desktop actions (DesktopUI; tests use a scripted fake)."""

    def choose_photo(self) -> Path | None: ...

    def confirm(self, title: str, question: str) -> bool: ...

    def show_text(self, title: str, text: str) -> None: ...

    def notify(self, message: str) -> None: ...

    def open_folder(self, path: Path) -> None: ...


# A tkinter dialog in its own process: argv mode ("open", "yesno", "text"), title, text.
_TK_DIALOG = r"""
import os, sys, tkinter as tk
from tkinter import filedialog, messagebox
mode, title, text = sys.argv[1:4]
root = tk.Tk()
root.withdraw()
if mode == "open":
    start = os.path.expanduser("~/Pictures")
    print(filedialog.askopenfilename(title=title, filetypes=[("Photos", text), ("All files", "*")],
                                     initialdir=start if os.path.isdir(start) else os.path.expanduser("~")) or "")
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

    def __init__(self, notifier: Callable[[str], None] | None = None):
        self.notifier = notifier  # shows a message on the desktop (the tray icon's notification)

    def _tool(self) -> str | None:
        if not has_display():
            return None
        for tool in ("zenity", "kdialog"):
            if platform.system() == "Linux" and shutil.which(tool):
                return tool
        return "tk" if importlib.util.find_spec("_tkinter") else None

    def _tk(self, mode: str, title: str, text: str) -> str:
        done = subprocess.run([sys.executable, "-c", _TK_DIALOG, mode, title, text], capture_output=True, text=True)
        return done.stdout.strip()

    def choose_photo(self) -> Path | None:
        tool = self._tool()
        if tool is None:
            self.notify(HEADLESS_ADD if not has_display() else NO_DIALOG_ADD)
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
            self.notify(f"{title}: no dialog available to ask (install zenity or python3-tk); not done")
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
        if self.notifier is not None:
            try:
                self.notifier(message)
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
