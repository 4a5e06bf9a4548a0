"""The tray's preview window, in a process of its own.

OpenCV's window (Qt in the pip wheels) crashes when it is opened from a worker thread of a process
whose main thread runs GTK's main loop (measured: a segfault in Qt's libxkbcommon-x11 as soon as
the tray's preview was switched on). So the tray writes frames down a pipe to
`python -m tray.preview`, which shows them with avatar.camera.PreviewSink on its own main thread.

    PreviewProcess.send(frame)  (pacing thread: keeps only the newest frame, never blocks)
        └► writer thread ─► pipe, FRAME_BYTES per frame ─► child: PreviewSink.send ─► window

The child exits 0 when its window is closed (the tray unticks "Preview window") and 2 with a
one-line reason on stderr when it cannot open one (no display).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from avatar.constants import FRAME_SIZE

log = logging.getLogger("tray")

FRAME_SHAPE = (FRAME_SIZE, FRAME_SIZE, 3)
FRAME_BYTES = FRAME_SIZE * FRAME_SIZE * 3


class PreviewProcess:
    """A preview-window sink for LiveDaemon that can be switched on and off while it runs (`want`).

    on_closed(reason) is called once each time the window goes away by itself: reason None when the
    user closed it, else why it could not be shown.
    """

    name = "preview window"
    closed = False  # never: LiveDaemon drops a closed preview for good, this one comes and goes

    def __init__(self, want: bool, on_closed: Callable[[str | None], None] = lambda reason: None):
        self.want = want
        self.on_closed = on_closed
        self._lock = threading.Lock()
        self._frame: np.ndarray | None = None
        self._ready = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._writer: threading.Thread | None = None

    def send(self, frame: np.ndarray) -> None:
        """Called every tick on the pacing thread: keep the newest frame for the writer."""
        if not self.want:
            if self._proc is not None:
                self.close()
            return
        if self._proc is None:
            self._start()
        self._frame = frame  # one reference swap; the writer takes whatever is newest
        self._ready.set()

    def _start(self) -> None:
        # stderr to a file, not a pipe nobody reads while it runs (a full pipe would stall the window)
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-m", "tray.preview"], stdin=subprocess.PIPE,
                                      stderr=self._stderr, cwd=Path(__file__).resolve().parent.parent)
        self._writer = threading.Thread(target=self._write, args=(self._proc,), name="tray-preview", daemon=True)
        self._writer.start()

    def _write(self, proc: subprocess.Popen) -> None:
        try:
            while proc is self._proc:
                if not self._ready.wait(0.5):
                    continue
                self._ready.clear()
                frame = self._frame
                if frame is None:
                    continue
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):  # the window process ended (or we closed it)
            pass
        if proc is not self._proc:
            return  # closed on purpose
        self.want = False  # first: the pacing thread must not start another window meanwhile
        code = proc.wait()
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace").strip().splitlines()
        self._proc = None
        reason = None if code == 0 else (err[-1] if err else f"preview window process exited with status {code}")
        if reason:
            log.warning("preview window: %s", reason)
        self.on_closed(reason)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    """The child: frames from stdin to a window until stdin ends or the window is closed."""
    from avatar.camera import PreviewSink
    from avatar.errors import AvatarError

    try:
        sink = PreviewSink()
    except AvatarError as e:
        print(e, file=sys.stderr)
        return 2
    stream = sys.stdin.buffer
    with sink:
        while not sink.closed:
            data = stream.read(FRAME_BYTES)
            if len(data) < FRAME_BYTES:
                break  # the tray closed the pipe
            sink.send(np.frombuffer(data, dtype=np.uint8).reshape(FRAME_SHAPE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
