"""The live daemon: the microphone drives the "VASA Avatar" virtual camera in real time.

    mic callback ─► ring ─► [motion thread] read_blocks ─► gate ─► encoder + generator (every block)
                                              └► delayed mic          │ newest motion
                                                         [render thread] decoder + marks
                                                                               │ latest-frame mailbox
    [pacing thread, the caller's] every 25 ms on a monotonic deadline ◄────────┘ ─► camera, preview

- Same `Pipeline` as offline on the CPU (on CUDA the runtime's FrameEngine, which keeps the state on
  the GPU; same engines, same noise). The motion thread is paced by audio arrival: each block goes
  through the encoder and generator (so blink timers, breathing and the encoder's history see every
  25 ms of time), and the render thread decodes the newest motion whenever it is free. When
  rendering is slower than 25 ms it therefore renders every 2nd or 3rd block; the motion steps
  (~3 ms) no longer wait behind it, nor it behind them. When the motion thread itself falls far
  behind, the microphone drops the oldest audio (at most MAX_CATCHUP_BLOCKS are processed per
  cycle): latency is bounded by one render plus one motion catch-up, never accumulated. On CUDA
  one render thread runs the frame engine's fused step (motion for every block, a frame for the
  newest), as the device already overlaps the stages.
- The pacing thread hands exactly one frame per 25 ms tick to the sinks, against deadlines
  t0 + k * 25 ms (it sleeps until each). A tick with no new frame re-sends the last one (counted as
  repeated); a rendered frame replaced before a tick took it is counted as stale; a tick missed by
  more than a period is skipped, not caught up (counted as missed). There is no queue to grow.
  The schedule's phase (t0) follows when frames become ready (`_phase_shift`): ticks fall 2 ms
  after the usual readiness, so a fast renderer's frames are neither missed nor kept waiting.
- Latency per fresh frame: from the capture time of the newest audio sample that shaped it (the
  block fed last; the face shows audio `lookahead_frames` earlier, see `av_offset_ms`) to the moment
  it is handed to the camera. p50/p95 over the last 10 s are logged every few seconds.
- Voice activity gates the encoder's input: while webrtcvad (smoothed, see avatar/mic.py) says idle,
  the encoder hears silence (faded over one 25 ms block), so room noise and hum do not move the lips
  and the generator's own silence behaviour (breathing, blinks, gaze) runs; while it says speaking,
  the audio passes unchanged (a word's first 30-50 ms, before the detector is sure, are faded in).
  webrtcvad calls keyboard clicks speech (~70 ms each), so typing does pass the gate. `gate=False`
  feeds everything and leaves speech detection to the generator alone.
- Faults never end the loop: a lost microphone is idle animation on silence with a reopen every
  2 s; a camera that fails is closed and reopened every 2 s while the preview (if any) carries on;
  an engine exception is logged once and the last frame keeps going out. SIGINT/SIGTERM stop the
  loop; the devices are released by their context managers and `run` returns normally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from avatar.camera import CameraBusyError, Sink
from avatar.constants import FPS, FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError
from avatar.mic import DelayedMic, Microphone
from avatar.pipeline import FrameTicker, Pipeline, PipelineTicker, make_ticker

log = logging.getLogger(__name__)

PERIOD_S = 1.0 / FPS
MAX_CATCHUP_BLOCKS = 6  # audio blocks the render thread runs motion for per cycle (150 ms); older is dropped
ON_TIME_MS = 5.0  # a frame is on time when handed to the camera within 5 ms after its deadline
STATUS_EVERY_S = 5.0
RETRY_EVERY_S = 2.0
LATENCY_WINDOW = 10 * FPS  # fresh-frame latencies kept for the status line (10 s)
PHASE_WINDOW = 32  # fresh frames whose readiness phase aligns the tick schedule (see _phase_shift)
PHASE_EVERY = 12  # ... looked at every this many fresh frames
PHASE_MARGIN_S = 0.002  # ticks fall this long after the latest usual frame readiness
PHASE_SLACK_S = 0.004  # ... and move earlier only to save more than this
DELAY_HYSTERESIS_MS = 10.0  # the delayed mic is re-aimed when the wanted delay moves more than this
GATE_IDLE_GAIN = 0.0  # what the encoder hears of non-speech (0: silence)
SWITCH_INTERVAL_S = 0.0005  # GIL hand-over while live, so the pacing thread wakes on time
RENDER_NICE = 5  # the render thread yields the CPU to the pacing thread (Linux: per-thread niceness)


@dataclass
class LiveStats:
    """Counters of one run. Latencies in ms over the recent window (`latency_*`) or all fresh frames
    (`records`, when recording)."""

    ticks: int = 0  # deadlines passed (sent + missed)
    frames_sent: int = 0  # frames handed to the camera (new + repeated)
    frames_new: int = 0  # ... of which were rendered since the previous tick
    frames_repeated: int = 0  # ticks that re-sent the previous frame (render not ready)
    ticks_missed: int = 0  # ticks skipped because the pacing thread woke more than a period late
    frames_on_time: int = 0  # frames handed within ON_TIME_MS of their deadline
    frames_rendered: int = 0
    frames_stale: int = 0  # rendered, then replaced by a newer one before any tick took it
    phase_shifts: int = 0  # times the tick schedule was re-aligned to frame readiness
    motion_steps: int = 0  # audio blocks through encoder + generator
    audio_dropped_ms: float = 0.0  # stale audio skipped by the microphone to keep latency bounded
    speaking: bool = False
    mic_connected: bool = True
    mic_losses: int = 0
    mic_reconnects: int = 0
    camera_errors: int = 0
    camera_reconnects: int = 0
    render_errors: int = 0
    latency_p50_ms: float = math.nan
    latency_p95_ms: float = math.nan
    av_offset_ms: float = 0.0  # extra lag of the shown audio: (lookahead + 0.5) frames
    engines: str = ""  # which back-end and device ran the engines
    records: dict | None = None

    def summary(self) -> str:
        sent = self.frames_sent
        on_time = 100.0 * self.frames_on_time / max(self.ticks, 1)
        parts = [f"{sent} frames sent ({self.frames_new} new, {self.frames_repeated} repeated, "
                 f"{self.ticks_missed} missed ticks), on time {on_time:.1f}%",
                 f"latency p50 {self.latency_p50_ms:.0f} ms p95 {self.latency_p95_ms:.0f} ms",
                 f"audio dropped {self.audio_dropped_ms:.0f} ms",
                 "speaking" if self.speaking else "idle"]
        if not self.mic_connected:
            parts.append("MIC LOST (idling, retrying)")
        if self.render_errors:
            parts.append(f"{self.render_errors} render errors")
        return "live: " + ", ".join(parts)


@dataclass
class _Frame:
    frame: np.ndarray
    captured_at: float  # capture time of the newest audio sample that shaped it
    live: bool  # from microphone audio (False: silence fed while the mic is lost)
    ready_at: float = 0.0  # when the render thread finished it


class _Mailbox:
    """The newest rendered frame, taken at most once. Replacing an untaken frame counts it as stale."""

    def __init__(self):
        self._lock = threading.Lock()
        self._item: _Frame | None = None
        self.stale = 0

    def put(self, item: _Frame) -> None:
        with self._lock:
            if self._item is not None:
                self.stale += 1
            self._item = item

    def take(self) -> _Frame | None:
        with self._lock:
            item, self._item = self._item, None
            return item


class _Latest:
    """The newest motion vector for the render thread: put() replaces, take() waits for a new one."""

    def __init__(self):
        self._ready = threading.Condition()
        self._item = None

    def put(self, item) -> None:
        with self._ready:
            self._item = item
            self._ready.notify()

    def take(self, timeout: float):
        with self._ready:
            if self._item is None:
                self._ready.wait(timeout)
            item, self._item = self._item, None
            return item


class _Records:
    """Per-tick records for benchmarks: preallocated, so a long run's memory is fixed up front."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.n = 0
        self.deadline = np.zeros(capacity)
        self.handed = np.zeros(capacity)
        self.latency_ms = np.full(capacity, np.nan)  # fresh frames from live audio only
        self.fresh = np.zeros(capacity, dtype=bool)  # a newly rendered frame (live audio or silence)

    def add(self, deadline: float, handed: float, latency_ms: float, fresh: bool) -> None:
        if self.n < self.capacity:
            i = self.n
            self.deadline[i], self.handed[i], self.latency_ms[i], self.fresh[i] = deadline, handed, latency_ms, fresh
            self.n += 1

    def as_dict(self) -> dict:
        n = self.n
        return {"deadline": self.deadline[:n], "handed": self.handed[:n], "latency_ms": self.latency_ms[:n],
                "fresh": self.fresh[:n]}


