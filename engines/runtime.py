"""Engine runtimes: one interface, back-ends chosen by name from a registry.

    backend = create_backend("auto")                      # or "torch", "onnxruntime", "tensorrt"
    engines = backend.engines(load_engines())             # the torch modules' call contract:
                                                          # avatar/pipeline.py runs these unchanged
    frames = backend.frame_engine(load_engines(), rig.inputs())   # or the whole frame, state on the device
    frame = frames.step(samples, controls, noise)         # (512, 512, 3) uint8 RGB

Back-ends (`register_backend(name, cls)` adds one; tests register fakes):
- `torch`        the reference, CPU or CUDA. On CUDA the FrameEngine keeps every tensor on the
                 device and replays each engine's per-frame work as a captured CUDA graph.
- `onnxruntime`  the exported ONNX graphs; CPU, or CUDA/TensorRT execution providers when the
                 installed onnxruntime has them.
- `tensorrt`     plans built by `python build_engines.py` for this GPU and TensorRT version (the
                 manifest says which); I/O are preallocated torch.cuda tensors bound by name with
                 `data_ptr()`, the three engines run on one torch CUDA stream, the frame is copied to
                 pinned host memory asynchronously and the caller waits on a torch.cuda.Event.
                 No pycuda: torch already provides streams, events and buffers.
`auto` picks tensorrt when plans for this GPU, TensorRT version and engine code exist, else torch on
CUDA, else the fastest CPU back-end (CPU_DEFAULT, measured: see avatar/bench.py).

A FrameEngine runs encoder -> generator -> decoder for one 25 ms tick and owns the engines' state:

    frames.reset()                           # initial state
    frames.set_rig(rig_inputs)               # another portrait (same shapes), between frames
    frame = frames.step(samples, controls, noise, render=True)   # None when render=False
    pending = frames.submit(samples, controls, noise)            # GPU: returns at once;
    frame = pending.result()                                     # waits on the frame's event
    frames.last_motion                       # (1, N_CHANNELS) float32, CPU

`samples` is (SAMPLES_PER_FRAME,) float32 (numpy or torch), `controls` (1, N_CONTROLS) and `noise`
(1, N_NOISE) CPU tensors drawn by the caller exactly as avatar/pipeline.py draws them, so every
back-end sees the same random numbers as the torch reference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from avatar.constants import FRAME_SIZE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError
from engines.export import (ENGINE_NAMES, EngineIO, engine_cache_dir, engine_hash, engine_io, example_inputs,
                            export_engine)

log = logging.getLogger(__name__)

REBUILD = "run `python build_engines.py` to build them for this machine"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CPU_DEFAULT = "torch"  # the faster CPU back-end for the whole frame on the measured 2-core machine


# ---- registry -------------------------------------------------------------------------------------

_BACKENDS: dict[str, type["Backend"]] = {}


def register_backend(name: str, cls: type["Backend"]) -> None:
    """Make `cls` available as back-end `name` (replaces an earlier registration of that name)."""
    if not name or name == "auto":
        raise ValueError(f"invalid back-end name {name!r}")
    _BACKENDS[name] = cls


def backend_names() -> tuple[str, ...]:
    """Registered back-ends, plus "auto"."""
    return ("auto", *_BACKENDS)


def create_backend(name: str = "auto", *, engines: "Engines | None" = None, **options: Any) -> "Backend":
    """The back-end `name` with `options` (device=, threads=, plan_dir=, cuda_graph=, ...).

    "auto": tensorrt when matching plans exist (checked against `engines` when given), else torch
    on CUDA, else CPU_DEFAULT. Why a faster choice was passed over is logged at INFO/WARNING.
    """
    if name == "auto":
        return _auto_backend(engines, options)
    cls = _BACKENDS.get(name)
    if cls is None:
        raise AvatarError(f"unknown engine back-end {name!r}; choose one of {', '.join(backend_names())}")
    return cls(**options)


def _auto_backend(engines, options: dict[str, Any]) -> "Backend":
    wants_cpu = options.get("device") is not None and torch.device(options["device"]).type == "cpu"
    if torch.cuda.is_available() and not wants_cpu:
        try:
            backend = TensorRTBackend(**{k: v for k, v in options.items() if k in ("device", "plan_dir")})
            if engines is not None:
                backend.check(engines)
            return backend
        except AvatarError as e:
            # a missing TensorRT is normal; stale plans are worth telling the user about
            (log.info if "not installed" in str(e) else log.warning)("not using TensorRT: %s", e)
        return TorchBackend(device="cuda", **{k: v for k, v in options.items() if k != "device"})
    return _BACKENDS[CPU_DEFAULT](**{k: v for k, v in options.items() if k in ("threads",)})


# ---- the per-engine call contract ---------------------------------------------------------------

class EngineRunner:
    """One engine on a back-end, with the torch module's call contract: CPU tensors in and out,
    `initial_state`, `lookahead_frames` and `N_NOISE` as the module has them. A drop-in for the
    module in avatar.pipeline.Engines."""

    def __init__(self, name: str, module: nn.Module, run: Callable[..., Sequence[Tensor]], *, traced: bool = False):
        self.name = name
        self.io = engine_io(name, module)
        self._run = run
        self._module = module
        self.traced = traced  # run is a TorchScript trace of the module (the torch back-end on the CPU)
        for attr in ("lookahead_frames", "N_NOISE"):
            if hasattr(module, attr):
                setattr(self, attr, getattr(module, attr))

    def initial_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        return tuple(self._module.initial_state(batch))

    def eval(self) -> "EngineRunner":
        return self

    def __call__(self, *inputs: Tensor):
        if len(inputs) != len(self.io.inputs):
            raise ValueError(f"{self.name} engine takes {len(self.io.inputs)} inputs ({', '.join(self.io.inputs)}), "
                             f"got {len(inputs)}")
        out = tuple(self._run(*inputs))
        return out[0] if len(out) == 1 else out


def _check_call(samples, controls: Tensor, noise: Tensor, n_controls: int, n_noise: int) -> Tensor:
    """The FrameEngine boundary check, once per call: shapes and dtypes named when wrong."""
    x = torch.as_tensor(samples)
    if tuple(x.shape) not in ((SAMPLES_PER_FRAME,), (1, SAMPLES_PER_FRAME)) or x.dtype != torch.float32:
        raise ValueError(f"expected samples ({SAMPLES_PER_FRAME},) float32, got {tuple(x.shape)} {x.dtype}")
    if tuple(controls.shape) != (1, n_controls) or controls.dtype != torch.float32:
        raise ValueError(f"expected controls (1, {n_controls}) float32, got {tuple(controls.shape)} {controls.dtype}")
    if tuple(noise.shape) != (1, n_noise) or noise.dtype != torch.float32:
        raise ValueError(f"expected noise (1, {n_noise}) float32, got {tuple(noise.shape)} {noise.dtype}")
    return x.reshape(1, SAMPLES_PER_FRAME)


# ---- whole-frame engines --------------------------------------------------------------------------

class PendingFrame:
    """A frame that is being made. `result()` waits for it and returns (512, 512, 3) uint8 RGB,
    owned by the caller (later frames never overwrite it)."""

    def __init__(self, wait: Callable[[], np.ndarray]):
        self._wait = wait
        self._frame: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._frame is None:
            self._frame = self._wait()
            self._wait = None
        return self._frame

    @property
    def done(self) -> bool:
        return self._frame is not None


class FrameEngine:
    """Encoder -> generator -> decoder for one tick, state kept inside. This base class runs any
    engines with the module call contract (torch CPU modules, EngineRunners) on the CPU;
    CUDA back-ends subclass it and keep everything on the device."""

    def __init__(self, engines, rig_inputs: Sequence[Tensor], *, timing: bool = False):
        self.engines = engines
        self.lookahead_frames = int(getattr(engines.encoder, "lookahead_frames", 0))
        self.n_noise = int(engines.generator.N_NOISE)
        self.timing = timing
        self.stage_ms: dict[str, float] = {}
        self.set_rig(rig_inputs)
        self.reset()

    # the device name benchmarks report
    device_name = "cpu"

    def reset(self) -> None:
        self._enc_state = tuple(self.engines.encoder.initial_state(1))
        self._gen_state = tuple(self.engines.generator.initial_state(1))
        self._motion: Tensor | None = None

    def set_rig(self, rig_inputs: Sequence[Tensor]) -> None:
        self._rig = tuple(rig_inputs)

    @property
    def last_motion(self) -> Tensor | None:
        return self._motion

    @torch.inference_mode()
    def submit(self, samples, controls: Tensor, noise: Tensor, *, render: bool = True) -> PendingFrame | None:
        x = _check_call(samples, controls, noise, _n_controls(), self.n_noise)
        t0 = time.perf_counter()
        features, *self._enc_state = self.engines.encoder(x, *self._enc_state)
        t1 = time.perf_counter()
        self._motion, *self._gen_state = self.engines.generator(features, controls, noise, *self._gen_state)
        t2 = time.perf_counter()
        frame = None
        if render:
            frame = self.engines.decoder(self._motion, *self._rig)[0].numpy()
        t3 = time.perf_counter()
        if self.timing:
            self.stage_ms = {"audio": (t1 - t0) * 1e3, "motion": (t2 - t1) * 1e3, "face": (t3 - t2) * 1e3}
        return None if frame is None else PendingFrame(lambda: frame)

    def step(self, samples, controls: Tensor, noise: Tensor, *, render: bool = True) -> np.ndarray | None:
        pending = self.submit(samples, controls, noise, render=render)
        return None if pending is None else pending.result()

    @torch.inference_mode()
    def render(self, motion: Tensor | None = None) -> np.ndarray:
        """The frame for `motion` (1, N_CHANNELS), or for the last step's motion."""
        motion = self._motion if motion is None else motion
        return self.engines.decoder(motion, *self._rig)[0].numpy()

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CudaFrameEngine(FrameEngine):
    """Shared by the CUDA back-ends: fixed device buffers for every per-frame input and output,
    pinned host staging, one stream, NVTX ranges per stage, a ring of pinned frame buffers with
    an event each, and (with timing) CUDA events between the stages.

    Subclasses fill in _run_audio (samples_dev -> features), _run_motion (features, controls_dev,
    noise_dev -> motion_dev) and _run_face (motion_dev, rig -> frame_dev), enqueued on self.stream.
    """

    RING = 2  # frames in flight: the caller may hold one pending frame while submitting the next
    # (with timing=True, stage_ms describes the last frame waited for; use step() when timing)

    def __init__(self, engines, rig_inputs, *, device: torch.device, timing: bool = False, cuda=None):
        from avatar.motion import N_CHANNELS

        # `cuda` is torch.cuda; tests pass a CPU emulation of the few calls used here, so this
        # logic runs in CI without a GPU (the GPU tests run the real thing)
        self.cuda = cuda or torch.cuda
        self.device = torch.device(device)
        if self.cuda is torch.cuda and self.device.type != "cuda":
            raise ValueError(f"{type(self).__name__} needs a CUDA device, got {self.device}")
        self.stream = self.cuda.Stream(self.device)
        self.n_noise = int(engines.generator.N_NOISE)
        n_controls = _n_controls()
        dev = self.device
        real = self.cuda is torch.cuda

        def pinned(*shape, dtype=torch.float32):
            t = torch.zeros(*shape, dtype=dtype)
            return t.pin_memory() if real else t

        self.samples_dev = torch.zeros(1, SAMPLES_PER_FRAME, device=dev)
        self.controls_dev = torch.zeros(1, n_controls, device=dev)
        self.noise_dev = torch.zeros(1, self.n_noise, device=dev)
        self.motion_dev = torch.zeros(1, N_CHANNELS, device=dev)
        self.frame_dev = torch.zeros(1, FRAME_SIZE, FRAME_SIZE, 3, dtype=torch.uint8, device=dev)
        # host side: staging for the inputs (reused once the copies out of them are done), and a
        # ring of frame buffers, each with the event its copy records
        self._staging = [(pinned(1, SAMPLES_PER_FRAME), pinned(1, n_controls), pinned(1, self.n_noise))
                         for _ in range(self.RING)]
        self._staged = [self.cuda.Event() for _ in range(self.RING)]
        self._frames_host = [pinned(1, FRAME_SIZE, FRAME_SIZE, 3, dtype=torch.uint8) for _ in range(self.RING)]
        self._frame_ready = [self.cuda.Event() for _ in range(self.RING)]
        self._pending: list[PendingFrame | None] = [None] * self.RING
        self._motion_host = pinned(1, N_CHANNELS)
        self._motion_ready = self.cuda.Event()
        self._slot = 0
        self._stage_events = [self.cuda.Event(enable_timing=True) for _ in range(4)] if timing else None
        self.device_name = self.cuda.get_device_name(self.device)
        self._bind()
        super().__init__(engines, rig_inputs, timing=timing)

    # -- what subclasses provide
    def _bind(self) -> None:
        """Called once the device buffers exist, before the rig is set and the state reset."""

    def _run_audio(self) -> None:
        raise NotImplementedError

    def _run_motion(self) -> None:
        raise NotImplementedError

    def _run_face(self) -> None:
        raise NotImplementedError

    # -- the frame
    @property
    def last_motion(self) -> Tensor | None:
        if not self._has_motion:
            return None
        self._motion_ready.synchronize()
        return self._motion_host.clone()

    def reset(self) -> None:
        self._has_motion = False

    def _nvtx(self, name: str | None) -> None:
        if name is None:
            self.cuda.nvtx.range_pop()
        else:
            self.cuda.nvtx.range_push(name)

    @torch.no_grad()
    def submit(self, samples, controls: Tensor, noise: Tensor, *, render: bool = True) -> PendingFrame | None:
        x = _check_call(samples, controls, noise, self.controls_dev.shape[1], self.n_noise)
        slot = self._slot
        self._slot = (slot + 1) % self.RING
        if self._pending[slot] is not None:  # the ring wrapped: keep that frame before reusing its buffer
            self._pending[slot].result()
            self._pending[slot] = None
        self._staged[slot].synchronize()  # the copies out of this staging slot have finished
        s_host, c_host, n_host = self._staging[slot]
        s_host.copy_(x)
        c_host.copy_(controls)
        n_host.copy_(noise)
        ev = self._stage_events
        self._nvtx("frame")
        with self.cuda.stream(self.stream):
            self.samples_dev.copy_(s_host, non_blocking=True)
            self.controls_dev.copy_(c_host, non_blocking=True)
            self.noise_dev.copy_(n_host, non_blocking=True)
            self._staged[slot].record(self.stream)
            if ev:
                ev[0].record(self.stream)
            self._nvtx("audio_encoder")
            self._run_audio()
            self._nvtx(None)
            if ev:
                ev[1].record(self.stream)
            self._nvtx("motion_generator")
            self._run_motion()
            self._nvtx(None)
            if ev:
                ev[2].record(self.stream)
            self._motion_host.copy_(self.motion_dev, non_blocking=True)
            self._motion_ready.record(self.stream)
            self._has_motion = True
            pending = None
            if render:
                self._nvtx("face_decoder")
                self._run_face()
                self._nvtx(None)
                if ev:
                    ev[3].record(self.stream)
                pending = self._copy_frame(slot)
        self._nvtx(None)
        return pending

    def _copy_frame(self, slot: int) -> PendingFrame:
        host, ready = self._frames_host[slot], self._frame_ready[slot]
        self._nvtx("frame_to_host")
        host.copy_(self.frame_dev, non_blocking=True)
        ready.record(self.stream)
        self._nvtx(None)
        timed = self._stage_events is not None

        def wait() -> np.ndarray:
            ready.synchronize()
            if timed:
                ev = self._stage_events
                self.stage_ms = {"audio": ev[0].elapsed_time(ev[1]), "motion": ev[1].elapsed_time(ev[2]),
                                 "face": ev[2].elapsed_time(ev[3])}
            self._pending[slot] = None
            return host[0].numpy().copy()

        pending = PendingFrame(wait)
        self._pending[slot] = pending
        return pending

    @torch.no_grad()
    def render(self, motion: Tensor | None = None) -> np.ndarray:
        slot = self._slot
        self._slot = (slot + 1) % self.RING
        if self._pending[slot] is not None:
            self._pending[slot].result()
        with self.cuda.stream(self.stream):
            if motion is not None:
                self.motion_dev.copy_(motion.to(torch.float32).reshape(self.motion_dev.shape), non_blocking=False)
            self._nvtx("face_decoder")
            self._run_face()
            self._nvtx(None)
            return self._copy_frame(slot).result()

    def close(self) -> None:
        for pending in self._pending:
            if pending is not None:
                pending.result()
        self.stream.synchronize()


