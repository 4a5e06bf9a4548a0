"""Engine runtimes: the registry, the torch and onnxruntime back-ends against the torch reference
(in the lead's Pipeline unchanged, and as whole-frame FrameEngines), and the TensorRT code paths
against a fake `tensorrt` module that records every call and computes with onnxruntime."""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from avatar.constants import SAMPLES_PER_FRAME
from avatar.controls import Controls, controls_tensor
from avatar.errors import AvatarError
from avatar.pipeline import Engines, Pipeline
from engines import export as ex
from engines import runtime as rt
from engines.audio_encoder import load_audio_encoder
from engines.face_decoder import FaceDecoder
from engines.motion_generator import MotionGenerator

RENDER_EVERY = 20  # frames rendered in the free-running comparisons (the decoder dominates test time)


@pytest.fixture(scope="session")
def controls():
    return controls_tensor(Controls(mood="happy", seed=3))


@pytest.fixture(scope="session")
def engines():
    return Engines(encoder=load_audio_encoder("dsp"), generator=MotionGenerator().eval(), decoder=FaceDecoder().eval())


def _pixel_errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(d.max())


def _free_run(reference: Pipeline, other, voice, *, frame_engine: bool = False, seed: int = 0):
    """Run both for every tick of `voice` from their own state; return the worst motion error and
    the worst (mean, max) pixel errors over the rendered ticks."""
    noise = torch.Generator().manual_seed(seed)
    worst_motion, worst_mean, worst_max, rendered = 0.0, 0.0, 0.0, 0
    for t, tick in enumerate(voice.reshape(-1, SAMPLES_PER_FRAME).numpy()):
        render = t % RENDER_EVERY == RENDER_EVERY - 1
        motion = reference.motion_step(tick)
        if frame_engine:
            frame = other.step(tick, reference.controls, torch.rand(1, other.n_noise, generator=noise), render=render)
            got_motion = other.last_motion
        else:
            got_motion = other.motion_step(tick)
            frame = other.render(got_motion) if render else None
        worst_motion = max(worst_motion, float((got_motion - motion).abs().max()))
        if render:
            mean, mx = _pixel_errors(reference.render(motion), frame)
            worst_mean, worst_max, rendered = max(worst_mean, mean), max(worst_max, mx), rendered + 1
    assert rendered >= 3
    return worst_motion, worst_mean, worst_max


# ---- registry -------------------------------------------------------------------------------------

class _FakeBackend(rt.Backend):
    name = "fake"
    made: list[dict] = []

    def __init__(self, **options):
        super().__init__(**options)
        _FakeBackend.made.append(options)

    def runner(self, name, module):
        return rt.EngineRunner(name, module, lambda *x: (module(*x),) if name == "face" else module(*x))


def test_registry_creates_backends_by_name(monkeypatch):
    monkeypatch.setattr(rt, "_BACKENDS", dict(rt._BACKENDS))
    rt.register_backend("fake", _FakeBackend)
    assert {"auto", "torch", "onnxruntime", "tensorrt", "fake"} <= set(rt.backend_names())
    backend = rt.create_backend("fake", threads=3)
    assert isinstance(backend, _FakeBackend) and _FakeBackend.made[-1] == {"threads": 3}
    with pytest.raises(AvatarError, match="unknown engine back-end 'nope'.*torch"):
        rt.create_backend("nope")
    with pytest.raises(ValueError):
        rt.register_backend("auto", _FakeBackend)


def test_a_registered_backend_runs_in_the_pipeline_unchanged(monkeypatch, engines, rig, controls, voice):
    monkeypatch.setattr(rt, "_BACKENDS", dict(rt._BACKENDS))
    rt.register_backend("fake", _FakeBackend)
    wrapped = rt.create_backend("fake").engines(engines)
    assert isinstance(wrapped.encoder, rt.EngineRunner)
    assert wrapped.encoder.lookahead_frames == engines.encoder.lookahead_frames
    assert wrapped.generator.N_NOISE == engines.generator.N_NOISE
    ref = Pipeline(engines, rig.inputs(), controls, seed=5)
    other = Pipeline(wrapped, rig.inputs(), controls, seed=5)
    motion, mean, mx = _free_run(ref, other, voice[: 3 * RENDER_EVERY * SAMPLES_PER_FRAME])
    assert motion == 0.0 and mx == 0.0


def test_auto_without_cuda_picks_the_cpu_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = rt.create_backend("auto")
    assert backend.name == rt.CPU_DEFAULT and backend.device.type == "cpu"


