"""The one frame path shared by live and offline: 400 audio samples in, one 512x512 frame out.

    samples (400,) -> AudioEncoder -> features -> MotionGenerator -> motion -> FaceDecoder -> frame

Each tick consumes exactly SAMPLES_PER_FRAME new samples. The engines are stateful through
explicit tensors, threaded here, so memory is constant in audio length. The audio encoder looks
ahead by `lookahead_frames`, so the frame produced at tick t shows audio frame t - lookahead:
offline callers flush with `flush()` to get the last frames; live callers simply run on.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from avatar.constants import SAMPLES_PER_FRAME


@dataclass
class Engines:
    """The three engines for one pipeline (torch modules, or back-ends with the same call contract)."""

    encoder: nn.Module
    generator: nn.Module
    decoder: nn.Module


class Pipeline:
    """Runs the three engines one tick at a time. Not thread-safe: one caller drives it."""

    def __init__(self, engines: Engines, rig_inputs: tuple[torch.Tensor, ...], controls: torch.Tensor,
                 *, seed: int = 0):
        self.engines = engines
        self.rig_inputs = tuple(rig_inputs)
        self.controls = controls
        self.seed = seed
        self.lookahead_frames = int(getattr(engines.encoder, "lookahead_frames", 0))
        self.n_noise = int(engines.generator.N_NOISE)
        self.reset()

    def reset(self) -> None:
        """Back to the first frame: fresh engine state, noise stream restarted from the seed."""
        self.noise = torch.Generator().manual_seed(self.seed)
        self.encoder_state = tuple(self.engines.encoder.initial_state(1))
        self.generator_state = tuple(self.engines.generator.initial_state(1))
        self.ticks = 0
        self.last_motion: torch.Tensor | None = None

    def set_rig(self, rig_inputs: tuple[torch.Tensor, ...]) -> None:
        """Switch portraits between frames; motion state carries on."""
        self.rig_inputs = tuple(rig_inputs)

    def set_controls(self, controls: torch.Tensor) -> None:
        """Switch mood/gaze/framing controls between frames; the generator glides to them."""
        self.controls = controls

    @torch.inference_mode()
    def motion_step(self, samples: np.ndarray) -> torch.Tensor:
        """samples (SAMPLES_PER_FRAME,) float32 -> motion (1, N_CHANNELS). Encoder + generator only."""
        if samples.shape != (SAMPLES_PER_FRAME,):
            raise ValueError(f"expected {SAMPLES_PER_FRAME} samples per tick, got shape {samples.shape}")
        x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).unsqueeze(0)
        features, *self.encoder_state = self.engines.encoder(x, *self.encoder_state)
        noise = torch.rand(1, self.n_noise, generator=self.noise)
        motion, *self.generator_state = self.engines.generator(features, self.controls, noise,
                                                               *self.generator_state)
        self.ticks += 1
        self.last_motion = motion
        return motion

    @torch.inference_mode()
    def render(self, motion: torch.Tensor) -> np.ndarray:
        """motion (1, N_CHANNELS) -> frame (512, 512, 3) uint8 RGB."""
        return self.engines.decoder(motion, *self.rig_inputs)[0].numpy()

    def step(self, samples: np.ndarray) -> np.ndarray | None:
        """One tick. Returns the frame for audio frame ticks - lookahead, or None while the
        look-ahead is still filling (the first `lookahead_frames` ticks)."""
        motion = self.motion_step(samples)
        if self.ticks <= self.lookahead_frames:
            return None
        return self.render(motion)

    def flush(self) -> Iterator[np.ndarray]:
        """The frames still owed after the last audio block: feed silence through the look-ahead."""
        silence = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
        for _ in range(self.lookahead_frames):
            yield self.render(self.motion_step(silence))


class PipelineTicker:
    """`tick(samples, render=)` over avatar.pipeline.Pipeline: motion for the block, and the frame
    when asked and the look-ahead is full (else None)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.lookahead_frames = pipeline.lookahead_frames

    def tick(self, samples: np.ndarray, *, render: bool) -> np.ndarray | None:
        motion = self.pipeline.motion_step(samples)
        if not render or self.pipeline.ticks <= self.lookahead_frames:
            return None
        return self.pipeline.render(motion)

    def reset(self) -> None:
        self.pipeline.reset()

    def stream(self, blocks: Iterable[np.ndarray], *, render_threads: int = 1) -> Iterator[np.ndarray]:
        """Every frame of a whole stream, in order: `blocks` (each (SAMPLES_PER_FRAME,) float32)
        then silence through the look-ahead. The same frames as tick() block by block, but the
        audio encoder and motion generator run (with the reading of `blocks`) on a thread of their
        own, up to MOTION_AHEAD ticks ahead of the decoder: their ~3 ms a frame and the audio
        decoding leave the decoder's thread, the one that bounds an offline render.

        render_threads > 1: that many frames are decoded at once, each on a thread of its own
        (offline, where a frame may wait a frame: the decoder is pure, so each frame is the same).
        Meant for a decoder that runs in its caller's thread (FaceDecoder.parallel(0))."""
        pipeline = self.pipeline
        silence = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)

        def motions() -> Iterator[torch.Tensor]:
            for samples in blocks:
                yield pipeline.motion_step(samples)
            for _ in range(self.lookahead_frames):
                yield pipeline.motion_step(silence)

        shown = itertools.islice(run_ahead(motions(), depth=MOTION_AHEAD), self.lookahead_frames, None)
        if render_threads <= 1:
            yield from map(pipeline.render, shown)
        else:
            yield from ordered_map(pipeline.render, shown, threads=render_threads)


MOTION_AHEAD = 4  # motion vectors in flight between the engines' thread and the decoder's (bounded)