class _Once:
    """Logs a problem once per episode: again only after `clear(key)` (the problem went away)."""

    def __init__(self):
        self.active: set[str] = set()

    def warn(self, key: str, msg: str, *args, exc_info=False) -> None:
        if key not in self.active:
            self.active.add(key)
            log.warning(msg, *args, exc_info=exc_info)

    def clear(self, key: str) -> bool:
        if key in self.active:
            self.active.discard(key)
            return True
        return False


class LiveDaemon:
    """Runs `pipeline` from `mic` onto the sinks at FPS until stopped.

    pipeline: an avatar.pipeline.Pipeline, or a FrameTicker over an engines.runtime FrameEngine
    (what run_live uses on CUDA, where the frame engine replays captured CUDA graphs).
    camera: an open camera sink (or None); reopen_camera: how to open it again after a failure
    (None: never retry). preview: a preview sink. idle_frame: sent until the first frame is rendered
    (the portrait). record: keep per-tick records for a benchmark (ticks of capacity).
    marker: applied to every frame before it is shown (avatar/disclosure.py: watermark and AI badge).
    """

    def __init__(self, pipeline: Pipeline | FrameTicker, mic: Microphone, *, camera: Sink | None = None,
                 reopen_camera: Callable[[], Sink] | None = None, preview: Sink | None = None,
                 delayed_mic: DelayedMic | None = None, idle_frame: np.ndarray | None = None,
                 gate: bool = True, retry_every_s: float = RETRY_EVERY_S, status_every_s: float = STATUS_EVERY_S,
                 on_status: Callable[[LiveStats], None] | None = None, record: int = 0,
                 marker: Callable[[np.ndarray], np.ndarray] | None = None):
        if camera is None and reopen_camera is None and preview is None:
            raise AvatarError("nothing to show the avatar on: use the virtual camera or --preview")
        self.pipeline = PipelineTicker(pipeline) if isinstance(pipeline, Pipeline) else pipeline
        self.mic = mic
        self.camera = camera
        self.reopen_camera = reopen_camera
        self.preview = preview
        self.delayed_mic = delayed_mic
        self.gate = gate
        self.retry_every_s = retry_every_s
        self.status_every_s = status_every_s
        self.on_status = on_status or (lambda s: log.info("%s", s.summary()))
        self.stats = LiveStats()
        self.stats.av_offset_ms = (pipeline.lookahead_frames + 0.5) * FRAME_MS
        self.records = _Records(record) if record else None
        self.marker = marker or (lambda frame: frame)
        self._idle_frame = None if idle_frame is None else self.marker(np.ascontiguousarray(idle_frame).copy())
        self._mailbox = _Mailbox()
        self._torch_threads = _torch_threads()  # the creating thread's, for the worker threads
        self._motions = _Latest()  # CPU: the motion thread's newest motion, for the decode thread
        self._stop = threading.Event()
        self._once = _Once()
        self._gain = 1.0
        self._latencies = np.full(LATENCY_WINDOW, np.nan)
        self._n_latencies = 0
        self._next_camera_retry = 0.0
        self._delay_ms = math.nan

    def stop(self) -> None:
        """Ask the loop to end (thread-safe, signal-safe)."""
        self._stop.set()

    # ---- render thread --------------------------------------------------------------------------
    def _gated(self, block) -> np.ndarray:
        target = 1.0 if (block.speaking or not self.gate) else GATE_IDLE_GAIN
        samples = block.samples
        if target == self._gain == 1.0:
            return samples
        if target == self._gain:
            return samples * np.float32(target)
        ramp = np.linspace(self._gain, target, SAMPLES_PER_FRAME, dtype=np.float32)
        self._gain = target
        return samples * ramp

    def _rendered(self, frame: np.ndarray, block) -> None:
        """A fresh frame from `block`'s motion: marked here, on a render-side thread (the pacing
        thread stays light), and left in the mailbox for the next tick."""
        self.stats.frames_rendered += 1
        self._mailbox.put(_Frame(self.marker(frame), block.captured_at, block.live, time.monotonic()))
        if self._once.clear("render"):
            log.warning("rendering works again")

    def _worker_started(self) -> None:
        """First thing on every render-side thread: below the pacing thread, torch's thread count."""
        _lower_priority(RENDER_NICE)
        _same_torch_threads(self._torch_threads)

    def _render_failed(self) -> None:
        """A bug, not a device problem: said once, the last frame stays on the camera."""
        self.stats.render_errors += 1
        self._once.warn("render", "rendering failed; the last frame stays on the camera", exc_info=True)
        self._stop.wait(0.1)

    def _render_loop(self) -> None:
        pipeline, stats = self.pipeline, self.stats
        self._worker_started()
        while not self._stop.is_set():
            try:
                blocks = self.mic.read_blocks(max_blocks=MAX_CATCHUP_BLOCKS, timeout=0.1)
                if not blocks:
                    continue
                for i, block in enumerate(blocks):  # motion for every block, a frame for the newest
                    frame = pipeline.tick(self._gated(block), render=i == len(blocks) - 1)
                stats.motion_steps += len(blocks)
                stats.speaking = blocks[-1].speaking
                if frame is None:  # the look-ahead is still filling
                    continue
                self._rendered(frame, blocks[-1])
            except Exception:
                self._render_failed()

    def _motion_loop(self) -> None:
        """The CPU pipeline's first half: the encoder and generator for every block as it arrives;
        the newest motion (with its block's times) goes to the decode loop. Apart, the decoder's
        ~20 ms are no longer queued behind the motion steps of a catch-up."""
        ticker, stats = self.pipeline, self.stats
        pipeline = ticker.pipeline
        self._worker_started()
        while not self._stop.is_set():
            try:
                blocks = self.mic.read_blocks(max_blocks=MAX_CATCHUP_BLOCKS, timeout=0.1)
                if not blocks:
                    continue
                for block in blocks:
                    motion = pipeline.motion_step(self._gated(block))
                stats.motion_steps += len(blocks)
                stats.speaking = blocks[-1].speaking
                if pipeline.ticks > ticker.lookahead_frames:  # else the look-ahead is still filling
                    self._motions.put((motion, blocks[-1]))
            except Exception:
                self._render_failed()

    def _decode_loop(self) -> None:
        """The CPU pipeline's second half: the newest motion through the face decoder and marker."""
        pipeline = self.pipeline.pipeline
        self._worker_started()
        while not self._stop.is_set():
            item = self._motions.take(timeout=0.1)
            if item is None:
                continue
            motion, block = item
            try:
                self._rendered(pipeline.render(motion), block)
            except Exception:
                self._render_failed()

    # ---- pacing thread --------------------------------------------------------------------------
    def _send(self, frame: np.ndarray, now: float) -> None:
        if self.camera is not None:
            try:
                self.camera.send(frame)
                if self._once.clear("camera"):
                    log.warning("virtual camera is back")
            except Exception as e:
                self.stats.camera_errors += 1
                self._once.warn("camera", "virtual camera failed (%s); retrying every %g s",
                                " ".join(str(e).split()) or type(e).__name__, self.retry_every_s)
                self._close_camera()
                self._next_camera_retry = now + self.retry_every_s
        if self.preview is not None:
            try:
                self.preview.send(frame)
            except Exception as e:
                self._once.warn("preview", "preview window failed (%s); closing it", e)
                self.preview.closed = True
            if getattr(self.preview, "closed", False):
                self.preview.close()
                self.preview = None
                if self.camera is None and self.reopen_camera is None:
                    log.warning("preview window closed; stopping")
                    self._stop.set()

    def _close_camera(self) -> None:
        camera, self.camera = self.camera, None
        if camera is not None:
            try:
                camera.close()
            except Exception:
                pass

    def _retry_camera(self, now: float) -> None:
        if self.camera is not None or self.reopen_camera is None or now < self._next_camera_retry:
            return
        self._next_camera_retry = now + self.retry_every_s
        try:
            self.camera = self.reopen_camera()
        except Exception as e:  # busy or gone: already said once
            self._once.warn("camera", "virtual camera unavailable (%s); retrying every %g s",
                            " ".join(str(e).split()), self.retry_every_s)
            return
        self.stats.camera_reconnects += 1
        self._once.clear("camera")
        log.warning("virtual camera %s is back", getattr(self.camera, "device", ""))

    def _latency_percentiles(self) -> tuple[float, float]:
        n = min(self._n_latencies, LATENCY_WINDOW)
        if n == 0:
            return math.nan, math.nan
        p50, p95 = np.percentile(self._latencies[:n] if n < LATENCY_WINDOW else self._latencies, [50, 95])
        return float(p50), float(p95)

    def _status(self) -> None:
        s = self.stats
        s.latency_p50_ms, s.latency_p95_ms = self._latency_percentiles()
        s.frames_stale = self._mailbox.stale
        ms = self.mic.stats
        s.audio_dropped_ms = 1000.0 * ms.dropped_samples / SAMPLE_RATE
        s.mic_connected, s.mic_losses, s.mic_reconnects = self.mic.connected, ms.losses, ms.reconnects
        if self.delayed_mic is not None and not math.isnan(s.latency_p50_ms):
            want = s.latency_p50_ms + s.av_offset_ms
            if math.isnan(self._delay_ms) or abs(want - self._delay_ms) > DELAY_HYSTERESIS_MS:
                self._delay_ms = want
                self.delayed_mic.set_delay(want / 1000.0)
                log.info("delayed mic: voice delayed by %.0f ms to match the video", want)

    def run(self, *, seconds: float | None = None, handle_signals: bool = True) -> LiveStats:
        """Pace frames until stop(), SIGINT/SIGTERM (when called on the main thread), or `seconds`."""
        restore = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore[sig] = signal.signal(sig, lambda *_: self._stop.set())
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if isinstance(self.pipeline, PipelineTicker):  # the CPU: motion and decoding on threads of their own
            loops = [(self._motion_loop, "live-motion"), (self._decode_loop, "live-render")]
        else:  # a FrameEngine runs both on the device, one tick at a time
            loops = [(self._render_loop, "live-render")]
        workers = [threading.Thread(target=loop, name=name, daemon=True) for loop, name in loops]
        for worker in workers:
            worker.start()
        try:
            self._pace(seconds)
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(timeout=5.0)
            sys.setswitchinterval(old_switch)
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            self._close_camera()
            if self.preview is not None:
                self.preview.close()
            self._status()
            if self.records is not None:
                self.stats.records = self.records.as_dict()
        return self.stats

    def _pace(self, seconds: float | None) -> None:
        stats, records = self.stats, self.records
        last = self._idle_frame
        start = time.monotonic()
        end = math.inf if seconds is None else start + seconds
        next_status = start + self.status_every_s
        phases = np.zeros(PHASE_WINDOW)
        n_phases = 0
        k = 0
        while not self._stop.is_set():
            deadline = start + k * PERIOD_S
            if deadline >= end:
                break
            now = time.monotonic()
            while now < deadline:  # (a loop: a sleep may end early)
                time.sleep(deadline - now)
                now = time.monotonic()
            if now - deadline >= PERIOD_S:  # woke a whole period late: skip, do not catch up
                missed = int((now - deadline) / PERIOD_S)
                stats.ticks_missed += missed
                stats.ticks += missed
                k += missed
                deadline = start + k * PERIOD_S
            k += 1
            stats.ticks += 1
            item = self._mailbox.take()
            latency = math.nan
            if item is not None:
                last = item.frame
                stats.frames_new += 1
                phases[n_phases % PHASE_WINDOW] = (item.ready_at - start) % PERIOD_S
                n_phases += 1
                if n_phases % PHASE_EVERY == 0:  # the first look after PHASE_EVERY frames: converge fast
                    shift = _phase_shift(phases[:min(n_phases, PHASE_WINDOW)])
                    if shift:
                        start += shift
                        stats.phase_shifts += 1
                        n_phases = 0
            elif last is not None:
                stats.frames_repeated += 1
            if last is None:
                continue  # nothing to show yet and no portrait given
            handed = time.monotonic()
            if item is not None and item.live:
                latency = 1000.0 * (handed - item.captured_at)
                self._latencies[self._n_latencies % LATENCY_WINDOW] = latency
                self._n_latencies += 1
            self._send(last, handed)
            stats.frames_sent += 1
            if handed - deadline <= ON_TIME_MS / 1000.0:
                stats.frames_on_time += 1
            if records is not None:
                records.add(deadline, handed, latency, item is not None)
            if handed >= next_status:
                next_status = handed + self.status_every_s
                self._status()
                self.on_status(stats)
            self._retry_camera(handed)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _same_torch_threads(n: int) -> None:
    """torch's thread count is per thread (OpenMP's setting): a new thread would run every op on as
    many threads as there are cores, spinning (measured here: 2x the CPU for the same work)."""
    import torch

    torch.set_num_threads(n)