def _n_controls() -> int:
    from avatar.controls import N_CONTROLS

    return int(N_CONTROLS)


def _copy_state(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """dst <- src in place; a source that shares memory with its destination (an engine that
    returns a view of its input) is cloned first so the copy cannot read what it overwrites."""
    for d, s in zip(dst, src):
        if s.data_ptr() == d.data_ptr() and s.shape == d.shape and s.stride() == d.stride():
            continue
        if s.untyped_storage().data_ptr() == d.untyped_storage().data_ptr():
            s = s.clone()
        d.copy_(s)


class TorchCudaFrameEngine(_CudaFrameEngine):
    """The torch modules on one CUDA device, every buffer static. With `cuda_graph`, each engine's
    per-frame work (state update included) is captured once as a CUDA graph and replayed; if
    capture fails the engine runs eagerly and `cuda_graph_error` says why."""

    def __init__(self, engines, rig_inputs, *, device="cuda", cuda_graph: bool = True, timing: bool = False,
                 cuda=None):
        device = torch.device(device)
        self.modules = {name: copy.deepcopy(m).to(device).eval() for name, m in
                        zip(ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder))}
        self._initial = (tuple(s.to(device) for s in engines.encoder.initial_state(1)),
                         tuple(s.to(device) for s in engines.generator.initial_state(1)))
        self.enc_state = tuple(s.clone() for s in self._initial[0])
        self.gen_state = tuple(s.clone() for s in self._initial[1])
        self.rig_dev: tuple[Tensor, ...] = ()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.cuda_graph_error: str | None = None
        super().__init__(engines, rig_inputs, device=device, timing=timing, cuda=cuda)
        if cuda_graph:
            try:
                self._capture()
            except Exception as e:  # a non-capturable op: run eagerly, and say so (and where)
                self.graphs = {}
                where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
                         if f"{os.sep}engines{os.sep}" in f.filename and not f.filename.endswith("runtime.py")]
                self.cuda_graph_error = f"{type(e).__name__}: {e}" + (f" (at {where[-1]})" if where else "")
                log.warning("CUDA graph capture failed, running eagerly: %s", self.cuda_graph_error)
                self.cuda.synchronize(self.device)
            self.reset()

    @property
    def cuda_graph(self) -> bool:
        return bool(self.graphs)

    def set_rig(self, rig_inputs: Sequence[Tensor]) -> None:
        rig_inputs = tuple(rig_inputs)
        if not self.rig_dev:
            self.rig_dev = tuple(t.to(self.device).clone() for t in rig_inputs)
            return
        # same buffers, new contents: a captured graph stays valid
        with self.cuda.stream(self.stream):
            for dst, src in zip(self.rig_dev, rig_inputs):
                if dst.shape != src.shape or dst.dtype != src.dtype:
                    raise ValueError(f"rig tensor {tuple(src.shape)} {src.dtype} does not fit {tuple(dst.shape)} {dst.dtype}")
                dst.copy_(src, non_blocking=False)
        self.stream.synchronize()

    def reset(self) -> None:
        super().reset()
        with self.cuda.stream(self.stream):
            _copy_state(self.enc_state, self._initial[0])
            _copy_state(self.gen_state, self._initial[1])
        self.stream.synchronize()

    def _eager_audio(self) -> None:
        features, *new = self.modules["audio"](self.samples_dev, *self.enc_state)
        self.features = features
        _copy_state(self.enc_state, new)

    def _eager_motion(self) -> None:
        motion, *new = self.modules["motion"](self.features, self.controls_dev, self.noise_dev, *self.gen_state)
        self.motion_dev.copy_(motion)
        _copy_state(self.gen_state, new)

    def _eager_face(self) -> None:
        self.frame_dev.copy_(self.modules["face"](self.motion_dev, *self.rig_dev))

    def _capture(self) -> None:
        stages = (("audio", self._eager_audio), ("motion", self._eager_motion), ("face", self._eager_face))
        with torch.no_grad():
            # warm up on a side stream (lazy initialisations must not happen during capture)
            side = self.cuda.Stream(self.device)
            side.wait_stream(self.cuda.current_stream(self.device))
            with self.cuda.stream(side):
                for _ in range(3):
                    for _, fn in stages:
                        fn()
            self.cuda.current_stream(self.device).wait_stream(side)
            self.cuda.synchronize(self.device)
            for name, fn in stages:
                graph = self.cuda.CUDAGraph()
                with self.cuda.graph(graph, stream=side):
                    fn()
                self.graphs[name] = graph
            self.cuda.synchronize(self.device)

    def _run(self, name: str, eager: Callable[[], None]) -> None:
        graph = self.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            eager()

    def _run_audio(self) -> None:
        self._run("audio", self._eager_audio)

    def _run_motion(self) -> None:
        self._run("motion", self._eager_motion)

    def _run_face(self) -> None:
        self._run("face", self._eager_face)