def run_ahead(items: Iterator, *, depth: int) -> Iterator:
    """Yields what `items` yields, in order, with `items` advanced on a thread of its own up to
    `depth` items ahead of the caller. An exception there is raised here, at its place in the
    order; closing this generator early (break, an error downstream) stops the thread."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    threads = torch.get_num_threads()

    def produce() -> None:
        torch.set_num_threads(threads)  # per thread (OpenMP): else every op spins a team of all cores
        try:
            for item in items:
                handoff.put((item, None))
                if stop.is_set():
                    return
            handoff.put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            handoff.put((done, exc))

    thread = threading.Thread(target=produce, name="run-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = handoff.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # a producer blocked on a full queue takes one more turn, then stops
            try:
                handoff.get(timeout=0.05)
            except queue.Empty:
                pass


def ordered_map(fn, items: Iterator, *, threads: int) -> Iterator:
    """fn(item) for each of `items`, in order, computed on `threads` threads of their own (torch ops
    release the GIL). At most threads + 1 calls are in flight, so memory is bounded; an exception
    is raised here at its place in the order; closing this generator early waits for the calls in
    flight and drops their results."""
    torch_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="render", initializer=torch.set_num_threads,
                              initargs=(torch_threads,))  # per thread (OpenMP), as in run_ahead
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > threads:  # one queued behind the running ones: no thread waits for the caller
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for job in pending:
            job.cancel()
        pool.shutdown(wait=True)


class FrameTicker:
    """The same `tick` over an engines.runtime FrameEngine (state kept by the back-end, e.g. on the
    GPU), with the noise drawn exactly as avatar.pipeline.Pipeline draws it, so a seed gives the
    same motion on every back-end."""

    def __init__(self, frames, controls, *, seed: int = 0):
        self._torch = torch
        self.frames = frames
        self.controls = controls
        self.seed = seed
        self.lookahead_frames = frames.lookahead_frames
        self.n_noise = frames.n_noise
        self.reset()

    def reset(self) -> None:
        self.frames.reset()
        self.noise = self._torch.Generator().manual_seed(self.seed)
        self.ticks = 0

    def tick(self, samples: np.ndarray, *, render: bool) -> np.ndarray | None:
        noise = self._torch.rand(1, self.n_noise, generator=self.noise)
        self.ticks += 1
        render = render and self.ticks > self.lookahead_frames
        return self.frames.step(samples, self.controls, noise, render=render)

    def stream(self, blocks: Iterable[np.ndarray], *, render_threads: int = 1) -> Iterator[np.ndarray]:
        """Every frame of a whole stream, as PipelineTicker.stream; tick by tick here, since the
        back-end already overlaps its stages on the device (render_threads is not used)."""
        silence = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)
        for samples in blocks:
            if (frame := self.tick(samples, render=True)) is not None:
                yield frame
        for _ in range(self.lookahead_frames):
            yield self.tick(silence, render=True)


def make_ticker(backend, engines: Engines, rig_inputs: tuple[torch.Tensor, ...], controls: torch.Tensor,
                *, seed: int = 0) -> PipelineTicker | FrameTicker:
    """The per-tick driver for an engines.runtime back-end: on the CPU the very Pipeline above; on
    a GPU the back-end's FrameEngine, which keeps the state on the device and replays CUDA graphs
    (torch) or TensorRT plans. Live, the tray and offline render all tick through this."""
    if backend.device.type == "cpu":
        return PipelineTicker(Pipeline(backend.engines(engines), rig_inputs, controls, seed=seed))
    return FrameTicker(backend.frame_engine(engines, rig_inputs), controls, seed=seed)


AUDIO_MODELS = ("auto", "trained", "dsp")
MOTION_MODELS = ("generator", "baseline")


def resolve_audio_model(name: str) -> str:
    """"auto" -> "trained" when the trained encoder's weights are installed, else "dsp"."""
    if name != "auto":
        return name
    from engines.audio_encoder import WEIGHTS_DIR

    if (WEIGHTS_DIR / "audio_encoder.pt").is_file():
        return "trained"
    logging.getLogger("avatar.pipeline").info("no trained audio encoder weights installed: using the DSP encoder")
    return "dsp"


def load_engines(*, audio_model: str = "auto", motion_model: str = "generator",
                 decoder_workers: int | None = None) -> Engines:
    """The torch reference engines, in eval mode. `audio_model` "dsp" and `motion_model`
    "baseline" select the comparison baselines; "auto" is the trained encoder when its weights
    are installed, else the DSP baseline (said once in the log). `decoder_workers`: see
    FaceDecoder.parallel (default 1, or VASA_AVATAR_DECODER_WORKERS)."""
    from engines.audio_encoder import load_audio_encoder
    from engines.face_decoder import FaceDecoder

    if motion_model == "generator":
        from engines.motion_generator import MotionGenerator as generator_class
    elif motion_model == "baseline":
        from engines.baseline_motion import LoudnessBaseline as generator_class
    else:
        from avatar.errors import AvatarError

        raise AvatarError(f"unknown motion model {motion_model!r}: use one of {', '.join(MOTION_MODELS)}")
    # on the CPU the decoder renders the mouth and eyes on a second core (FaceDecoder.parallel);
    # VASA_AVATAR_DECODER_WORKERS=0 keeps it in one thread (a one-core machine, or measuring)
    workers = int(os.environ.get("VASA_AVATAR_DECODER_WORKERS", "1")) if decoder_workers is None else decoder_workers
    return Engines(encoder=load_audio_encoder(resolve_audio_model(audio_model)).eval(), generator=generator_class().eval(),
                   decoder=FaceDecoder().eval().parallel(workers))