def test_auto_with_cuda_but_no_plans_falls_back_to_torch_cuda(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": dict(GPU))
    backend = rt.create_backend("auto", plan_dir=tmp_path)
    assert backend.name == "torch" and backend.device.type == "cuda"
    assert "build_engines.py" in caplog.text
    assert rt.create_backend("auto", device="cpu").device.type == "cpu"  # asked for the CPU: no GPU choice


# ---- torch and onnxruntime against the reference ----------------------------------------------------

def test_torch_cpu_frame_engine_is_the_pipeline_exactly(engines, rig, controls, voice):
    """The FrameEngine on torch CPU is the same arithmetic as the Pipeline: bit-identical."""
    frames = rt.create_backend("torch").frame_engine(engines, rig.inputs())
    assert frames.lookahead_frames == engines.encoder.lookahead_frames
    ref = Pipeline(engines, rig.inputs(), controls, seed=7)
    motion, mean, mx = _free_run(ref, frames, voice, frame_engine=True, seed=7)
    assert motion == 0.0 and mx == 0.0
    assert frames.step(voice[:SAMPLES_PER_FRAME].numpy(), controls, torch.rand(1, frames.n_noise), render=False) is None
    frames.reset()
    ref.reset()
    first = frames.step(voice[:SAMPLES_PER_FRAME].numpy(), controls, torch.rand(1, frames.n_noise,
                        generator=torch.Generator().manual_seed(7)))
    assert first.shape == (512, 512, 3) and first.dtype == np.uint8
    assert torch.equal(frames.last_motion, ref.motion_step(voice[:SAMPLES_PER_FRAME].numpy()))


@pytest.mark.parametrize("audio_model,motion_model", [("trained", "generator"), ("dsp", "baseline")])
def test_torch_cpu_traces_the_per_tick_engines_with_the_same_bits(audio_model, motion_model, controls, voice):
    """On the CPU the torch back-end runs the audio encoder and the motion generator as traces
    (2.5-3x faster: they are ~1,000 small ops a tick) and the face decoder eagerly; every
    feature, state and motion value must equal the modules' own, tick after tick."""
    from avatar.pipeline import load_engines

    engines = load_engines(audio_model=audio_model, motion_model=motion_model)
    run = rt.create_backend("torch", device="cpu").engines(engines)
    assert run.encoder.traced and run.generator.traced and run.decoder is engines.decoder
    noise = torch.Generator().manual_seed(5)
    states = [tuple(engines.encoder.initial_state(1)), tuple(engines.generator.initial_state(1))]
    mine = [tuple(run.encoder.initial_state(1)), tuple(run.generator.initial_state(1))]
    with torch.inference_mode():
        for tick in voice.reshape(-1, SAMPLES_PER_FRAME)[:80]:
            n = torch.rand(1, engines.generator.N_NOISE, generator=noise)
            want = engines.encoder(tick[None], *states[0])
            got = run.encoder(tick[None], *mine[0])
            assert all(torch.equal(a, b) for a, b in zip(want, got))
            states[0], mine[0] = tuple(want[1:]), tuple(got[1:])
            want = engines.generator(want[0], controls, n, *states[1])
            got = run.generator(got[0], controls, n, *mine[1])
            assert all(torch.equal(a, b) for a, b in zip(want, got))
            states[1], mine[1] = tuple(want[1:]), tuple(got[1:])


def test_frame_engine_checks_its_inputs(engines, rig, controls):
    frames = rt.create_backend("torch").frame_engine(engines, rig.inputs())
    noise = torch.rand(1, frames.n_noise)
    with pytest.raises(ValueError, match=r"expected samples \(400,\) float32"):
        frames.step(np.zeros(399, np.float32), controls, noise)
    with pytest.raises(ValueError, match="expected samples"):
        frames.step(np.zeros(400, np.float64), controls, noise)
    with pytest.raises(ValueError, match="expected noise"):
        frames.step(np.zeros(400, np.float32), controls, noise[:, :3])
    with pytest.raises(ValueError, match="expected controls"):
        frames.step(np.zeros(400, np.float32), controls[:, :5], noise)


@pytest.fixture(scope="module")
def ort_backend(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    return rt.create_backend("onnxruntime", cache_dir=tmp_path_factory.mktemp("onnx"))


def test_onnxruntime_engines_in_the_pipeline_match_torch(ort_backend, engines, rig, controls, voice):
    """Free-running over 3 s of the voice, each from its own state: motion within 1e-3, pixels
    within 2/255 mean and 8/255 max."""
    ref = Pipeline(engines, rig.inputs(), controls, seed=11)
    other = Pipeline(ort_backend.engines(engines), rig.inputs(), controls, seed=11)
    motion, mean, mx = _free_run(ref, other, voice)
    assert motion <= 1e-3, motion
    assert mean <= 2.0 and mx <= 8.0, (mean, mx)


def test_onnxruntime_frame_engine_matches_torch(ort_backend, engines, rig, controls, voice):
    frames = ort_backend.frame_engine(engines, rig.inputs(), timing=True)
    ref = Pipeline(engines, rig.inputs(), controls, seed=13)
    motion, mean, mx = _free_run(ref, frames, voice, frame_engine=True, seed=13)
    assert motion <= 1e-3, motion
    assert mean <= 2.0 and mx <= 8.0, (mean, mx)
    assert set(frames.stage_ms) == {"audio", "motion", "face"} and all(v > 0 for v in frames.stage_ms.values())


def test_onnxruntime_without_a_gpu_provider_says_so():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(AvatarError, match="no CUDA or TensorRT execution provider"):
        rt.create_backend("onnxruntime", device="cuda")
    with pytest.raises(AvatarError, match="lacks the execution provider"):
        rt.create_backend("onnxruntime", providers=["TensorrtExecutionProvider"])


class _OffDevice(TorchDispatchMode):
    """Records every op that reads a tensor off the `meta` device, with the engine line calling it."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in flat):
            where = [f for f in traceback.extract_stack() if f"{os.sep}engines{os.sep}" in f.filename]
            line = f"{Path(where[-1].filename).name}:{where[-1].lineno} {where[-1].line}" if where else "?"
            self.found.setdefault(line, str(func))
        return func(*args, **kwargs)


def test_engines_create_no_tensors_off_their_device(engines, rig, controls):
    """Every engine runs with all inputs and buffers on the `meta` device and never touches a tensor
    elsewhere: a tensor made without device= would land on the CPU and break CUDA, and a CPU
    constant mixed into CUDA ops is a host-to-device copy that a CUDA graph cannot capture. Both
    fail here, on a machine without a GPU."""
    meta = torch.device("meta")
    calls = {
        "audio": (torch.zeros(1, SAMPLES_PER_FRAME), *engines.encoder.initial_state(1)),
        "motion": (torch.zeros(1, 7), controls, torch.zeros(1, engines.generator.N_NOISE),
                   *engines.generator.initial_state(1)),
        "face": (torch.zeros(1, 24), *rig.inputs()),
    }
    failures = {}
    for name, module in zip(ex.ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)):
        on_meta = copy.deepcopy(module).to(meta)
        inputs = tuple(t.to(meta) for t in calls[name])
        try:
            with torch.no_grad():
                on_meta(*inputs)  # the first call may make per-device constants (as warm-up does on a GPU)
                with _OffDevice() as mode:
                    out = on_meta(*inputs)
            out = (out,) if isinstance(out, torch.Tensor) else out
            assert all(o.device == meta for o in out), "an output is off the device"
            assert not mode.found, f"reads tensors off the device: {mode.found}"
        except (RuntimeError, AssertionError) as e:
            where = [f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in traceback.extract_tb(e.__traceback__)
                     if f"{os.sep}engines{os.sep}" in f.filename]
            failures[name] = f"{str(e).splitlines()[0]} at {where[-1] if where else '?'}"
    assert not failures, failures


# ---- TensorRT, against a fake tensorrt module -------------------------------------------------------

GPU = {"gpu": "NVIDIA Fake 80GB", "compute_capability": "9.0", "cuda": "13.0"}


class _Enum:
    def __init__(self, name, value=0):
        self.name = name
        self.value = value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"tensorrt.{self.name}"


class FakeTensorRT(types.ModuleType):
    """A stand-in for the `tensorrt` module, enough for build_engines.py and engines/runtime.py.

    The builder "parses" an ONNX file and its "plan" is that file's bytes behind a header; the
    runtime "deserializes" a plan into an engine that runs the ONNX graph with onnxruntime on the
    buffers bound by address (CPU or CUDA), so parity tests exercise the real binding logic.
    Every call is recorded in `calls`.
    """

    PLAN_MAGIC = b"FAKEPLAN1\n"

    def __init__(self, version="10.9.0", *, fp16_flag=None):
        super().__init__("tensorrt")
        self.__version__ = version
        major = int(version.split(".")[0])
        fp16_flag = (major < 11) if fp16_flag is None else fp16_flag
        self.calls: list[tuple] = []
        fake = self

        class DataType:
            FLOAT, HALF, INT8, INT32, BOOL, UINT8, INT64, BF16 = (_Enum(n) for n in (
                "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "INT64", "BF16"))
        self.DataType = DataType
        self.TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT"), OUTPUT=_Enum("OUTPUT"))
        flags = {"TF32": _Enum("TF32")}
        if fp16_flag:
            flags["FP16"] = _Enum("FP16")
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=_Enum("STRONGLY_TYPED", 5))
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=_Enum("WORKSPACE"))

        class Logger:
            WARNING = 2

            def __init__(self, severity=2):
                fake.calls.append(("Logger", severity))
        self.Logger = Logger

        class IProgressMonitor:
            def __init__(self):
                pass
        self.IProgressMonitor = IProgressMonitor

        class TimingCache:
            def __init__(self, data=b""):
                self.data = data

            def serialize(self):
                return b"TIMING" + bytes(self.data[-8:])

        class Config:
            def __init__(self):
                self.flags, self.cache, self.progress_monitor = [], None, None

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag.name))
                self.flags.append(flag.name)

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag.name))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool.name, size))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", len(data)))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.onnx = None

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", tuple(config.flags), network.flags))
                if fake.fail_build:
                    return None
                header = json.dumps({"flags": config.flags}).encode() + b"\n"
                return memoryview(fake.PLAN_MAGIC + header + network.onnx)
        self.Builder = Builder
        self.fail_build = False
        self.corrupt = False

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse(self, data):
                fake.calls.append(("parse", len(data)))
                import onnx

                try:
                    onnx.checker.check_model(onnx.load_from_string(bytes(data)))
                except Exception as e:  # noqa: BLE001 - the parser reports, it does not raise
                    self.num_errors, self.error = 1, str(e)
                    return False
                self.network.onnx = bytes(data)
                return True

            def get_error(self, i):
                return self.error
        self.OnnxParser = OnnxParser

        class Runtime:
            def __init__(self, logger):
                fake.calls.append(("Runtime",))

            def deserialize_cuda_engine(self, plan):
                fake.calls.append(("deserialize_cuda_engine", len(plan)))
                plan = bytes(plan)
                if not plan.startswith(fake.PLAN_MAGIC):
                    return None
                header, onnx_bytes = plan[len(fake.PLAN_MAGIC):].split(b"\n", 1)
                return FakeEngine(fake, onnx_bytes, json.loads(header)["flags"])
        self.Runtime = Runtime


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8,
       "BOOL": np.bool_, "INT8": np.int8}
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
          "UINT8": torch.uint8, "BOOL": torch.bool, "INT8": torch.int8}


class FakeEngine:
    def __init__(self, trt, onnx_bytes, flags):
        import onnx
        import onnxruntime as ort

        self.trt = trt
        model = onnx.load_from_string(onnx_bytes)
        onnx_types = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 2: "UINT8", 9: "BOOL", 3: "INT8"}
        self.io = []
        for value, mode in [(v, trt.TensorIOMode.INPUT) for v in model.graph.input] + \
                [(v, trt.TensorIOMode.OUTPUT) for v in model.graph.output]:
            t = value.type.tensor_type
            self.io.append((value.name, mode, tuple(d.dim_value for d in t.shape.dim), onnx_types[t.elem_type]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.flags = flags

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(x for x in self.io if x[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_shape(self, name):
        return self._find(name)[2]

    def get_tensor_dtype(self, name):
        return getattr(self.trt.DataType, self._find(name)[3])

    def create_execution_context(self):
        self.trt.calls.append(("create_execution_context",))
        return FakeContext(self)


class FakeContext:
    """Runs the graph on whatever memory is bound: views made from the raw addresses."""

    def __init__(self, engine):
        self.engine = engine
        self.addresses: dict[str, int] = {}

    def set_tensor_address(self, name, address):
        self.engine.trt.calls.append(("set_tensor_address", name))
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream_handle):
        self.engine.trt.calls.append(("execute_async_v3", stream_handle))
        views = {name: _view(self.addresses[name], shape, dtype, stream_handle)
                 for name, _, shape, dtype in self.engine.io}
        inputs = [n for n, mode, _, _ in self.engine.io if mode is self.engine.trt.TensorIOMode.INPUT]
        outputs = [n for n, mode, _, _ in self.engine.io if mode is self.engine.trt.TensorIOMode.OUTPUT]
        cuda = stream_handle != 0 and torch.cuda.is_available()
        if cuda:
            torch.cuda.ExternalStream(stream_handle).synchronize()
        feed = {n: views[n].cpu().numpy() for n in inputs}
        results = self.engine.session.run(outputs, feed)
        if self.engine.trt.corrupt:  # a plan whose numbers are wrong, for the verification tests
            results = [r + 1 if r.dtype.kind == "f" else r for r in results]
        for n, value in zip(outputs, results):
            views[n].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        if cuda:
            torch.cuda.synchronize()
        return True


def _view(address: int, shape, dtype: str, stream_handle: int) -> torch.Tensor:
    """A tensor over existing memory at `address` (no copy): CPU via numpy's array interface, CUDA
    via __cuda_array_interface__."""
    np_dtype = np.dtype(_NP[dtype])
    if stream_handle != 0 and torch.cuda.is_available():
        holder = types.SimpleNamespace(__cuda_array_interface__={
            "shape": tuple(shape), "typestr": np_dtype.str, "data": (address, False), "version": 2, "strides": None})
        return torch.as_tensor(holder, device="cuda")
    holder = types.SimpleNamespace(__array_interface__={
        "shape": tuple(shape), "typestr": np_dtype.str, "data": (address, False), "version": 3})
    return torch.from_numpy(np.asarray(holder))


class _CpuStream:
    """What TensorRTEngine.enqueue needs of a stream, for CPU buffers under the fake."""

    cuda_stream = 0


@pytest.fixture()
def fake_trt(monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_manifest_mismatches_are_one_clear_rebuild_message(tmp_path):
    manifest = {"format": rt.MANIFEST_FORMAT, "tensorrt": "10.9.0", **GPU,
                "engines": {"face": {"onnx_hash": "abc", "plan": "face.plan"}}}
    rt.check_manifest(manifest, identity=GPU, version="10.9.0", hashes={"face": "abc"})  # all fine

    cases = [
        ({**GPU, "gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}, "10.9.0", {},
         "built for NVIDIA Fake 80GB .compute 9.0., TensorRT 10.9.0, this machine has NVIDIA GeForce RTX 4090"),
        (GPU, "11.0.0", {}, "built with TensorRT 10.9.0, this is TensorRT 11.0.0"),
        (GPU, "10.9.0", {"face": "def"}, "built from other engine code or weights"),
        (GPU, "10.9.0", {"audio": "abc"}, "no TensorRT engine for the audio engine"),
    ]
    for identity, version, hashes, message in cases:
        with pytest.raises(AvatarError, match=message) as info:
            rt.check_manifest(manifest, identity=identity, version=version, hashes=hashes)
        text = str(info.value)
        assert "python build_engines.py" in text and "\n" not in text

    with pytest.raises(AvatarError, match="no TensorRT engines in .*python build_engines.py"):
        rt.read_manifest(tmp_path)
    (tmp_path / rt.MANIFEST).write_text("{not json")
    with pytest.raises(AvatarError, match="unreadable.*build_engines.py"):
        rt.read_manifest(tmp_path)
    (tmp_path / rt.MANIFEST).write_text(json.dumps({"format": 0}))
    with pytest.raises(AvatarError, match="format 0"):
        rt.read_manifest(tmp_path)


def test_tensorrt_missing_is_an_avatar_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(AvatarError, match="TensorRT is not installed"):
        rt.create_backend("tensorrt")


def test_tensorrt_backend_without_cuda_is_an_avatar_error(fake_trt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AvatarError, match="needs an NVIDIA GPU"):
        rt.create_backend("tensorrt")


def _fake_plan(trt, path: Path) -> bytes:
    return trt.PLAN_MAGIC + b'{"flags": []}\n' + path.read_bytes()


def test_tensorrt_engine_binds_every_tensor_by_name(fake_trt, engines, tmp_path):
    exported = ex.export_engine("motion", engines.generator, cache_dir=tmp_path)
    engine = rt.TensorRTEngine(fake_trt, _fake_plan(fake_trt, exported.path), name="motion",
                               device=torch.device("cpu"), contexts=2)
    engine.check_io(exported.io)
    assert engine.inputs == list(exported.io.inputs) and engine.outputs == list(exported.io.outputs)
    bound = [c[1] for c in fake_trt.calls if c[0] == "set_tensor_address"]
    assert sorted(bound) == sorted(list(exported.io.inputs + exported.io.outputs) * 2)  # both contexts
    for k in range(2):
        for name, buf in engine.buffers[k].items():
            assert engine.contexts[k].addresses[name] == buf.data_ptr()
            assert tuple(buf.shape) == engine.specs[name][0]
    assert engine.specs["motion"] == ((1, 24), torch.float32)

    with pytest.raises(ValueError, match="needs a contiguous"):
        engine.bind("motion", torch.zeros(1, 23))
    with pytest.raises(AvatarError, match="I/O"):
        engine.check_io(ex.EngineIO(("features",), ("motion",)))

    inputs = ex.example_inputs("motion", engines.generator)
    inputs = (torch.rand(1, 7), *inputs[1:])
    got = engine(*inputs)
    with torch.no_grad():
        expected = engines.generator(*inputs)
    assert float((got[0] - expected[0]).abs().max()) <= 1e-5
    assert ("execute_async_v3", 0) in fake_trt.calls


def test_tensorrt_engine_refuses_bad_plans(fake_trt):
    with pytest.raises(AvatarError, match="could not load the face engine.*build_engines.py"):
        rt.TensorRTEngine(fake_trt, b"garbage", name="face", device=torch.device("cpu"))


def test_tensorrt_type_table(fake_trt):
    assert rt._torch_dtype(fake_trt, fake_trt.DataType.UINT8) == torch.uint8
    assert rt._torch_dtype(fake_trt, fake_trt.DataType.INT64) == torch.int64
    assert rt._torch_dtype(fake_trt, fake_trt.DataType.HALF) == torch.float16
    with pytest.raises(AvatarError, match="does not handle"):
        rt._torch_dtype(fake_trt, _Enum("FP4"))


# ---- build_engines.py with the fake --------------------------------------------------------------

def _load_build_engines():
    """build_engines.py is a script at the repository root, not part of the installed packages."""
    import importlib.util

    if "build_engines" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_engines", Path(ex.REPO_ROOT) / "build_engines.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_engines"] = module
        spec.loader.exec_module(module)
    return sys.modules["build_engines"]


build_engines = _load_build_engines()


@pytest.fixture(autouse=True)
def _short_verification(monkeypatch):
    monkeypatch.setattr(build_engines, "VERIFY_SECONDS", 1.5)  # 60 ticks, 6 decoder frames: enough here


def _build(fake, engines, out, **kw):
    kw.setdefault("names", list(ex.ENGINE_NAMES))
    kw.setdefault("precision", "fp16")
    return build_engines.build(engines, out_dir=out, trt=fake, device=torch.device("cpu"), identity=dict(GPU),
                               cache_dir=out / "onnx", write=lambda *a: None, **kw)


def test_build_engines_without_gpu_is_one_line_and_nonzero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_engines.main(["--precision", "fp32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no NVIDIA GPU") and "\n" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert build_engines.main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT is not installed") and "\n" not in err


def test_build_engines_rejects_unknown_engine_names(capsys):
    with pytest.raises(SystemExit):
        build_engines.parse_args(["--engines", "audio,lips"])
    assert build_engines.parse_args(["--engines", "face"]).names == ["face"]


def test_build_with_tensorrt_10_then_run_the_plans(fake_trt, engines, rig, controls, voice, tmp_path, monkeypatch):
    out = tmp_path / "plans"
    manifest = _build(fake_trt, engines, out)
    # TensorRT 10: FP16 is the builder flag on the FP32 graph; no strong typing
    builds = [c for c in fake_trt.calls if c[0] == "build_serialized_network"]
    assert len(builds) == 3 and all(flags == ("FP16",) and net_flags == 0 for _, flags, net_flags in builds)
    assert ("set_memory_pool_limit", "WORKSPACE", build_engines.WORKSPACE_BYTES) in fake_trt.calls
    assert (out / "timing.cache").is_file() and ("set_timing_cache", False) in fake_trt.calls

    written = json.loads((out / rt.MANIFEST).read_text())
    assert written == manifest
    assert {k: written[k] for k in GPU} == GPU and written["tensorrt"] == "10.9.0" and written["precision"] == "fp16"
    assert written["format"] == rt.MANIFEST_FORMAT and written["built"].startswith("20")
    modules = dict(zip(ex.ENGINE_NAMES, (engines.encoder, engines.generator, engines.decoder)))
    for name, entry in written["engines"].items():
        assert entry["onnx_hash"] == ex.engine_hash(modules[name])
        assert (out / entry["plan"]).is_file() and entry["precision"] == "fp16"
        assert all(r["ok"] for r in entry["parity"].values())

    # a second build reuses the timing cache it wrote
    fake_trt.calls.clear()
    _build(fake_trt, engines, out, names=["motion"], precision="fp32")
    assert any(c[0] == "create_timing_cache" and c[1] > 0 for c in fake_trt.calls)
    assert ("clear_flag", "TF32") in fake_trt.calls  # fp32 means fp32
    kept = json.loads((out / rt.MANIFEST).read_text())
    assert set(kept["engines"]) == set(ex.ENGINE_NAMES) and kept["engines"]["motion"]["precision"] == "fp32"

    # the runtime: manifest checked, plans loaded, engines bound; the lead's Pipeline runs them unchanged
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": dict(GPU))
    _, plans = rt.load_plans(out, engines, device=torch.device("cpu"), trt=fake_trt)
    trt_engines = rt.tensorrt_engines(fake_trt, plans, engines, device=torch.device("cpu"))
    ref = Pipeline(engines, rig.inputs(), controls, seed=21)
    other = Pipeline(trt_engines, rig.inputs(), controls, seed=21)
    motion, mean, mx = _free_run(ref, other, voice[: 3 * RENDER_EVERY * SAMPLES_PER_FRAME])
    assert motion <= 1e-3 and mean <= 2.0 and mx <= 8.0, (motion, mean, mx)


def test_build_with_tensorrt_11_uses_strongly_typed_fp16_graphs(engines, tmp_path, monkeypatch):
    fake = FakeTensorRT("11.1.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert not build_engines.has_fp16_flag(fake)
    manifest = _build(fake, engines, tmp_path, names=["audio"])
    builds = [c for c in fake.calls if c[0] == "build_serialized_network"]
    # strongly typed every time, never an FP16 flag
    assert builds and all(flags == () and net_flags == 1 << 5 for _, flags, net_flags in builds)
    # the FP16 graph is a float16 export behind the float32 I/O contract
    fp16_graphs = list((tmp_path / "onnx").glob("audio-*-fp16.onnx"))
    assert len(fp16_graphs) == 1
    import onnx

    graph = onnx.load(str(fp16_graphs[0]))
    constants = list(graph.graph.initializer) + [a.t for n in graph.graph.node if n.op_type == "Constant"
                                                 for a in n.attribute if a.name == "value"]
    assert sum(c.data_type == onnx.TensorProto.FLOAT16 for c in constants) >= 3
    assert not any(c.data_type == onnx.TensorProto.FLOAT and len(c.dims) and c.dims[0] > 16 for c in constants)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in graph.graph.input)
    entry = manifest["engines"]["audio"]
    # whichever precision held the tolerance is the one recorded, and it was verified
    assert entry["precision"] in ("fp16", "fp32") and all(r["ok"] for r in entry["parity"].values())
    assert len(builds) == (2 if entry["precision"] == "fp32" else 1)


def test_an_engine_without_an_fp16_graph_builds_fp32(engines, tmp_path, monkeypatch):
    fake = FakeTensorRT("11.1.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    def no_half(self, *inputs):
        raise RuntimeError("expected dtype Half")
    monkeypatch.setattr(ex.HalfPrecision, "forward", no_half)
    lines = []
    manifest = build_engines.build(engines, names=["motion"], precision="fp16", out_dir=tmp_path, trt=fake,
                                   device=torch.device("cpu"), identity=dict(GPU), cache_dir=tmp_path / "onnx",
                                   write=lines.append)
    assert manifest["engines"]["motion"]["precision"] == "fp32"
    assert len([c for c in fake.calls if c[0] == "build_serialized_network"]) == 1
    assert any("no FP16 graph" in line and "building FP32" in line for line in lines), lines


def test_a_plan_that_does_not_match_torch_is_not_kept(fake_trt, engines, tmp_path):
    fake_trt.corrupt = True
    with pytest.raises(build_engines.BuildError, match="does not match torch in any precision"):
        _build(fake_trt, engines, tmp_path, names=["audio"])
    assert not list(tmp_path.glob("*.plan")) and not (tmp_path / rt.MANIFEST).exists()
    assert len([c for c in fake_trt.calls if c[0] == "build_serialized_network"]) == 2  # fp16, then fp32


def test_a_failed_build_is_an_error_not_a_crash(fake_trt, engines, tmp_path):
    fake_trt.fail_build = True
    with pytest.raises(build_engines.BuildError, match="failed to build"):
        _build(fake_trt, engines, tmp_path, names=["motion"], precision="fp32")


def test_stale_plans_are_refused_and_auto_falls_back(fake_trt, engines, tmp_path, monkeypatch, caplog):
    out = tmp_path / "plans"
    _build(fake_trt, engines, out, precision="fp32")
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": dict(GPU))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(rt.create_backend("auto", engines=engines, plan_dir=out), rt.TensorRTBackend)

    changed = Engines(encoder=load_audio_encoder("dsp"), generator=engines.generator, decoder=engines.decoder)
    changed.encoder.smoothing += 0.05  # new engine constants: the audio plan is stale
    with pytest.raises(AvatarError, match="audio engine was built from other engine code.*python build_engines.py"):
        rt.load_plans(out, changed, device=torch.device("cpu"), trt=fake_trt)
    backend = rt.create_backend("auto", engines=changed, plan_dir=out)
    assert backend.name == "torch" and backend.device.type == "cuda"
    assert "build_engines.py" in caplog.text

    # another GPU, another TensorRT: refused by the explicit back-end with the rebuild message
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": {**GPU, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(AvatarError, match="built for NVIDIA Fake 80GB.*NVIDIA L4.*python build_engines.py"):
        rt.create_backend("tensorrt", plan_dir=out)
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": dict(GPU))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.12.0"))
    with pytest.raises(AvatarError, match="TensorRT 10.9.0, this is TensorRT 10.12.0.*python build_engines.py"):
        rt.create_backend("tensorrt", plan_dir=out)
    # a plan file that is gone
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    next(out.glob("face-*.plan")).unlink()
    with pytest.raises(AvatarError, match="missing.*python build_engines.py"):
        rt.load_plans(out, engines, device=torch.device("cpu"), trt=fake_trt)


# ---- the CUDA frame engines' logic on a CPU emulation of torch.cuda -----------------------------

class EmulatedCuda:
    """The few torch.cuda calls the CUDA frame engines make, done synchronously on the CPU, so
    their bookkeeping (static buffers, state copies, ping-pong, ring of pending frames, events,
    NVTX ranges) runs in CI. CUDA itself, graphs included, is tests/test_gpu.py's."""

    class Stream:
        cuda_stream = 0

        def __init__(self, device=None):
            pass

        def synchronize(self):
            pass

        def wait_stream(self, other):
            pass

    class Event:
        def __init__(self, enable_timing=False):
            self.recorded = 0

        def record(self, stream=None):
            self.recorded += 1

        def synchronize(self):
            pass  # like CUDA: an event never recorded is complete

        def elapsed_time(self, other):
            return 1.0

    def __init__(self):
        self.ranges: list[str] = []
        self.nvtx = types.SimpleNamespace(range_push=self.ranges.append, range_pop=lambda: None)

    def stream(self, s):
        import contextlib

        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return self.Stream()

    def synchronize(self, device=None):
        pass

    def get_device_name(self, device=None):
        return "Emulated GPU"


class _Replay:
    def __init__(self, fn):
        self.replay = fn


def _emulated_compare(frames, engines, rig, controls, voice, ticks=60):
    ref = rt.create_backend("torch").frame_engine(engines, rig.inputs())
    noise = torch.Generator().manual_seed(4)
    worst_motion, worst_pixel = 0.0, 0.0
    for t, tick in enumerate(voice.reshape(-1, SAMPLES_PER_FRAME)[:ticks].numpy()):
        n = torch.rand(1, ref.n_noise, generator=noise)
        render = t % RENDER_EVERY == RENDER_EVERY - 1
        expected, got = ref.step(tick, controls, n, render=render), frames.step(tick, controls, n, render=render)
        worst_motion = max(worst_motion, float((frames.last_motion - ref.last_motion).abs().max()))
        if render:
            worst_pixel = max(worst_pixel, _pixel_errors(expected, got)[1])
    # five frames in flight through a ring of two: each intact, in order
    frames.reset()
    ref.reset()
    ticks5 = voice.reshape(-1, SAMPLES_PER_FRAME)[:5].numpy()
    pending = [frames.submit(t, controls, torch.zeros(1, ref.n_noise)) for t in ticks5]
    for p, t in zip(pending, ticks5):
        worst_pixel = max(worst_pixel, _pixel_errors(p.result(), ref.step(t, controls, torch.zeros(1, ref.n_noise)))[1])
    # an explicit motion vector
    still = torch.zeros(1, 24)
    worst_pixel = max(worst_pixel, _pixel_errors(frames.render(still), ref.render(still))[1])
    return worst_motion, worst_pixel


@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_frame_engine_logic_on_an_emulated_device(graphs, engines, rig, controls, voice, monkeypatch):
    if graphs:  # a "graph" that replays the stage: the capture itself needs a GPU
        monkeypatch.setattr(rt.TorchCudaFrameEngine, "_capture", lambda self: self.graphs.update(
            audio=_Replay(self._eager_audio), motion=_Replay(self._eager_motion), face=_Replay(self._eager_face)))
    cuda = EmulatedCuda()
    frames = rt.TorchCudaFrameEngine(engines, rig.inputs(), device="cpu", cuda_graph=graphs, timing=True, cuda=cuda)
    assert frames.cuda_graph == graphs and frames.device_name == "Emulated GPU"
    motion, pixel = _emulated_compare(frames, engines, rig, controls, voice)
    assert motion == 0.0 and pixel == 0.0  # the same torch arithmetic on the same CPU
    assert cuda.ranges[:5] == ["frame", "audio_encoder", "motion_generator", "frame", "audio_encoder"]
    assert "face_decoder" in cuda.ranges and "frame_to_host" in cuda.ranges
    assert frames.stage_ms == {"audio": 1.0, "motion": 1.0, "face": 1.0}


def test_tensorrt_frame_engine_logic_on_an_emulated_device(fake_trt, engines, rig, controls, voice, tmp_path,
                                                          monkeypatch):
    """Plans from the fake builder, run by the TensorRT FrameEngine: features and motion shared
    between engines by address, state ping-ponged between two contexts, rig bound once."""
    _build(fake_trt, engines, tmp_path, precision="fp32")
    monkeypatch.setattr(rt, "gpu_identity", lambda device="cuda": dict(GPU))
    _, plans = rt.load_plans(tmp_path, engines, device=torch.device("cpu"), trt=fake_trt)
    frames = rt.TensorRTFrameEngine(engines, rig.inputs(), plans=plans, device="cpu", trt=fake_trt,
                                    cuda=EmulatedCuda())
    audio, motion = frames.trt_engines["audio"], frames.trt_engines["motion"]
    for k in range(2):
        assert motion.contexts[k].addresses["features"] == audio.contexts[k].addresses["features"]
        assert motion.contexts[k].addresses["motion"] == frames.motion_dev.data_ptr()
        assert audio.contexts[k].addresses["samples"] == frames.samples_dev.data_ptr()
        assert audio.contexts[k].addresses["state_in_0"] == audio.contexts[1 - k].addresses["state_out_0"]
    assert frames.trt_engines["face"].contexts[0].addresses["frame"] == frames.frame_dev.data_ptr()
    motion_err, pixel = _emulated_compare(frames, engines, rig, controls, voice)
    assert motion_err <= 1e-3 and pixel <= 8.0, (motion_err, pixel)
    with pytest.raises(ValueError, match="rig tensor"):
        frames.set_rig(tuple(t[..., :1] if t.ndim else t for t in rig.inputs()))


# ---- avatar.bench --------------------------------------------------------------------------------

def test_bench_engines_writes_per_stage_json(rig, tmp_path, capsys):
    from avatar import bench

    results = bench.bench_engines("torch", frames=6, warmup=1, out=tmp_path, audio_model="dsp")
    path = tmp_path / "engines-torch-cpu.json"
    assert results["path"] == str(path)
    saved = json.loads(path.read_text())
    assert saved["backend"] == "torch" and saved["device"] == "cpu" and saved["frames"] == 6
    for stats in [saved["frame_ms"], *saved["stages_ms"].values()]:
        assert 0 < stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"]
    stages = sum(saved["stages_ms"][s]["mean"] for s in ("audio", "motion", "face"))
    assert stages <= saved["frame_ms"]["mean"] * 1.05  # the stages are inside the frame's time
    assert abs(saved["fps"] - 1000 / saved["frame_ms"]["mean"]) <= 0.006  # rounded to 2 decimals
    assert "torch" in saved["versions"] and len(saved["load_average"]) == 2

    assert bench.main(["engines", "--backend", "onnxruntime", "--frames", "3", "--warmup", "1",
                       "--audio-model", "dsp", "--out", str(tmp_path), "--label", "ort-test"]) == 0
    assert (tmp_path / "engines-ort-test-cpu.json").is_file()
    assert "ort-test on" in capsys.readouterr().out
    assert bench.main(["engines", "--backend", "nope", "--frames", "1", "--audio-model", "dsp",
                       "--out", str(tmp_path)]) == 1


def test_cli_bench_engines_takes_threads_and_label(rig, tmp_path, capsys):
    """`vasa-avatar bench engines --threads N` is how the README's CPU rows are measured."""
    from avatar import cli

    before = torch.get_num_threads()
    try:
        assert cli.main(["bench", "engines", "--backend", "torch", "--threads", "1", "--frames", "2",
                         "--audio-model", "dsp", "--label", "cli-1t", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    saved = json.loads((tmp_path / "engines-cli-1t-cpu.json").read_text())
    assert saved["torch_threads"] == 1 and saved["label"] == "cli-1t" and saved["frames"] == 2


def test_decoder_pastes_the_same_pixels_eager_and_traced(rig):
    """Eager on the CPU the decoder pastes its windows by slicing at the (host) offsets, and renders
    the mouth and eyes on a worker thread; traced (what ONNX and TensorRT get) it uses the index
    maps in one thread. Both must give exactly the same frame."""
    from avatar.motion import CHANNELS

    decoder = FaceDecoder().eval().parallel(1)
    rng = np.random.default_rng(7)
    low = np.array([c.low for c in CHANNELS], np.float32)
    high = np.array([c.high for c in CHANNELS], np.float32)
    motions = [torch.from_numpy(low + (high - low) * rng.random(len(CHANNELS), dtype=np.float32))[None]
               for _ in range(4)]
    with torch.no_grad():
        traced = torch.jit.trace(FaceDecoder().eval(), (motions[0], *rig.inputs()), check_trace=False)
        for motion in motions:
            assert torch.equal(decoder(motion, *rig.inputs()), traced(motion, *rig.inputs()))