# ---- back-ends ------------------------------------------------------------------------------------

class Backend:
    """Turns the torch reference engines into runnable ones on one device.

    engines(engines)               -> Engines with the modules' call contract (avatar/pipeline.py)
    frame_engine(engines, rig)     -> FrameEngine: the whole frame, state kept by the back-end
    """

    name: ClassVar[str] = ""

    def __init__(self, *, device: str | torch.device | None = None, **options: Any):
        self.device = torch.device(device or "cpu")
        self.options = options

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def runner(self, name: str, module: nn.Module) -> EngineRunner:
        raise NotImplementedError

    def engines(self, engines):
        from avatar.pipeline import Engines

        return Engines(encoder=self.runner("audio", engines.encoder), generator=self.runner("motion", engines.generator),
                       decoder=self.runner("face", engines.decoder))

    def frame_engine(self, engines, rig_inputs: Sequence[Tensor], *, timing: bool = False) -> FrameEngine:
        return FrameEngine(self.engines(engines), rig_inputs, timing=timing)

    def describe(self) -> str:
        return f"{self.name} on {self.device_name}"


def _traced(name: str, module: nn.Module) -> nn.Module:
    """`module` as a TorchScript trace (the graph ONNX export takes), for the CPU: the audio encoder
    and the motion generator are ~1,000 small ops a tick, so Python's cost per op is most of their
    time; traced they ran 2.5-3x faster here (AMD EPYC, 1 thread: 4.2 -> 1.4-1.7 ms a tick for both)
    with bit-identical outputs (tests/test_runtime.py). The face decoder stays eager: on the CPU it
    skips work by reading the host. A module that does not trace runs as it is."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trace's own notes (and its deprecation in newer torch)
            return torch.jit.trace(module.eval(), example_inputs(name, module), check_trace=False)
    except Exception as exc:  # noqa: BLE001 - any failure to trace leaves the eager module, which is exact
        log.info("%s engine runs eagerly (tracing failed: %s)", name, exc)
        return module


class TorchBackend(Backend):
    """The torch modules themselves: the reference. Options: device ("cpu", "cuda", "cuda:1"),
    threads (torch intra-op threads on the CPU; default: leave torch's setting), cuda_graph
    (default True: capture each engine's per-frame work on CUDA)."""

    name = "torch"

    def __init__(self, *, device=None, threads: int | None = None, cuda_graph: bool = True, **options):
        super().__init__(device=device, **options)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise AvatarError("the torch back-end was asked for CUDA, but torch sees no CUDA GPU")
        if threads:
            torch.set_num_threads(int(threads))
        self.cuda_graph = cuda_graph

    TRACED_ON_CPU = ("audio", "motion")

    def runner(self, name: str, module: nn.Module) -> EngineRunner:
        if self.device.type == "cpu":
            call = _traced(name, module) if name in self.TRACED_ON_CPU else module

            def run(*inputs):
                with torch.inference_mode():
                    out = call(*inputs)
                return (out,) if isinstance(out, Tensor) else out
            return EngineRunner(name, module, run, traced=call is not module)
        on_device = copy.deepcopy(module).to(self.device).eval()

        def run_on_device(*inputs):
            with torch.inference_mode():
                out = on_device(*(t.to(self.device) for t in inputs))
            out = (out,) if isinstance(out, Tensor) else out
            return tuple(o.cpu() for o in out)
        return EngineRunner(name, module, run_on_device)

    def engines(self, engines):
        if self.device.type == "cpu":  # the modules themselves; the small per-tick ones traced (see _traced)
            from avatar.pipeline import Engines

            return Engines(encoder=self.runner("audio", engines.encoder),
                           generator=self.runner("motion", engines.generator), decoder=engines.decoder)
        return super().engines(engines)

    def frame_engine(self, engines, rig_inputs, *, timing: bool = False) -> FrameEngine:
        if self.device.type == "cpu":
            return FrameEngine(self.engines(engines), rig_inputs, timing=timing)
        return TorchCudaFrameEngine(engines, rig_inputs, device=self.device, cuda_graph=self.cuda_graph, timing=timing)


class OnnxRuntimeBackend(Backend):
    """The exported ONNX graphs in onnxruntime. Options: device ("cpu" or "cuda"), threads
    (intra-op threads per session, default 1: the stages do not fight over the cores),
    providers (explicit list; default: CPU, or on "cuda" the TensorRT/CUDA providers this
    onnxruntime has), cache_dir (where the ONNX files are)."""

    name = "onnxruntime"
    GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __init__(self, *, device=None, threads: int = 1, providers: Sequence[str] | None = None,
                 cache_dir: Path | None = None, **options):
        super().__init__(device=device, **options)
        try:
            import onnxruntime as ort
        except ImportError:
            raise AvatarError("the onnxruntime back-end needs onnxruntime: pip install onnxruntime") from None
        self.ort = ort
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                gpu = [p for p in self.GPU_PROVIDERS if p in available]
                if not gpu:
                    raise AvatarError("this onnxruntime has no CUDA or TensorRT execution provider "
                                      "(pip install onnxruntime-gpu), or use --backend torch")
                providers = gpu + providers
        missing = [p for p in providers if p not in available]
        if missing:
            raise AvatarError(f"onnxruntime lacks the execution provider(s) {', '.join(missing)}; "
                              f"it has {', '.join(available)}")
        self.providers = list(providers)
        self.threads = int(threads)
        self.cache_dir = cache_dir

    def session(self, path: Path):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return self.ort.InferenceSession(str(path), options, providers=self.providers)

    def runner(self, name: str, module: nn.Module) -> EngineRunner:
        exported = export_engine(name, module, cache_dir=self.cache_dir)
        session = self.session(exported.path)
        inputs, outputs = list(exported.io.inputs), list(exported.io.outputs)

        def run(*tensors: Tensor) -> tuple[Tensor, ...]:
            feed = {n: t.detach().numpy() for n, t in zip(inputs, tensors)}
            return tuple(torch.from_numpy(o) for o in session.run(outputs, feed))

        return EngineRunner(name, module, run)


# ---- TensorRT -------------------------------------------------------------------------------------

def import_tensorrt():
    """The tensorrt module, or an AvatarError that says how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise AvatarError("TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU); "
                          "use --backend torch") from None
    return tensorrt


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def trt_major(trt) -> int:
    try:
        return int(trt_version(trt).split(".")[0])
    except ValueError:
        return 0


def gpu_identity(device: torch.device | str = "cuda") -> dict[str, str]:
    """What a plan is tied to on this machine: GPU name and compute capability, CUDA version."""
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "cuda": str(torch.version.cuda)}


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise AvatarError(f"a TensorRT engine uses tensor type {dtype}, which this runtime does not handle; {REBUILD}")


def read_manifest(plan_dir: Path) -> dict:
    path = Path(plan_dir) / MANIFEST
    if not path.is_file():
        raise AvatarError(f"no TensorRT engines in {plan_dir}; {REBUILD}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AvatarError(f"the TensorRT manifest {path} is unreadable ({e}); {REBUILD}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise AvatarError(f"the TensorRT manifest {path} has format {manifest.get('format')!r}, "
                          f"expected {MANIFEST_FORMAT}; {REBUILD}")
    return manifest


def check_manifest(manifest: dict, *, identity: dict[str, str], version: str,
                   hashes: dict[str, str] | None = None) -> None:
    """AvatarError (saying what differs and how to rebuild) unless the plans were built for this
    GPU, compute capability, TensorRT version and, given `hashes`, these engines' code and weights."""
    built_for = f"{manifest.get('gpu')} (compute {manifest.get('compute_capability')}), TensorRT {manifest.get('tensorrt')}"
    here = f"{identity['gpu']} (compute {identity['compute_capability']}), TensorRT {version}"
    if manifest.get("gpu") != identity["gpu"] or manifest.get("compute_capability") != identity["compute_capability"]:
        raise AvatarError(f"the TensorRT engines were built for {built_for}, this machine has {here}; {REBUILD}")
    if manifest.get("tensorrt") != version:
        raise AvatarError(f"the TensorRT engines were built with TensorRT {manifest.get('tensorrt')}, "
                          f"this is TensorRT {version}; {REBUILD}")
    for name, h in (hashes or {}).items():
        entry = manifest.get("engines", {}).get(name)
        if entry is None:
            raise AvatarError(f"no TensorRT engine for the {name} engine in the manifest; {REBUILD}")
        if entry.get("onnx_hash") != h:
            raise AvatarError(f"the TensorRT {name} engine was built from other engine code or weights "
                              f"({entry.get('onnx_hash')}, now {h}); {REBUILD}")


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt):
    """One TensorRT logger per tensorrt module (TensorRT wants a single logger per process)."""
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[id(trt)]


class TensorRTEngine:
    """One deserialized plan with `contexts` execution contexts, every I/O tensor a preallocated
    torch.cuda tensor bound by name with its data_ptr(). Rebind a tensor with `bind`. (`device` is
    where the buffers live: CUDA for real TensorRT; the tests run a fake tensorrt on CPU buffers.)

    Several contexts let a stateful engine ping-pong its state without rebinding per frame:
    context 0 reads state set A and writes set B, context 1 the reverse.
    """

    def __init__(self, trt, plan: bytes, *, name: str, device: torch.device, contexts: int = 1):
        self.trt = trt
        self.name = name
        self.device = torch.device(device)
        runtime = trt.Runtime(trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise AvatarError(f"TensorRT could not load the {name} engine (built for another GPU or TensorRT "
                              f"version?); {REBUILD}")
        self.engine = engine
        self._runtime = runtime  # the runtime must outlive its engine
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                raise AvatarError(f"the TensorRT {name} engine has a dynamic shape for {tensor}; {REBUILD}")
            self.specs[tensor] = (shape, _torch_dtype(trt, engine.get_tensor_dtype(tensor)))
            is_input = engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(tensor)
        self.contexts = []
        for _ in range(contexts):
            context = engine.create_execution_context()
            if context is None:
                raise AvatarError(f"TensorRT could not create an execution context for the {name} engine "
                                  "(out of GPU memory?)")
            self.contexts.append(context)
        self.buffers: list[dict[str, Tensor]] = [{} for _ in range(contexts)]
        for k in range(contexts):
            for tensor, (shape, dtype) in self.specs.items():
                self.bind(tensor, torch.zeros(shape, dtype=dtype, device=self.device), context=k)

    def check_io(self, expected: EngineIO) -> None:
        if tuple(self.inputs) != expected.inputs or tuple(self.outputs) != expected.outputs:
            raise AvatarError(f"the TensorRT {self.name} engine has I/O {self.inputs} -> {self.outputs}, "
                              f"the engine code expects {list(expected.inputs)} -> {list(expected.outputs)}; {REBUILD}")

    def bind(self, tensor: str, buffer: Tensor, *, context: int = 0) -> None:
        shape, dtype = self.specs[tensor]
        if tuple(buffer.shape) != shape or buffer.dtype != dtype or not buffer.is_contiguous() \
                or not _same_device(buffer.device, self.device):
            raise ValueError(f"{self.name}.{tensor} needs a contiguous {shape} {dtype} tensor on {self.device}, "
                             f"got {tuple(buffer.shape)} {buffer.dtype} on {buffer.device}")
        if not self.contexts[context].set_tensor_address(tensor, buffer.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {self.name}.{tensor}")
        self.buffers[context][tensor] = buffer

    def enqueue(self, stream: torch.cuda.Stream, *, context: int = 0) -> None:
        if not self.contexts[context].execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue the {self.name} engine")

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Synchronous convenience (checks, build verification): inputs copied into the bound
        buffers, one run on a private stream, outputs cloned."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the {self.name} engine takes {len(self.inputs)} inputs, got {len(inputs)}")
        on_gpu = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if on_gpu else _HostStream()
        with torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext():
            for tensor, value in zip(self.inputs, inputs):
                self.buffers[0][tensor].copy_(value.reshape(self.specs[tensor][0]), non_blocking=False)
            self.enqueue(stream)
            out = tuple(self.buffers[0][t].clone() for t in self.outputs)
        stream.synchronize()
        return out


class _HostStream:
    """Stands in for a CUDA stream when the buffers live on the CPU (tests with a fake tensorrt)."""

    cuda_stream = 0

    def synchronize(self) -> None:
        pass


def load_plans(plan_dir: Path, engines, *, device: torch.device, trt=None,
               names: Sequence[str] = ENGINE_NAMES) -> tuple[dict, dict[str, bytes]]:
    """Manifest checks for this machine and these engines, then the plan files' bytes."""
    trt = trt or import_tensorrt()
    manifest = read_manifest(plan_dir)
    modules = dict(zip(ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)))
    check_manifest(manifest, identity=gpu_identity(device), version=trt_version(trt),
                   hashes={n: engine_hash(modules[n]) for n in names})
    plans = {}
    for name in names:
        path = Path(plan_dir) / manifest["engines"][name]["plan"]
        if not path.is_file():
            raise AvatarError(f"the TensorRT plan {path} listed in the manifest is missing; {REBUILD}")
        plans[name] = path.read_bytes()
    return manifest, plans


def tensorrt_engines(trt, plans: dict[str, bytes], engines, *, device: torch.device):
    """Engines whose three members run the plans with the torch modules' call contract (CPU
    tensors in and out, one synchronous run per call): what avatar/pipeline.py runs unchanged."""
    from avatar.pipeline import Engines

    modules = dict(zip(ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)))
    runners = {}
    for name in ENGINE_NAMES:
        e = TensorRTEngine(trt, plans[name], name=name, device=device)
        e.check_io(engine_io(name, modules[name]))
        runners[name] = EngineRunner(name, modules[name], lambda *x, e=e: tuple(o.cpu() for o in e(*x)))
    return Engines(encoder=runners["audio"], generator=runners["motion"], decoder=runners["face"])