def _lower_priority(nice: int) -> None:
    """Make the calling thread `nice` steps nicer (Linux niceness is per thread; raising it needs no
    privilege), so a CPU-bound render never delays the pacing thread's wake-up."""
    if nice <= 0 or not hasattr(os, "setpriority") or platform.system() != "Linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


def _phase_shift(phases: np.ndarray) -> float:
    """How far to move the tick schedule (s, within +-half a period) so ticks come PHASE_MARGIN_S
    after the frames' usual readiness, or 0 to leave it.

    `phases` are when recent frames became ready, modulo the period, relative to the ticks. Audio
    arrives in device-sized chunks (often 10 ms), so with fast rendering frames are ready in a
    cluster of phases some ms wide; a tick inside that cluster takes every other frame one tick
    late (half the frames repeat, half go stale). Putting the ticks just after the cluster fixes
    that and makes the wait for the tick, and so the latency, as short as it can be. The schedule
    moves later as soon as frames come too close to a tick, but earlier only when that saves more
    than PHASE_SLACK_S, so render-time jitter does not keep nudging it. When frames are ready at
    all phases (rendering slower than a tick) there is nothing to align: no shift.
    """
    p = np.sort(phases)
    gaps = np.diff(np.append(p, p[0] + PERIOD_S))
    i = int(np.argmax(gaps))
    if gaps[i] < 0.4 * PERIOD_S:
        return 0.0
    want = (p[i] + PHASE_MARGIN_S) % PERIOD_S  # a tick right after the cluster's last frame
    shift = want if want <= PERIOD_S / 2 else want - PERIOD_S
    return shift if shift > 0.0005 or shift < -PHASE_SLACK_S else 0.0


