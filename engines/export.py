"""ONNX export of the three engines, and the parity checks every compiled form must pass.

Each engine exports to one ONNX graph (opset 17) with static shapes and named inputs/outputs:

    audio   samples, state_in_0..           -> features, state_out_0..
    motion  features, controls, noise, state_in_0..  -> motion, state_out_0..
    face    motion, <RIG_INPUT_NAMES>       -> frame

Files go to the engine cache (`engine_cache_dir()`), named `<engine>-<class>-<hash>.onnx`, where the
hash covers the engine's source files and every tensor it holds (weights and constant buffers):
a changed engine exports anew, and a TensorRT plan built from an older graph is detected as stale.

The reference inputs used to check an export (and every back-end) come from the real path: the
bundled voice through the encoder, the generator on those features, the decoder on that motion
with the astronaut's rig. Each engine is checked on these inputs *teacher-forced*: every call gets
the state the torch reference had at that frame, so one engine's error cannot hide in another's.

Nothing here imports analysis libraries (mediapipe): on a machine without them, the reference rig
is the one saved under benchmarks/data/ (`reference_rig`).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import lzma
import os
import sys
import tempfile
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from avatar.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

OPSET = 17
ENGINE_NAMES = ("audio", "motion", "face")  # the keys used everywhere: CLI flags, manifest, bench
PRECISIONS = ("fp32", "fp16")

REPO_ROOT = Path(__file__).resolve().parent.parent
VOICE = REPO_ROOT / "avatar" / "assets" / "voice.wav"
PORTRAIT = REPO_ROOT / "avatar" / "assets" / "astronaut.png"
# the astronaut's rig and analysed portrait, saved on a machine with mediapipe, for machines
# without it (the GPU machine): the rig when it still fits the decoder, else rebuilt from the
# portrait (numpy and OpenCV only) after a decoder change
SAVED_RIG = REPO_ROOT / "benchmarks" / "data" / "astronaut.rig.pt.xz"
SAVED_PORTRAIT = REPO_ROOT / "benchmarks" / "data" / "astronaut.portrait.npz"


# ---- parity: one place for the tolerances every back-end is held to -------------------------------

@dataclass(frozen=True)
class Tolerance:
    """How far a back-end's output may be from torch's.

    Float outputs: |got - expected| <= atol + rtol * |expected| everywhere.
    uint8 frames: mean |difference| <= mean_u8 and max |difference| <= max_u8 (0..255 units).
    """

    atol: float = 1e-3
    rtol: float = 1e-3
    mean_u8: float = 2.0
    max_u8: float = 8.0


PARITY = Tolerance()


def output_errors(expected: Sequence[Tensor], got: Sequence[Tensor], names: Sequence[str]) -> dict[str, dict]:
    """Per output: its error numbers and whether they are within PARITY."""
    report = {}
    for name, e, g in zip(names, expected, got):
        e = e.detach().cpu()
        g = g.detach().cpu()
        if tuple(e.shape) != tuple(g.shape):
            report[name] = {"ok": False, "why": f"shape {tuple(g.shape)}, expected {tuple(e.shape)}"}
        elif e.dtype == torch.uint8:
            d = (g.to(torch.int16) - e.to(torch.int16)).abs().float()
            mean, worst = float(d.mean()), float(d.max())
            report[name] = {"mean_u8": mean, "max_u8": worst,
                            "ok": mean <= PARITY.mean_u8 and worst <= PARITY.max_u8}
        else:
            e64, g64 = e.double(), g.double()
            d = (g64 - e64).abs()
            excess = d - (PARITY.atol + PARITY.rtol * e64.abs())
            report[name] = {"max_abs": float(d.max()) if d.numel() else 0.0,
                            "ok": bool(torch.isfinite(g64).all()) and bool((excess <= 0).all())}
    return report


def merge_errors(reports: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Worst case over several calls' output_errors."""
    merged: dict[str, dict] = {}
    for report in reports:
        for name, r in report.items():
            m = merged.setdefault(name, {"ok": True})
            m["ok"] = m["ok"] and r["ok"]
            for key, value in r.items():
                if key == "why":
                    m.setdefault("why", value)
                elif key != "ok":
                    m[key] = max(m.get(key, 0.0), value)
    return merged