class TensorRTFrameEngine(_CudaFrameEngine):
    """The three TensorRT plans on one stream, buffers shared between them where one engine's
    output is the next one's input (features, motion), state ping-ponged between two contexts."""

    def __init__(self, engines, rig_inputs, *, plans: dict[str, bytes], device="cuda", trt=None,
                 timing: bool = False, cuda=None):
        device = torch.device(device)
        trt = trt or import_tensorrt()
        modules = dict(zip(ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)))
        self.trt_engines = {
            "audio": TensorRTEngine(trt, plans["audio"], name="audio", device=device, contexts=2),
            "motion": TensorRTEngine(trt, plans["motion"], name="motion", device=device, contexts=2),
            "face": TensorRTEngine(trt, plans["face"], name="face", device=device, contexts=1),
        }
        for name, e in self.trt_engines.items():
            e.check_io(engine_io(name, modules[name]))
        self._initial = (tuple(engines.encoder.initial_state(1)), tuple(engines.generator.initial_state(1)))
        self._parity = 0
        super().__init__(engines, rig_inputs, device=device, timing=timing, cuda=cuda)

    def _bind(self) -> None:
        audio, motion, face = (self.trt_engines[n] for n in ENGINE_NAMES)
        # state: context k reads set k and writes set 1 - k
        for e in (audio, motion):
            n_state = len([t for t in e.inputs if t.startswith("state_in_")])
            sets = [[e.buffers[0][f"state_in_{i}"] for i in range(n_state)],
                    [e.buffers[0][f"state_out_{i}"] for i in range(n_state)]]
            for k in range(2):
                for i in range(n_state):
                    e.bind(f"state_in_{i}", sets[k][i], context=k)
                    e.bind(f"state_out_{i}", sets[1 - k][i], context=k)
            e.state_sets = sets
        for k in range(2):
            audio.bind("samples", self.samples_dev, context=k)
            audio.bind("features", audio.buffers[0]["features"], context=k)
            motion.bind("features", audio.buffers[0]["features"], context=k)  # no copy between engines
            motion.bind("controls", self.controls_dev, context=k)
            motion.bind("noise", self.noise_dev, context=k)
            motion.bind("motion", self.motion_dev, context=k)
        face.bind("motion", self.motion_dev)
        face.bind("frame", self.frame_dev)

    def set_rig(self, rig_inputs: Sequence[Tensor]) -> None:
        face = self.trt_engines["face"]
        rig_names = face.inputs[1:]
        rig_inputs = tuple(rig_inputs)
        if len(rig_inputs) != len(rig_names):
            raise ValueError(f"expected {len(rig_names)} rig tensors ({', '.join(rig_names)}), got {len(rig_inputs)}")
        with self.cuda.stream(self.stream):
            for tensor, value in zip(rig_names, rig_inputs):
                shape, dtype = face.specs[tensor]
                if tuple(value.shape) != shape or value.dtype != dtype:
                    raise ValueError(f"rig tensor {tensor} is {tuple(value.shape)} {value.dtype}, "
                                     f"the engine needs {shape} {dtype}")
                face.buffers[0][tensor].copy_(value, non_blocking=False)
        self.stream.synchronize()

    def reset(self) -> None:
        super().reset()
        self._parity = 0
        with self.cuda.stream(self.stream):
            for name, initial in zip(("audio", "motion"), self._initial):
                for dst, src in zip(self.trt_engines[name].state_sets[0], initial):
                    dst.copy_(src, non_blocking=False)
        self.stream.synchronize()

    def _run_audio(self) -> None:
        self.trt_engines["audio"].enqueue(self.stream, context=self._parity)

    def _run_motion(self) -> None:
        self.trt_engines["motion"].enqueue(self.stream, context=self._parity)
        self._parity = 1 - self._parity  # the next frame reads what this one wrote

    def _run_face(self) -> None:
        self.trt_engines["face"].enqueue(self.stream)