# ---- the entry points the CLI calls --------------------------------------------------------------

def run_live(*, portrait: str | os.PathLike, controls, mic: str | int | None = None, camera: bool = True,
             camera_backend: str | None = None, camera_device: str | None = None, preview: bool = False,
             delayed_mic: str | int | None = None, audio_model: str = "auto", motion_model: str = "generator",
             face_index: int | None = None, runtime: str = "auto", audio_backend=None, torch_threads: int = 1,
             gate: bool = True, badge: bool = True,
             seconds: float | None = None, record: bool = False,
             on_status: Callable[[LiveStats], None] | None = None) -> LiveStats:
    """`vasa-avatar run`: the portrait speaks with the microphone on the virtual camera until
    SIGINT/SIGTERM (or `seconds`). Device problems found at start are AvatarErrors; once running,
    device loss is retried. `runtime` is the engine back-end (engines/runtime.py: "auto" picks
    TensorRT or torch on CUDA when there is a GPU, torch on the CPU otherwise)."""
    import torch

    from engines.runtime import create_backend

    from avatar.camera import PreviewSink, open_camera
    from avatar.controls import controls_tensor
    from avatar.disclosure import FrameMarker
    from avatar.mic import find_device
    from avatar.pipeline import load_engines
    from avatar.rig import load_rig

    if not camera and not preview:
        raise AvatarError("nothing to show the avatar on: drop --no-camera or add --preview")
    torch.set_num_threads(max(1, torch_threads))
    # check every device the user named before the slow part (portrait analysis, engines)
    find_device(mic, backend=audio_backend)
    if delayed_mic is not None:
        find_device(delayed_mic, output=True, backend=audio_backend)

    def reopen():
        return open_camera(backend=camera_backend, device=camera_device)

    with ExitStack() as stack:
        cam = None
        if camera:
            try:
                cam = stack.enter_context(reopen())
            except CameraBusyError as e:  # it exists: say so and keep retrying while running
                log.warning("%s; retrying every %g s", e, RETRY_EVERY_S)
        view = stack.enter_context(PreviewSink()) if preview else None

        rig = load_rig(portrait, head_distance=controls.head_distance, face_index=face_index)
        engines = load_engines(audio_model=audio_model, motion_model=motion_model)
        backend = create_backend(runtime, engines=engines)
        log.info("live: engines on %s", backend.describe())
        pipeline = make_ticker(backend, engines, rig.inputs(), controls_tensor(controls), seed=controls.seed)
        warm_up(pipeline)

        delayed = stack.enter_context(DelayedMic(delayed_mic, backend=audio_backend)) if delayed_mic is not None else None
        microphone = stack.enter_context(Microphone(mic, backend=audio_backend,
                                                    tap=delayed.push if delayed is not None else None))
        log.info("live: microphone %s -> %s", microphone.device.describe(),
                 ", ".join(s.name for s in (cam, view) if s is not None) or "camera (retrying)")
        daemon = LiveDaemon(pipeline, microphone, camera=cam, reopen_camera=reopen if camera else None,
                            preview=view, delayed_mic=delayed, idle_frame=rig.image.numpy(), gate=gate,
                            marker=FrameMarker(badge=badge),
                            on_status=on_status, record=int((seconds or 0) * FPS * 1.1) + FPS if record else 0)
        daemon.stats.engines = backend.describe()
        return daemon.run(seconds=seconds)