def describe_errors(report: dict[str, dict]) -> str:
    """One line: 'motion max_abs=3.1e-07; state_out_0 max_abs=0' with failures marked."""
    parts = []
    for name, r in report.items():
        numbers = " ".join(f"{k}={v:.3g}" for k, v in r.items() if k not in ("ok", "why"))
        parts.append(f"{name} {numbers or r.get('why', '')}{'' if r['ok'] else ' (OUT OF TOLERANCE)'}")
    return "; ".join(parts)


# ---- names and hashes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineIO:
    """An engine's graph interface: input and output names in call order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def engine_io(name: str, module: nn.Module) -> EngineIO:
    """The ONNX names of one engine's inputs and outputs (state tensors numbered in call order)."""
    if name == "face":
        from engines.face_decoder import RIG_INPUT_NAMES

        return EngineIO(("motion", *RIG_INPUT_NAMES), ("frame",))
    n_state = len(module.initial_state(1))
    state_in = tuple(f"state_in_{i}" for i in range(n_state))
    state_out = tuple(f"state_out_{i}" for i in range(n_state))
    if name == "audio":
        return EngineIO(("samples", *state_in), ("features", *state_out))
    if name == "motion":
        return EngineIO(("features", "controls", "noise", *state_in), ("motion", *state_out))
    raise ValueError(f"unknown engine {name!r}; expected one of {ENGINE_NAMES}")


def _project_sources(module: nn.Module) -> dict[str, Path]:
    """The project source files an engine's behaviour comes from: the files defining its class and
    its submodules' classes, and every project module those import (transitively; constants such
    as the motion channel table change the graph too)."""
    import ast
    import importlib.util

    def project_file(module_name: str) -> tuple[str, Path] | None:
        if module_name.split(".")[0] not in ("avatar", "engines"):
            return None
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        return spec.name, Path(spec.origin)

    todo = [f for f in (project_file(type(sub).__module__) for sub in module.modules()) if f]
    files: dict[str, Path] = {}
    while todo:
        name, path = todo.pop()
        if name in files:
            continue
        files[name] = path
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo.extend(f for f in map(project_file, names) if f and f[0] not in files)
    return dict(sorted(files.items()))


def engine_hash(module: nn.Module) -> str:
    """16 hex digits over the engine's class, its project source files and every tensor it holds."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|opset={OPSET}".encode())
    for name, path in _project_sources(module).items():
        h.update(name.encode())
        h.update(path.read_bytes())
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))  # non-persistent buffers too: they are constants
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def engine_cache_dir() -> Path:
    """$VASA_AVATAR_CACHE/engines if set, else the user cache dir's vasa-avatar/engines."""
    from avatar.settings import cache_dir

    return cache_dir("engines")


# ---- precision ----------------------------------------------------------------------------------

class HalfPrecision(nn.Module):
    """An engine computed in float16 behind a float32 interface: float inputs are cast down on the
    way in, float outputs up on the way out, integer tensors pass unchanged.

    This is what a strongly typed TensorRT network needs for FP16 (TensorRT 11 has no FP16 builder
    flag): the precision lives in the graph. The I/O contract stays the engine's.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(module).half()
        for attr in ("lookahead_frames", "N_NOISE"):
            if hasattr(module, attr):
                setattr(self, attr, getattr(module, attr))
        self._initial_state = getattr(module, "initial_state", None)

    def initial_state(self, batch: int = 1):
        return self._initial_state(batch)

    def forward(self, *inputs: Tensor):
        out = self.inner(*[x.half() if x.is_floating_point() else x for x in inputs])
        if isinstance(out, Tensor):
            return out.float() if out.is_floating_point() else out
        return tuple(o.float() if o.is_floating_point() else o for o in out)


def with_precision(module: nn.Module, precision: str) -> nn.Module:
    if precision == "fp32":
        return module
    if precision == "fp16":
        return HalfPrecision(module).eval()
    raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")


# ---- export ---------------------------------------------------------------------------------------

@dataclass
class ExportedEngine:
    """One engine's ONNX file and what it was made from."""

    name: str
    path: Path
    hash: str  # engine_hash of the torch module (the fp32 engine, whatever `precision`)
    io: EngineIO
    precision: str = "fp32"