class TensorRTBackend(Backend):
    """Plans from `python build_engines.py` (plan_dir: default the engine cache's tensorrt/)."""

    name = "tensorrt"

    def __init__(self, *, device=None, plan_dir: Path | None = None, **options):
        super().__init__(device=device or "cuda", **options)
        self.trt = import_tensorrt()
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise AvatarError("the tensorrt back-end needs an NVIDIA GPU that torch can see (torch.cuda)")
        self.plan_dir = Path(plan_dir) if plan_dir is not None else default_plan_dir()
        self.manifest = read_manifest(self.plan_dir)
        check_manifest(self.manifest, identity=gpu_identity(self.device), version=trt_version(self.trt))

    def check(self, engines) -> None:
        """AvatarError unless every engine's plan exists and was built from this engine code and
        weights (reads only the manifest and checks the files exist)."""
        modules = dict(zip(ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)))
        check_manifest(self.manifest, identity=gpu_identity(self.device), version=trt_version(self.trt),
                       hashes={n: engine_hash(m) for n, m in modules.items()})
        for name in ENGINE_NAMES:
            path = self.plan_dir / self.manifest["engines"][name]["plan"]
            if not path.is_file():
                raise AvatarError(f"the TensorRT plan {path} listed in the manifest is missing; {REBUILD}")

    def _plans(self, engines) -> dict[str, bytes]:
        return load_plans(self.plan_dir, engines, device=self.device, trt=self.trt)[1]

    def runner(self, name: str, module: nn.Module) -> EngineRunner:
        raise NotImplementedError  # engines() builds all three at once (plans are checked together)

    def engines(self, engines):
        return tensorrt_engines(self.trt, self._plans(engines), engines, device=self.device)

    def frame_engine(self, engines, rig_inputs, *, timing: bool = False) -> FrameEngine:
        return TensorRTFrameEngine(engines, rig_inputs, plans=self._plans(engines), device=self.device,
                                   trt=self.trt, timing=timing)


def default_plan_dir() -> Path:
    return engine_cache_dir() / "tensorrt"


register_backend("torch", TorchBackend)
register_backend("onnxruntime", OnnxRuntimeBackend)
register_backend("tensorrt", TensorRTBackend)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" name the same device when the current device is 0: an index left out
    matches any index (seen on the H100: buffers on cuda:0 refused by an engine made for "cuda")."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
