"""The live daemon as the tray drives it: avatar.live.LiveDaemon run on background threads with
switches for controls, portrait, pause and preview that take effect between frames.

- Controls (mood, gaze, expressiveness) replace the generator's control tensor at the start of the
  next 25 ms tick; the generator glides to the new mood.
- A portrait (or framing) switch loads the rig on its own thread (rig cache hit: tens of ms; a new
  photo: seconds of analysis) while the old portrait keeps talking, then swaps it in at the start of
  a tick (Pipeline.set_rig on the CPU, FrameEngine.set_rig on the GPU). The camera is never
  reopened and the pacing thread never goes without a frame.
- Pause keeps the camera fed with a still of the portrait wearing the "AI · PAUSED" badge; the
  decoder is skipped meanwhile and the motion generator keeps running, so resuming is seamless.
- Every frame is marked (avatar.disclosure.FrameMarker: watermark, and the AI badge unless off).
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
LOG_EVERY_S = 30.0  # the daemon's stats go to the tray's log this often


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


class _TrayTicker:
    """The daemon's ticker (avatar.live.PipelineTicker on the CPU, FrameTicker on the GPU) with the
    tray's switches. Other threads only leave a new rig or control tensor here; the render thread
    applies it at the start of its next tick, so a change always lands between two frames (the GPU
    frame engines copy a rig into their bound buffers, which must not race a frame).

    Every frame it hands out is marked (watermark, and the "AI" badge unless turned off). While
    paused, the encoder and generator still run on the audio (so resuming is seamless) but the
    decoder does not: the frame is the portrait at rest wearing the "AI · PAUSED" badge.
    """

    def __init__(self, inner, image: np.ndarray, *, paused: bool = False, badge: bool = True):
        from avatar.disclosure import FrameMarker

        self.inner = inner
        self.lookahead_frames = inner.lookahead_frames
        self.paused = paused
        self._marker = FrameMarker(badge=badge)
        self._paused_marker = FrameMarker(badge=True, paused=True)  # a paused still always says so
        self._lock = threading.Lock()
        self._pending_rig: tuple | None = None
        self._pending_controls = None
        self._set_still(image)

    # -- from other threads
    def set_rig(self, rig_inputs, image: np.ndarray) -> None:
        with self._lock:
            self._pending_rig = (tuple(rig_inputs), image)

    def set_controls(self, controls) -> None:
        """controls: (1, N_CONTROLS) float32, avatar.controls.controls_tensor's layout."""
        with self._lock:
            self._pending_controls = controls

    @property
    def controls(self):
        """The control tensor in use (or about to be, at the next tick)."""
        with self._lock:
            if self._pending_controls is not None:
                return self._pending_controls
        return _ticker_controls(self.inner)

    # -- the render thread (LiveDaemon's ticker interface)
    def apply_pending(self) -> None:
        with self._lock:
            rig, self._pending_rig = self._pending_rig, None
            controls, self._pending_controls = self._pending_controls, None
        if rig is not None:
            _set_ticker_rig(self.inner, rig[0])
            self._set_still(rig[1])
        if controls is not None:
            _set_ticker_controls(self.inner, controls)

    def tick(self, samples: np.ndarray, *, render: bool) -> np.ndarray | None:
        self.apply_pending()
        if self.paused:
            self.inner.tick(samples, render=False)
            return self._still.copy() if render else None  # a copy: sinks may draw on what they get
        frame = self.inner.tick(samples, render=render)
        return None if frame is None else self._marker(frame)

    def reset(self) -> None:
        self.inner.reset()

    def _set_still(self, image: np.ndarray) -> None:
        self.image = image  # (512, 512, 3) uint8 RGB: the portrait at rest (the rig's image)
        self._still = self._paused_marker(np.array(image, dtype=np.uint8, copy=True))


def _set_ticker_rig(ticker, rig_inputs) -> None:
    from avatar.live import PipelineTicker

    if isinstance(ticker, PipelineTicker):
        ticker.pipeline.set_rig(rig_inputs)
    else:  # FrameTicker over an engines.runtime FrameEngine
        ticker.frames.set_rig(rig_inputs)


def _set_ticker_controls(ticker, controls) -> None:
    from avatar.live import PipelineTicker

    if isinstance(ticker, PipelineTicker):
        ticker.pipeline.set_controls(controls)
    else:
        ticker.controls = controls


def _ticker_controls(ticker):
    from avatar.live import PipelineTicker

    return ticker.pipeline.controls if isinstance(ticker, PipelineTicker) else ticker.controls


def paused_frame(image: np.ndarray) -> np.ndarray:
    """The portrait at rest with the "AI · PAUSED" badge (no watermark): how the paused still looks."""
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
                 preview: bool = False, badge: bool = True, on_preview_closed: Callable[[str | None], None] = lambda reason: None,
                 runtime: str = "auto", audio_model: str = "auto", motion_model: str = "generator",
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
        self.badge = badge
        self._preview = PreviewProcess(preview, on_preview_closed)
        self._ticker: _TrayTicker | None = None
        self._daemon = None
        self._state = DaemonStatus("starting")
        self._camera_problem = ""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._switch_wanted = threading.Condition(self._lock)
        self._switch_request: tuple | None = None
        self._fps_mark: tuple[float, int] | None = None
        self._next_log = 0.0
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
        if self._ticker is not None:
            self._ticker.set_controls(controls_tensor(controls))

    def switch_portrait(self, path: Path, *, head_distance: float, on_done: Callable[[str | None], None]) -> None:
        with self._lock:  # a request not started yet is replaced: the newest choice wins
            self._switch_request = (Path(path), head_distance, on_done)
            self._switch_wanted.notify_all()

    def set_paused(self, paused: bool) -> None:
        self._paused = paused
        if self._ticker is not None:
            self._ticker.paused = paused

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
                while self._switch_request is None or self._ticker is None:
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
            self._ticker.set_rig(rig.inputs(), rig.image.numpy())  # applied at the next tick
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
                self._ticker.apply_pending()  # nothing ticks while the microphone is missing
                daemon = LiveDaemon(self._ticker, mic, camera=self._open_camera(), reopen_camera=self._reopen_camera,
                                    preview=self._preview, idle_frame=self._ticker.image,
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
        from avatar.pipeline import load_engines, make_ticker
        from avatar.rig import load_rig

        torch.set_num_threads(max(1, self.torch_threads))
        rig = load_rig(self.portrait, head_distance=self.controls.head_distance)
        engines = load_engines(audio_model=self.audio_model, motion_model=self.motion_model)
        backend = create_backend(self.runtime, engines=engines)
        log.info("live: engines on %s", backend.describe())
        controls = controls_tensor(self.controls)
        inner = make_ticker(backend, engines, rig.inputs(), controls, seed=self.controls.seed)  # as run_live
        warm_up(inner)
        ticker = _TrayTicker(inner, rig.image.numpy(), paused=self._paused, badge=self.badge)
        ticker.set_controls(controls_tensor(self.controls))  # the latest, in case they changed meanwhile
        self._ticker = ticker

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
        if now >= self._next_log:  # the daemon's summary line in the tray's log now and then
            self._next_log = now + LOG_EVERY_S
            log.info("%s", stats.summary())