def onnx_path(name: str, module: nn.Module, *, cache_dir: Path | None = None, precision: str = "fp32") -> Path:
    folder = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    suffix = "" if precision == "fp32" else f"-{precision}"
    return folder / f"{name}-{type(module).__name__}-{engine_hash(module)}{suffix}.onnx"


def _as_tuple(out) -> tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


def example_inputs(name: str, module: nn.Module) -> tuple[Tensor, ...]:
    """One call's inputs with the contract's shapes and dtypes (zeros, controls at their defaults,
    the initial state). They fix the exported graph's static shapes; their values do not matter."""
    if name == "audio":
        return (torch.zeros(1, SAMPLES_PER_FRAME), *module.initial_state(1))
    if name == "motion":
        from avatar.controls import Controls, controls_tensor
        from engines.motion_generator import N_FEATURES

        return (torch.zeros(1, N_FEATURES), controls_tensor(Controls()), torch.zeros(1, int(module.N_NOISE)),
                *module.initial_state(1))
    if name == "face":
        from avatar.motion import N_CHANNELS
        from engines.face_decoder import RIG_INPUTS

        return (torch.zeros(1, N_CHANNELS), *(torch.zeros(shape, dtype=dtype) for _, shape, dtype in RIG_INPUTS))
    raise ValueError(f"unknown engine {name!r}; expected one of {ENGINE_NAMES}")


def export_engine(name: str, module: nn.Module, *, cache_dir: Path | None = None, precision: str = "fp32",
                  force: bool = False) -> ExportedEngine:
    """Export one engine to ONNX (cached by hash; `force` re-exports) and check the graph.

    The file is written atomically and passes `check_graph`: onnx.checker, opset, I/O names, and a
    static, positive shape for every graph input and output.
    """
    try:
        import onnx  # noqa: F401  (the checker; also what torch.onnx needs)
    except ImportError:
        raise AvatarError("exporting engines needs the onnx package: pip install onnx") from None
    io_names = engine_io(name, module)
    path = onnx_path(name, module, cache_dir=cache_dir, precision=precision)
    if force or not path.is_file():
        graph = with_precision(module, precision)
        example = example_inputs(name, module)
        buffer = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(graph, example, buffer, opset_version=OPSET, dynamo=False,
                              input_names=list(io_names.inputs), output_names=list(io_names.outputs),
                              do_constant_folding=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _keep_unused_inputs(buffer.getvalue(), io_names, example))
    check_graph(path, io_names)
    return ExportedEngine(name=name, path=path, hash=engine_hash(module), io=io_names, precision=precision)


def _keep_unused_inputs(model_bytes: bytes, io_names: EngineIO, example: Sequence[Tensor]) -> bytes:
    """The exporter drops inputs the graph does not read (the loudness baseline ignores controls);
    put them back, in contract order, so every engine of a kind has the same interface."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    present = {i.name: i for i in model.graph.input}
    if all(n in present for n in io_names.inputs):
        return model_bytes
    ordered = []
    for name, tensor in zip(io_names.inputs, example):
        if name in present:
            ordered.append(present[name])
        else:
            elem = helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype)
            ordered.append(helper.make_tensor_value_info(name, elem, list(tensor.shape)))
    extra = [i for n, i in present.items() if n not in io_names.inputs]  # initializers listed as inputs
    del model.graph.input[:]
    model.graph.input.extend(ordered + extra)
    return model.SerializeToString()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_graph(path: Path, io_names: EngineIO) -> None:
    """onnx.checker, the opset, the I/O names in order, and static shapes (ValueError otherwise)."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise ValueError(f"{path.name}: opset {opsets}, expected {OPSET}")
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in initializers)
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != io_names.inputs or outputs != io_names.outputs:
        raise ValueError(f"{path.name}: graph I/O {inputs} -> {outputs}, expected {io_names.inputs} -> {io_names.outputs}")
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            raise ValueError(f"{path.name}: {value.name} has a dynamic shape")


