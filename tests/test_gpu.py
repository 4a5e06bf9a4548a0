"""GPU back-ends against the torch CPU reference (all `cuda`-marked: skipped without a GPU).

- torch on CUDA: per-engine runners in the lead's Pipeline, the eager FrameEngine and the
  CUDA-graph FrameEngine, free-running over 3 s of the bundled voice;
- the TensorRT FrameEngine's machinery (binding by address, state ping-pong, one stream, pinned
  copies, events) with the fake tensorrt from test_runtime computing on the CUDA buffers;
- a real TensorRT build and its parity, where `import tensorrt` works.

Tolerances (engines/export.py PARITY): motion within 1e-3, pixels within 2/255 mean, 8/255 max.
Imports nothing that needs mediapipe: the rig comes from benchmarks/data/ where it cannot be built.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from avatar.constants import SAMPLES_PER_FRAME
from avatar.controls import Controls, controls_tensor
from avatar.pipeline import Engines, Pipeline
from engines import export as ex
from engines import runtime as rt
from engines.audio_encoder import WEIGHTS_DIR, load_audio_encoder
from engines.face_decoder import FaceDecoder
from engines.motion_generator import MotionGenerator

pytestmark = pytest.mark.cuda

RENDER_EVERY = 20
AUDIO_MODEL = "trained" if (WEIGHTS_DIR / "audio_encoder.pt").is_file() else "dsp"


@pytest.fixture(scope="module")
def controls():
    return controls_tensor(Controls(mood="happy"))


@pytest.fixture(scope="module")
def engines():
    return Engines(encoder=load_audio_encoder(AUDIO_MODEL), generator=MotionGenerator().eval(),
                   decoder=FaceDecoder().eval())


def _compare(engines, rig, controls, voice, frames, *, seed=0):
    """Free-running, each from its own state, against the torch CPU FrameEngine (bit-identical to
    the Pipeline, tests/test_runtime.py): worst motion error, worst pixel mean/max error.
    `frames` is a FrameEngine, or a Pipeline (which draws the same noise from the same seed)."""
    ref = rt.create_backend("torch").frame_engine(engines, rig.inputs())
    noise = torch.Generator().manual_seed(seed)
    worst = {"motion": 0.0, "mean": 0.0, "max": 0.0}
    for t, tick in enumerate(voice.reshape(-1, SAMPLES_PER_FRAME).numpy()):
        render = t % RENDER_EVERY == RENDER_EVERY - 1
        n = torch.rand(1, ref.n_noise, generator=noise)
        expected = ref.step(tick, controls, n, render=render)
        if isinstance(frames, Pipeline):
            got_motion = frames.motion_step(tick)
            frame = frames.render(got_motion) if render else None
        else:
            frame = frames.step(tick, controls, n, render=render)
            got_motion = frames.last_motion
        worst["motion"] = max(worst["motion"], float((got_motion.cpu() - ref.last_motion).abs().max()))
        if render:
            d = np.abs(expected.astype(np.int16) - frame.astype(np.int16))
            worst["mean"] = max(worst["mean"], float(d.mean()))
            worst["max"] = max(worst["max"], float(d.max()))
    return worst


def _assert_parity(worst):
    assert worst["motion"] <= 1e-3, worst
    assert worst["mean"] <= 2.0 and worst["max"] <= 8.0, worst


def test_torch_cuda_runners_in_the_pipeline_match_cpu(engines, rig, controls, voice):
    cuda = rt.create_backend("torch", device="cuda").engines(engines)
    _assert_parity(_compare(engines, rig, controls, voice, Pipeline(cuda, rig.inputs(), controls, seed=0)))


def test_torch_cuda_frame_engine_eager_matches_cpu(engines, rig, controls, voice):
    frames = rt.create_backend("torch", device="cuda", cuda_graph=False).frame_engine(engines, rig.inputs())
    assert not frames.cuda_graph
    _assert_parity(_compare(engines, rig, controls, voice, frames))


def test_cuda_graph_frame_engine_matches_cpu_and_eager(engines, rig, controls, voice):
    graphed = rt.create_backend("torch", device="cuda").frame_engine(engines, rig.inputs())
    assert graphed.cuda_graph, f"CUDA graph capture failed: {graphed.cuda_graph_error}"
    _assert_parity(_compare(engines, rig, controls, voice, graphed))

    # the graphs replay what the eager engine computes on this GPU
    graphed.reset()
    eager = rt.create_backend("torch", device="cuda", cuda_graph=False).frame_engine(engines, rig.inputs())
    noise = torch.Generator().manual_seed(3)
    for tick in voice.reshape(-1, SAMPLES_PER_FRAME)[:40].numpy():
        n = torch.rand(1, eager.n_noise, generator=noise)
        a, b = graphed.step(tick, controls, n), eager.step(tick, controls, n)
        assert float((graphed.last_motion - eager.last_motion).abs().max()) <= 1e-5
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1


def test_cuda_graph_follows_a_new_rig_and_reset(engines, rig, controls, voice):
    graphed = rt.create_backend("torch", device="cuda").frame_engine(engines, rig.inputs())
    other = tuple(t.clone() for t in rig.inputs())
    names = list(ex.engine_io("face", engines.decoder).inputs[1:])
    for name in ("photo_u8", "photo_rgbm"):  # a different portrait's pixels, same geometry
        t = other[names.index(name)]
        t.copy_((255 - t) if t.dtype == torch.uint8 else t.flip(-1))
    graphed.set_rig(other)
    ref = rt.create_backend("torch").frame_engine(engines, other)
    ticks = voice.reshape(-1, SAMPLES_PER_FRAME)[:5].numpy()
    noise = torch.rand(5, graphed.n_noise, generator=torch.Generator().manual_seed(1))
    out = []
    for t, n in zip(ticks, noise):
        out.append(graphed.step(t, controls, n[None]))
        d = np.abs(out[-1].astype(np.int16) - ref.step(t, controls, n[None]).astype(np.int16))
        assert d.mean() <= 2.0 and d.max() <= 8.0
    graphed.reset()
    assert np.array_equal(graphed.step(ticks[0], controls, noise[0][None]), out[0])


def test_submitted_frames_arrive_in_order_and_stay_intact(engines, rig, controls, voice):
    frames = rt.create_backend("torch", device="cuda").frame_engine(engines, rig.inputs())
    ticks = voice.reshape(-1, SAMPLES_PER_FRAME)[20:26].numpy()
    noise = torch.rand(6, frames.n_noise, generator=torch.Generator().manual_seed(2))
    sequential = [frames.step(t, controls, n[None]) for t, n in zip(ticks, noise)]
    frames.reset()
    # overlap: always one frame in flight while the next is submitted; the ring wraps 3 times
    pending = [frames.submit(t, controls, n[None]) for t, n in zip(ticks, noise)]
    results = [p.result() for p in pending]
    for a, b in zip(sequential, results):
        assert np.array_equal(a, b)


def test_nvtx_ranges_name_every_stage(engines, rig, controls, voice, monkeypatch):
    names = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: names.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    frames = rt.create_backend("torch", device="cuda").frame_engine(engines, rig.inputs())
    names.clear()
    frames.step(voice[:SAMPLES_PER_FRAME].numpy(), controls, torch.rand(1, frames.n_noise))
    assert names == ["frame", "audio_encoder", "motion_generator", "face_decoder", "frame_to_host"]


def test_tensorrt_frame_engine_machinery_with_the_fake(engines, rig, controls, voice, tmp_path, monkeypatch):
    """Everything of the TensorRT FrameEngine but TensorRT's kernels: plans 'built' by the fake
    (onnxruntime on the bound CUDA buffers), manifest, binding, ping-pong state, pinned copies."""
    from test_runtime import FakeTensorRT
    from test_runtime import build_engines as bld

    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(bld, "VERIFY_SECONDS", 1.0)
    device = torch.device("cuda")
    identity = rt.gpu_identity(device)
    bld.build(engines, names=list(ex.ENGINE_NAMES), precision="fp32", out_dir=tmp_path, trt=fake, device=device,
              identity=identity, cache_dir=tmp_path / "onnx", write=lambda *a: None)
    backend = rt.create_backend("tensorrt", plan_dir=tmp_path)
    frames = backend.frame_engine(engines, rig.inputs())
    _assert_parity(_compare(engines, rig, controls, voice, frames))
    assert any(c[0] == "execute_async_v3" and c[1] != 0 for c in fake.calls)  # a real stream handle


def test_tensorrt_build_and_parity(engines, rig, controls, voice, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    from test_runtime import build_engines

    device = torch.device("cuda")
    manifest = build_engines.build(engines, names=list(ex.ENGINE_NAMES), precision="fp16", out_dir=tmp_path,
                                   trt=trt, device=device, identity=rt.gpu_identity(device),
                                   cache_dir=tmp_path / "onnx")
    assert all(all(r["ok"] for r in e["parity"].values()) for e in manifest["engines"].values())
    frames = rt.create_backend("tensorrt", plan_dir=tmp_path).frame_engine(engines, rig.inputs())
    _assert_parity(_compare(engines, rig, controls, voice, frames))