def warm_up(pipeline: PipelineTicker | FrameTicker, *, ticks: int = 3) -> None:
    """A few ticks of silence so first-call costs (allocations, lazy init, graph capture) happen
    before going live, then back to a fresh state."""
    silence = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
    for _ in range(ticks + pipeline.lookahead_frames):
        pipeline.tick(silence, render=True)
    pipeline.reset()


def describe_devices(*, audio_backend=None) -> str:
    """`vasa-avatar run --list-devices`: microphones, delayed-mic outputs, virtual cameras."""
    from avatar.camera import CAMERA_NAME, camera_setup_command, list_camera_backends, v4l2_devices
    from avatar.mic import list_input_devices, list_output_devices

    lines = []
    try:
        inputs, outputs = list_input_devices(backend=audio_backend), list_output_devices(backend=audio_backend)
        lines.append("microphones (--mic NAME or INDEX):")
        lines += [f"  {d.describe()}" for d in inputs] or ["  none found"]
        lines.append("audio outputs (--delayed-mic NAME or INDEX):")
        lines += [f"  {d.describe(output=True)}" for d in outputs] or ["  none found"]
    except AvatarError as e:
        lines.append(f"audio devices: {e}")
    lines.append(f"virtual cameras (backends: {', '.join(list_camera_backends()) or 'none'}):")
    if platform.system() == "Linux":
        devices = v4l2_devices()
        lines += [f"  {dev} {name!r}" + ("  <- used" if name == CAMERA_NAME else "") for dev, name in devices]
        if not any(name == CAMERA_NAME for _, name in devices):
            lines.append(f'  no device named "{CAMERA_NAME}": {camera_setup_command()}')
    else:
        lines.append(f'  "{CAMERA_NAME}" is opened through pyvirtualcam; if missing: {camera_setup_command()}')
    return "\n".join(lines)