# ---- reference inputs -----------------------------------------------------------------------------

def read_voice(path: Path = VOICE, *, seconds: float | None = None) -> Tensor:
    """The bundled 16 kHz mono 16-bit voice clip as float32 (N,), N a multiple of SAMPLES_PER_FRAME.
    Read with the standard library so it works where PyAV is not installed."""
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit PCM")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    samples = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    if seconds is not None:
        samples = samples[: int(seconds * SAMPLE_RATE)]
    usable = samples.shape[0] // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
    return samples[:usable].contiguous()


def reference_rig():
    """The astronaut's rig: from the rig cache / mediapipe where available; elsewhere (the GPU check
    machine) the saved rig under benchmarks/data/ while it fits the decoder, else one built from
    the saved portrait analysis (build_rig needs numpy and OpenCV, not mediapipe)."""
    import importlib.util

    from avatar.rig import load_rig

    try:
        have_mediapipe = importlib.util.find_spec("mediapipe") is not None
    except (ImportError, ValueError):
        have_mediapipe = False
    if have_mediapipe:
        return load_rig(PORTRAIT)
    problems = []
    if SAVED_RIG.is_file():
        try:
            return load_saved_rig(SAVED_RIG)
        except AvatarError as e:
            problems.append(str(e))
    if SAVED_PORTRAIT.is_file():
        from avatar.rig import build_rig

        return build_rig(load_saved_portrait(SAVED_PORTRAIT))
    raise AvatarError("no rig for the reference portrait: mediapipe is not installed and "
                      f"{SAVED_PORTRAIT.name} is missing ({'; '.join(problems) or 'no saved rig'})")


def load_saved_rig(path: Path, rig_class=None):
    """A rig written by `save_compressed_rig` (torch.save bytes, xz-compressed). AvatarError when
    it was saved for another rig format (a decoder change since)."""
    if rig_class is None:
        from avatar.rig import Rig as rig_class
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "rig.pt"
        plain.write_bytes(lzma.decompress(Path(path).read_bytes()))
        try:
            return rig_class.load(plain)
        except ValueError as e:  # saved for another rig format
            raise AvatarError(f"the saved rig {path} is stale ({e}); on a machine with mediapipe run "
                              "`python -m engines.export --save-rig` and commit it") from None


def save_portrait(portrait, path: Path) -> None:
    """The analysed portrait (avatar.portrait.Portrait) as a compressed npz of its fields."""
    import dataclasses

    fields = {f.name: getattr(portrait, f.name) for f in dataclasses.fields(portrait)}
    arrays = {k: np.asarray(v) for k, v in fields.items() if v is not None}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), buffer.getvalue())


def load_saved_portrait(path: Path):
    """A Portrait from `save_portrait`'s file; fields it lacks take their defaults, fields the
    Portrait no longer has are dropped."""
    import dataclasses

    from avatar.portrait import Portrait

    known = {f.name: f for f in dataclasses.fields(Portrait)}
    with np.load(path, allow_pickle=False) as data:
        values = {}
        for name in data.files:
            if name in known:
                v = data[name]
                values[name] = v.item() if v.ndim == 0 else v  # scalars (str, int, float) back to Python
    return Portrait(**values)


def save_compressed_rig(rig, path: Path, *, preset: int = 9) -> None:
    """Save a rig xz-compressed (the astronaut's: ~30 MB plain, ~5.5 MB at preset 9)."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "rig.pt"
        rig.save(plain)
        data = lzma.compress(plain.read_bytes(), preset=preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), data)


@dataclass
class EngineCalls:
    """Recorded calls of one engine on the reference path: inputs and torch's outputs per call."""

    name: str
    io: EngineIO
    inputs: list[tuple[Tensor, ...]] = field(default_factory=list)
    outputs: list[tuple[Tensor, ...]] = field(default_factory=list)


