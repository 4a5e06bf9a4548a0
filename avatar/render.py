"""Offline render: a portrait and an audio file in, an mp4 with the audio muxed in out.

The same `Pipeline` as live, fed from a file as fast as it goes. Memory is constant in audio
length: audio is decoded block by block and every frame is encoded as soon as it exists.
The work overlaps on threads: audio decoding with the audio encoder and motion generator a few
ticks ahead (the ticker's `stream`), the face decoder on one thread per core (on the CPU whole
frames side by side, `render_threads`; a frame may wait for the one before it, live's cannot),
and encoding on a writer thread (x264 releases the GIL).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import avatar
from avatar.constants import FPS, SAMPLES_PER_FRAME, SAMPLE_RATE
from avatar.controls import Controls, controls_tensor
from avatar.disclosure import FrameMarker
from avatar.media import VideoWriter, open_audio
from avatar.pipeline import load_engines, make_ticker, resolve_audio_model
from avatar.rig import load_rig

log = logging.getLogger(__name__)

RENDER_THREADS_MAX = 4  # frames decoded side by side on the CPU (render_threads)
FRAME_QUEUE = 8  # frames in flight between the engines and the encoder: bounded, so memory is too


@dataclass
class RenderResult:
    output: Path
    frames: int
    audio_seconds: float
    wall_seconds: float

    @property
    def real_time_factor(self) -> float:
        """Wall time over audio time: below 1 is faster than real time."""
        return self.wall_seconds / max(self.audio_seconds, 1e-9)


def provenance(controls: Controls, audio_model: str) -> dict[str, str]:
    """Metadata written into every offline render: what made it, and that it is AI-generated."""
    return {
        "title": "VASA Avatar render",
        "comment": "AI-generated talking portrait (synthetic video)",
        "encoder": f"vasa-avatar {avatar.__version__}",
        "ai_generated": "true",
        "generator": f"vasa-avatar {avatar.__version__}; audio={audio_model}; mood={controls.mood}; seed={controls.seed}",
    }


def render_file(*, portrait: Path, audio: Path, output: Path, controls: Controls,
                audio_model: str = "auto", motion_model: str = "generator", face_index: int | None = None,
                badge: bool = True, progress: bool = True, runtime: str = "auto") -> RenderResult:
    """Render `audio` spoken by `portrait` into `output` (H.264 512x512 at FPS, AAC audio).
    Every frame carries the invisible watermark and, unless `badge` is False, the AI badge.
    `runtime`: the engines' back-end (engines.runtime; "auto" is a GPU's when there is one)."""
    from engines.runtime import create_backend

    started = time.perf_counter()
    audio_model = resolve_audio_model(audio_model)
    rig = load_rig(portrait, head_distance=controls.head_distance, face_index=face_index)
    # on the CPU whole frames are decoded side by side (see render_threads), so each decoder call
    # stays in its own thread: splitting a frame over two cores cost 3-12 ms more CPU a frame here
    engines = load_engines(audio_model=audio_model, motion_model=motion_model, decoder_workers=0)
    backend = create_backend(runtime, engines=engines)
    log.info("render: engines on %s", backend.describe())
    ticker = make_ticker(backend, engines, rig.inputs(), controls_tensor(controls), seed=controls.seed)

    with open_audio(audio) as source, VideoWriter(output, audio_path=audio,
                                                  metadata=provenance(controls, audio_model)) as writer:
        total = None if source.duration_s is None else int(source.duration_s * FPS + 0.999)
        bar = tqdm(total=total, unit="frame", desc="rendering", disable=not progress, leave=False)
        frames = _FrameWriter(writer, FrameMarker(badge=badge))
        try:
            for frame in ticker.stream(source.blocks(SAMPLES_PER_FRAME), render_threads=render_threads()):
                frames.put(frame)
                bar.update()
        finally:
            frames.close()
            bar.close()
        audio_seconds = source.samples_read / SAMPLE_RATE
        # the engines are done: their memory serves the writer's last pass (the classic mp4's index,
        # built at close), so the peak stays that of the render whatever its length
        del ticker, backend, engines, rig
    return RenderResult(output=Path(output), frames=frames.count, audio_seconds=audio_seconds,
                        wall_seconds=time.perf_counter() - started)


def render_threads() -> int:
    """Frames decoded at once by an offline render on the CPU: one per core, up to RENDER_THREADS_MAX
    (the audio engines, the encoder and the mp4 writer need a share too)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(RENDER_THREADS_MAX, cores))


class _FrameWriter:
    """Hands frames to the encoder on its own thread through a bounded queue; the disclosure
    marks are applied there too, off the engines' thread."""

    def __init__(self, writer: VideoWriter, marker: FrameMarker):
        self.writer = writer
        self.marker = marker
        self.queue: queue.Queue = queue.Queue(maxsize=FRAME_QUEUE)
        self.count = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (frame := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(self.marker(frame))
                except BaseException as exc:  # surfaced on the render thread by put()/close()
                    self.error = exc

    def put(self, frame) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(frame)
        self.count += 1

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
