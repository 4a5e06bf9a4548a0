"""End to end: the CLI renders a portrait and an audio file into a valid mp4; bad input fails cleanly."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from avatar.cli import DEFAULT_AUDIO, DEFAULT_PORTRAIT, main
from avatar.constants import FPS, FRAME_SIZE

pytestmark = pytest.mark.slow


def _sox(*args):
    subprocess.run(["sox", *map(str, args)], check=True, capture_output=True)


def test_render_writes_h264_512_at_40fps_with_audio(tmp_path, rig_cache):
    audio = tmp_path / "speech.mp3"
    _sox(DEFAULT_AUDIO, "-r", "44100", "-c", "2", audio, "trim", "0", "2.5")
    out = tmp_path / "out.mp4"
    assert main(["render", "--portrait", str(DEFAULT_PORTRAIT), "--audio", str(audio), "-o", str(out), "-q"]) == 0

    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert (video.codec_context.width, video.codec_context.height) == (FRAME_SIZE, FRAME_SIZE)
        assert video.average_rate == FPS
        assert container.streams.audio, "no audio stream muxed"
        assert container.streams.audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(out)) as container:
        audio_seconds = sum(f.samples / f.sample_rate for f in container.decode(audio=0))
    # mp3 pads its last frame, so the decoded audio runs a little past the 2.5 s that went in:
    # the video must match the audio that is there, within one frame
    assert 2.5 <= audio_seconds < 2.6
    assert abs(len(frames) - audio_seconds * FPS) <= 1
    # the face talks: consecutive frames are not all identical
    diffs = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames, frames[1:])]
    assert max(diffs) > 0.5


def test_silence_renders_an_idle_face(tmp_path, rig_cache):
    audio = tmp_path / "silence.wav"
    _sox("-n", "-r", "16000", "-c", "1", audio, "trim", "0", "1.0")
    out = tmp_path / "idle.mp4"
    assert main(["render", "--portrait", str(DEFAULT_PORTRAIT), "--audio", str(audio), "-o", str(out), "-q"]) == 0
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames in (FPS - 1, FPS, FPS + 1)


@pytest.mark.parametrize("problem", ["no_face", "not_image", "corrupt_audio", "empty_audio", "missing_audio"])
def test_bad_input_is_one_line_and_nonzero(tmp_path, problem, rig_cache):
    portrait, audio = Path(DEFAULT_PORTRAIT), Path(DEFAULT_AUDIO)
    if problem == "no_face":
        from PIL import Image

        portrait = tmp_path / "wall.png"
        Image.fromarray(np.full((400, 400, 3), 180, np.uint8)).save(portrait)
    elif problem == "not_image":
        portrait = tmp_path / "notes.jpg"
        portrait.write_text("not a photo")
    elif problem == "corrupt_audio":
        audio = tmp_path / "broken.mp3"
        audio.write_bytes(b"\x00garbage" * 500)
    elif problem == "empty_audio":
        audio = tmp_path / "empty.wav"
        audio.write_bytes(b"")
    else:
        audio = tmp_path / "nowhere.wav"
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")  # an existing file must survive a failed render
    proc = subprocess.run([sys.executable, "-m", "avatar.cli", "render", "--portrait", str(portrait),
                           "--audio", str(audio), "-o", str(out), "-q"], capture_output=True, text=True,
                          env={**__import__("os").environ})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b"keep me"


def test_render_through_a_gpu_style_frame_engine_matches_the_pipeline(tmp_path, rig_cache, monkeypatch):
    """A back-end on a GPU renders through its FrameEngine (state on the device) instead of the
    Pipeline: stand one in whose frame engine is the CPU one, and the video must come out the same."""
    import torch

    from engines import runtime as rt

    audio = tmp_path / "speech.wav"
    _sox(DEFAULT_AUDIO, audio, "trim", "0", "1.5")

    def frames_of(path):
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    reference = tmp_path / "pipeline.mp4"
    assert main(["render", "--portrait", str(DEFAULT_PORTRAIT), "--audio", str(audio), "-o", str(reference), "-q"]) == 0

    used = []

    class GpuStyle(rt.TorchBackend):
        def frame_engine(self, engines, rig_inputs, *, timing=False):
            used.append(True)
            return rt.FrameEngine(engines, rig_inputs, timing=timing)

        def describe(self):
            return "a GPU-style stand-in"

    def create_backend(name="auto", **options):
        backend = GpuStyle()
        backend.device = torch.device("cuda")  # what make_ticker looks at: not the CPU, so the frame engine
        return backend

    monkeypatch.setattr(rt, "create_backend", create_backend)
    framed = tmp_path / "frame_engine.mp4"
    assert main(["render", "--portrait", str(DEFAULT_PORTRAIT), "--audio", str(audio), "-o", str(framed), "-q"]) == 0
    assert used, "the render did not go through the frame engine"
    a, b = frames_of(reference), frames_of(framed)
    assert len(a) == len(b) == round(1.5 * FPS)
    # same motion and pixels; only the watermark's hour could differ between the two renders
    assert max(np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)) < 0.5