def record_calls(encoder: nn.Module, generator: nn.Module, decoder: nn.Module, rig_inputs: Sequence[Tensor],
                 samples: Tensor, controls: Tensor, *, seed: int = 0, render_every: int = 1,
                 ) -> dict[str, EngineCalls]:
    """Run the torch engines over `samples` (N,) tick by tick, as the Pipeline does, and record
    every engine call (inputs and outputs, CPU tensors). The decoder is recorded every
    `render_every` ticks (it dominates the cost). Noise is drawn like the Pipeline's: one
    torch.rand(1, N_NOISE) per tick from a generator seeded with `seed`."""
    calls = {name: EngineCalls(name, engine_io(name, m)) for name, m in
             (("audio", encoder), ("motion", generator), ("face", decoder))}
    noise_gen = torch.Generator().manual_seed(seed)
    enc_state = tuple(encoder.initial_state(1))
    gen_state = tuple(generator.initial_state(1))
    rig_inputs = tuple(rig_inputs)
    with torch.inference_mode():
        for t, tick in enumerate(samples.reshape(-1, SAMPLES_PER_FRAME)):
            x = tick[None].contiguous()
            out = _as_tuple(encoder(x, *enc_state))
            calls["audio"].inputs.append((x, *enc_state))
            calls["audio"].outputs.append(out)
            features, enc_state = out[0], out[1:]
            noise = torch.rand(1, int(generator.N_NOISE), generator=noise_gen)
            out = _as_tuple(generator(features, controls, noise, *gen_state))
            calls["motion"].inputs.append((features, controls, noise, *gen_state))
            calls["motion"].outputs.append(out)
            motion, gen_state = out[0], out[1:]
            if t % render_every == 0:
                calls["face"].inputs.append((motion, *rig_inputs))
                calls["face"].outputs.append(_as_tuple(decoder(motion, *rig_inputs)))
    return calls


def random_calls(name: str, module: nn.Module, *, n: int, seed: int = 0, rig_inputs: Sequence[Tensor] = (),
                 controls: Tensor | None = None) -> EngineCalls:
    """Random but valid calls of one engine (torch outputs recorded): noise-burst audio from the
    initial state, uniform features/noise for the generator, motion vectors spread over each
    channel's range for the decoder (with `rig_inputs`)."""
    g = torch.Generator().manual_seed(seed)
    calls = EngineCalls(name, engine_io(name, module))
    with torch.inference_mode():
        if name == "audio":
            state = tuple(module.initial_state(1))
            for _ in range(n):
                level = 10 ** (-3 * torch.rand(1, generator=g))  # -60..0 dBFS bursts
                x = (torch.randn(1, SAMPLES_PER_FRAME, generator=g) * 0.3 * level).clamp(-1, 1)
                out = _as_tuple(module(x, *state))
                calls.inputs.append((x, *state))
                calls.outputs.append(out)
                state = out[1:]
        elif name == "motion":
            from engines.motion_generator import ARTICULATION

            if controls is None:
                from avatar.controls import Controls, controls_tensor

                controls = controls_tensor(Controls())
            state = tuple(module.initial_state(1))
            pitch = ARTICULATION.index("pitch")
            for _ in range(n):
                features = torch.rand(1, len(ARTICULATION), generator=g)
                features[:, pitch] = features[:, pitch] * 2 - 1  # log2(f0 / 200 Hz) in -1..1
                noise = torch.rand(1, int(module.N_NOISE), generator=g)
                out = _as_tuple(module(features, controls, noise, *state))
                calls.inputs.append((features, controls, noise, *state))
                calls.outputs.append(out)
                state = out[1:]
        elif name == "face":
            from avatar.motion import CHANNELS

            low = torch.tensor([c.low for c in CHANNELS])
            high = torch.tensor([c.high for c in CHANNELS])
            for _ in range(n):
                # half the range: the renderer's comfortable span, where parity is meaningful
                u = torch.rand(1, len(CHANNELS), generator=g)
                neutral = torch.tensor([c.neutral for c in CHANNELS])
                motion = neutral + (low + u * (high - low) - neutral) * 0.5
                calls.inputs.append((motion, *rig_inputs))
                calls.outputs.append(_as_tuple(module(motion, *rig_inputs)))
        else:
            raise ValueError(f"unknown engine {name!r}")
    return calls