# ---- `vasa-avatar bench live` --------------------------------------------------------------------

BENCH_CAMERA_BACKEND = "vasa-bench-recording"
GOALS = {"fps_new_min": 40.0, "on_time_share_min": 0.99, "latency_p95_ms_max": 100.0, "drift_ms_max": 5.0}


def bench_live(*, audio: Path, seconds: float, portrait: Path | None, out: Path,
               audio_model: str = "auto", motion_model: str = "generator", runtime: str = "auto",
               device_rate: int = 48_000, torch_threads: int = 1) -> dict:
    """Play `audio` through a fake microphone (a thread calling the real callback at real-time pace,
    at `device_rate` Hz stereo so the resampler works as with a real device, looping the file) into
    a recording camera backend, through the real pipeline and pacing code, for `seconds`. Writes
    the metrics to `out` (JSON) and returns them.

    Definitions: a tick's frame is *on time* when it is handed to the camera no later than
    ON_TIME_MS (5 ms) after its deadline (the pacing thread never sends early); missed ticks count
    as late. *fps_delivered* counts every frame sent (repeats included: what the camera sees),
    *fps_new* only freshly rendered ones. *Latency* runs from the capture time of the newest audio
    sample that shaped a frame to its hand-over, over fresh frames. *Drift* is the mean latency
    of the last window minus the first (60 s windows for runs of 3 minutes or more, else 10% of the
    run each, the first second skipped as warm-up); means, not medians, because latency takes
    values a tick (25 ms) apart as rendering beats against the frame clock, and a median flips
    between them.
    """
    import pyvirtualcam
    from scipy.signal import resample_poly

    from avatar.camera import RecordingBackend
    from avatar.controls import Controls
    from avatar.media import open_audio
    from avatar.mic import FileAudioBackend

    if seconds <= 0:
        raise AvatarError(f"--seconds must be positive, got {seconds}")
    portrait = Path(portrait) if portrait is not None else Path(__file__).parent / "assets" / "astronaut.png"
    with open_audio(audio) as source:
        chunks, total = [], 0
        for block in source.blocks(SAMPLES_PER_FRAME):  # at most `seconds` of it: it loops anyway
            chunks.append(block)
            total += block.size
            if total >= seconds * SAMPLE_RATE:
                break
    voice = np.concatenate(chunks)
    if device_rate != SAMPLE_RATE:
        from math import gcd

        g = gcd(device_rate, SAMPLE_RATE)
        voice = resample_poly(voice, device_rate // g, SAMPLE_RATE // g).astype(np.float32)
    backend = FileAudioBackend(voice, samplerate=device_rate, channels=2, loop=True)
    pyvirtualcam.register_backend(BENCH_CAMERA_BACKEND, RecordingBackend)
    RecordingBackend.instances.clear()

    stats = run_live(portrait=portrait, controls=Controls(), camera_backend=BENCH_CAMERA_BACKEND,
                     audio_backend=backend, audio_model=audio_model, motion_model=motion_model,
                     runtime=runtime, torch_threads=torch_threads, seconds=seconds, record=True)
    result = live_metrics(stats, seconds=seconds)
    result.update({
        "engines": stats.engines, "audio": str(audio), "portrait": str(portrait), "seconds_requested": seconds,
        "audio_model": audio_model, "motion_model": motion_model, "runtime": runtime, "device_rate_hz": device_rate,
        "torch_threads": torch_threads, "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "camera_frames_received": sum(b.frames for b in RecordingBackend.instances),
        "camera_closed": all(b.closed for b in RecordingBackend.instances),
        "goals": GOALS,
    })
    result["goals_met"] = {
        "fps_new": result["fps_new"] >= GOALS["fps_new_min"],
        "on_time_share": result["on_time_share"] >= GOALS["on_time_share_min"],
        "latency_p95_ms": result["latency_ms"]["p95"] <= GOALS["latency_p95_ms_max"],
        "drift_ms": abs(result["drift_ms"]) <= GOALS["drift_ms_max"],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def live_metrics(stats: LiveStats, *, seconds: float) -> dict:
    """The benchmark's numbers from a recorded run (see bench_live for the definitions)."""
    rec = stats.records or {"deadline": np.zeros(0), "handed": np.zeros(0), "latency_ms": np.zeros(0)}
    deadline, handed, lat = rec["deadline"], rec["handed"], rec["latency_ms"]
    duration = max(stats.ticks * PERIOD_S, 1e-9)
    fresh = ~np.isnan(lat)
    t = deadline - deadline[0] if deadline.size else deadline
    if seconds >= 180:
        first, last = (t >= 1.0) & (t < 61.0), t >= t[-1] - 60.0
    else:
        w = max(0.1 * seconds, 0.5)
        first, last = (t >= 1.0) & (t < 1.0 + w), t >= (t[-1] - w if t.size else 0)

    def mean(mask):
        v = lat[mask & fresh]
        return float(np.mean(v)) if v.size else math.nan

    def pct(q):
        return round(float(np.percentile(lat[fresh], q)), 1) if fresh.any() else math.nan

    late_ms = 1000.0 * (handed - deadline)
    return {
        "duration_s": round(duration, 3),
        "ticks": stats.ticks,
        "frames_sent": stats.frames_sent,
        "frames_new": stats.frames_new,
        "fps_delivered": round(stats.frames_sent / duration, 2),
        "fps_new": round(stats.frames_new / duration, 2),
        "on_time_ms": ON_TIME_MS,
        "on_time_share": round(stats.frames_on_time / max(stats.ticks, 1), 4),
        "handover_late_ms": {"p50": round(float(np.percentile(late_ms, 50)), 2) if late_ms.size else math.nan,
                             "p99": round(float(np.percentile(late_ms, 99)), 2) if late_ms.size else math.nan,
                             "max": round(float(late_ms.max()), 2) if late_ms.size else math.nan},
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "frames": int(fresh.sum())},
        "av_offset_ms": stats.av_offset_ms,
        "drift_ms": round(mean(last) - mean(first), 2),
        "dropped": {"frames_repeated": stats.frames_repeated, "ticks_missed": stats.ticks_missed,
                    "frames_stale": stats.frames_stale, "audio_ms": round(stats.audio_dropped_ms, 1)},
        "frames_rendered": stats.frames_rendered,
        "motion_steps": stats.motion_steps,
        "render_errors": stats.render_errors,
        "mic_losses": stats.mic_losses,
    }
