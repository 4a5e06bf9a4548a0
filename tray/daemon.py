"""The live daemon as the tray drives it: avatar.live.LiveDaemon run on background threads with
switches for controls, portrait, pause and preview that take effect between frames.

- Controls (mood, gaze, expressiveness) replace the generator's control tensor (Pipeline.set_controls,
  read once per tick): the next 25 ms tick uses them and the generator glides there.
- A portrait (or framing) switch loads the rig on its own thread (rig cache hit: tens of ms; a new
  photo: seconds of analysis) while the old portrait keeps talking, then swaps it in with
  Pipeline.set_rig between two frames. The camera is never reopened; no tick goes without a frame.
- Pause keeps the camera fed with a still of the portrait wearing the "AI · PAUSED" badge; the
  decoder is skipped meanwhile and the motion generator keeps running, so resuming is seamless.
- The preview window runs in a process of its own (tray/preview.py): OpenCV's window crashes in a
  worker thread of a process whose main thread runs GTK.
- Start-up problems do not end it: a missing microphone is looked for again every MIC_RETRY_S; a
  missing or busy camera is retried by LiveDaemon every 2 s while the preview window works.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from avatar.errors import AvatarError
from tray import log_path
from tray.menu import DaemonStatus
from tray.preview import PreviewProcess

log = logging.getLogger("tray")

STATUS_EVERY_S = 1.0  # how often LiveDaemon reports its stats (the tooltip's refresh)
MIC_RETRY_S = 3.0  # a missing microphone is looked for again this often


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


class LiveHandle:
    """The live daemon (avatar.live.LiveDaemon) run on background threads with the switches the
    tray needs: controls, portrait, pause and preview change while it runs; the camera stays open.

    Start-up problems do not end it: a missing microphone is looked for again every MIC_RETRY_S, a
    missing or busy camera is retried by the daemon every 2 s (the preview works meanwhile).
    """

    def __init__(self, *, portrait: Path, controls, mic: str | None = None, paused: bool = False,
                 preview: bool = False, on_preview_closed: Callable[[str | None], None] = lambda reason: None,
                 runtime: str = "auto", audio_model: str = "trained", motion_model: str = "generator",
                 camera_backend: str | None = None, audio_backend=None, torch_threads: int = 1):
        self.portrait = Path(portrait)
        self.controls = controls
        self.mic = mic
        self.runtime = runtime
        self.audio_model, self.motion_model = audio_model, motion_model
        self.camera_backend = camera_backend
        self.audio_backend = audio_backend
        self.torch_threads = torch_threads
        self._paused = paused
        self._preview = PreviewProcess(preview, on_preview_closed)
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
        engines = load_engines(audio_model=self.audio_model, motion_model=self.motion_model)
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