def check_calls(calls: EngineCalls, run: Callable[..., Sequence[Tensor]]) -> dict[str, dict]:
    """Run every recorded call through `run` (another back-end's engine) and compare with torch:
    the worst case per output (output_errors, merged)."""
    reports = []
    for inputs, expected in zip(calls.inputs, calls.outputs):
        got = _as_tuple(run(*inputs))
        reports.append(output_errors(expected, got, calls.io.outputs))
    return merge_errors(reports)


def onnxruntime_runner(path: Path, io_names: EngineIO, *, threads: int = 1):
    """A plain onnxruntime CPU session as a callable over torch tensors (for checking exports)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(*inputs: Tensor) -> tuple[Tensor, ...]:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(io_names.inputs, inputs)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in session.run(list(io_names.outputs), feed))

    return run


def export_and_check(name: str, module: nn.Module, calls: Sequence[EngineCalls], *, cache_dir: Path | None = None,
                     precision: str = "fp32", force: bool = False) -> tuple[ExportedEngine, dict[str, dict]]:
    """Export one engine and compare its graph (onnxruntime CPU) with torch on the given calls.
    Raises AvatarError when any output is out of tolerance."""
    exported = export_engine(name, module, cache_dir=cache_dir, precision=precision, force=force)
    run = onnxruntime_runner(exported.path, exported.io)
    report = merge_errors([check_calls(c, run) for c in calls])
    if not all(r["ok"] for r in report.values()):
        raise AvatarError(f"the ONNX export of the {name} engine does not match torch: {describe_errors(report)}")
    return exported, report


def main(argv=None) -> int:
    """`python -m engines.export`: export every engine and check it against torch (onnxruntime),
    or `--save-rig` to (re)write the astronaut's rig for machines without mediapipe."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m engines.export", description=main.__doc__)
    p.add_argument("--engines", default=",".join(ENGINE_NAMES))
    p.add_argument("--audio-model", default="trained", choices=("trained", "dsp"))
    p.add_argument("--motion-model", default="generator", choices=("generator", "baseline"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--save-rig", nargs="?", const=SAVED_RIG, type=Path, default=None, metavar="PATH",
                   help=f"write the astronaut's rig, xz-compressed (default {SAVED_RIG.relative_to(REPO_ROOT)}), "
                        f"and its portrait analysis beside it ({SAVED_PORTRAIT.name})")
    args = p.parse_args(argv)
    try:
        if args.save_rig is not None:
            from avatar.portrait import analyze_portrait
            from avatar.rig import build_rig

            portrait = analyze_portrait(PORTRAIT)
            save_compressed_rig(build_rig(portrait), args.save_rig)
            portrait_path = Path(args.save_rig).with_name(SAVED_PORTRAIT.name)
            save_portrait(portrait, portrait_path)
            for path in (Path(args.save_rig), portrait_path):
                print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return 0
        from avatar.controls import Controls, controls_tensor
        from avatar.pipeline import load_engines

        engines = load_engines(audio_model=args.audio_model, motion_model=args.motion_model)
        modules = {"audio": engines.encoder, "motion": engines.generator, "face": engines.decoder}
        rig = reference_rig()
        controls = controls_tensor(Controls())
        real = record_calls(engines.encoder, engines.generator, engines.decoder, rig.inputs(),
                            read_voice(seconds=3.0), controls, render_every=20)
        for name in args.engines.split(","):
            exported, report = export_and_check(name, modules[name], [real[name]], precision=args.precision)
            print(f"{name}: {exported.path} ({describe_errors(report)})")
    except AvatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
