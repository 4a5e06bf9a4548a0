"""The live daemon with a fake microphone (FileAudioBackend: a thread calling the real callback at
real-time pace) and fake cameras (pyvirtualcam backends registered here).

Most tests run a Pipeline of small stand-in engines that honour the engine contracts and write,
into each frame, which audio sample shaped it: that gives the true audio-to-camera latency of every
frame, to check the daemon's own measurement against. One test runs the real engines end to end
through `bench_live`.

Run as `python tests/test_live.py serve OUT.json` it is the daemon process the signal tests stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pyvirtualcam
import torch
from torch import nn

from avatar.camera import RecordingBackend, open_camera
from avatar.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError
from avatar.live import LiveDaemon, bench_live
from avatar.mic import AudioBlock, FileAudioBackend, Microphone
from avatar.pipeline import Engines, Pipeline

REPO = Path(__file__).resolve().parent.parent
PERIOD = 1 << 16  # the sawtooth's period in samples: sample i has the value (i % PERIOD) / 2 PERIOD


# ---- stand-in engines: the contracts of engines/*.py, and frames that say which sample made them ---

class MarkEncoder(nn.Module):
    """features (B, 3): [newest sample of the previous block, newest sample of this block, this
    block's peak]; state: the newest sample. Look-ahead 1, like the real encoder."""

    lookahead_frames = 1

    def initial_state(self, batch: int = 1):
        return (torch.zeros(batch, 1),)

    def forward(self, samples, prev):
        newest = samples[:, -1:]
        return torch.cat([prev, newest, samples.abs().amax(1, keepdim=True)], 1), newest


class MarkGenerator(nn.Module):
    """motion (B, 2): [newest sample of this block, its peak]; state: a frame count."""

    N_NOISE = 1

    def initial_state(self, batch: int = 1):
        return (torch.zeros(batch, 1),)

    def forward(self, features, controls, noise, count):
        return features[:, 1:3], count + 1


class MarkDecoder(nn.Module):
    """The rig image with pixel (0, 0) holding the sawtooth index of motion[0, 0] (R high byte,
    G low byte) and pixel (0, 1) R = 255 * peak. `delay_s` makes it as slow as a real decoder."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__()
        self.delay_s = delay_s

    def forward(self, motion, image):
        if self.delay_s:
            time.sleep(self.delay_s)
        frame = image.clone()
        index = torch.round(motion[0, 0].clamp(0, 0.5) * 2 * PERIOD).long() % PERIOD
        frame[0, 0, 0, 0] = (index // 256).to(torch.uint8)
        frame[0, 0, 0, 1] = (index % 256).to(torch.uint8)
        frame[0, 0, 1, 0] = (motion[0, 1].clamp(0, 1) * 255).to(torch.uint8)
        return frame


def stand_in_pipeline(*, delay_s: float = 0.0) -> Pipeline:
    image = torch.full((1, 512, 512, 3), 40, dtype=torch.uint8)
    return Pipeline(Engines(MarkEncoder(), MarkGenerator(), MarkDecoder(delay_s)), (image,), torch.zeros(1, 4))


def sawtooth(seconds: float) -> np.ndarray:
    i = np.arange(int(seconds * SAMPLE_RATE))
    return ((i % PERIOD) / (2 * PERIOD)).astype(np.float32)


class MarkCamera(RecordingBackend):
    """Records, for every frame handed over, when and which sawtooth sample made it."""

    world: FileAudioBackend | None = None  # the fake microphone, to turn sample indices into times

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list[tuple[float, int, int, int]] = []  # (time, sample index mod PERIOD, world position, peak)

    def send(self, frame):
        super().send(frame)
        px = frame[:6]
        self.log.append((time.monotonic(), int(px[0]) * 256 + int(px[1]), self.world.position if self.world else 0,
                         int(px[3])))


pyvirtualcam.register_backend("test-mark", MarkCamera)


def run_daemon(pipeline, backend: FileAudioBackend, *, seconds: float, gate: bool = False, record: bool = True,
               mic_kw: dict | None = None, **kw):
    MarkCamera.instances.clear()
    MarkCamera.world = backend
    with Microphone(backend=backend, **(mic_kw or {})) as mic:
        camera = open_camera(backend="test-mark")
        daemon = LiveDaemon(pipeline, mic, camera=camera, idle_frame=np.zeros((512, 512, 3), np.uint8), gate=gate,
                            record=int(seconds * FPS) + 100 if record else 0, **kw)
        stats = daemon.run(seconds=seconds, handle_signals=False)
    return stats, MarkCamera.instances


def true_latencies_ms(camera: MarkCamera, world: FileAudioBackend, handed: np.ndarray) -> np.ndarray:
    """For every frame the camera got: its hand-over time (the daemon's record, so only the capture
    side is checked) minus the capture time of the sample written in it."""
    out = []
    for (_, index, position, _), t in zip(camera.log, handed, strict=True):
        if index == 0 and position == 0:
            out.append(np.nan)
            continue
        newest = position - 1 - ((position - 1 - index) % PERIOD)  # the latest sample with that index
        out.append(1000.0 * (t - world.capture_time(newest)))
    return np.array(out)


# ---- pacing and latency --------------------------------------------------------------------------

def test_one_frame_per_tick_and_latency_matches_the_truth():
    world = FileAudioBackend(sawtooth(8), samplerate=SAMPLE_RATE)
    seconds = 4.0
    stats, (camera,) = run_daemon(stand_in_pipeline(), world, seconds=seconds)
    expected = int(seconds * FPS)
    assert abs(stats.ticks - expected) <= 1
    assert stats.frames_sent + stats.ticks_missed == stats.ticks
    # 40 N +- 2 delivered, less the ticks skipped because the OS woke the pacing thread more than a
    # period late (on this shared 2-core machine even a bare sleep loop does that a few times a
    # minute); those are few, and skipped rather than sent in a burst
    assert abs(camera.frames + stats.ticks_missed - expected) <= 2
    assert stats.ticks_missed <= 0.1 * expected  # a broken pacer skips far more
    assert camera.closed
    # the daemon's latency is the true one (to 0.2 ms) for every fresh frame from live audio
    rec = stats.records
    fresh = ~np.isnan(rec["latency_ms"])
    truth = true_latencies_ms(camera, world, rec["handed"])
    assert fresh.sum() >= 0.8 * expected
    # (to 0.2 ms for 99 % of them; a thread woken late can shift one by a little more, seen once at
    # 0.201 ms in 157 on this shared 2-core machine; a wrong formula is off by whole blocks, 25 ms)
    error = np.abs(rec["latency_ms"][fresh] - truth[fresh])
    assert np.percentile(error, 99) <= 0.2 and error.max() <= 1.0, error.max()
    # a fast renderer: a frame is at most one audio block plus one tick old
    assert np.percentile(rec["latency_ms"][fresh], 95) <= 60.0
    # hand-over against the deadline schedule: never early; deadlines a period apart (or whole
    # periods, across a missed tick) except where the schedule's phase was re-aligned, by < 1/2 period
    assert (rec["handed"] >= rec["deadline"]).all()
    step = np.diff(rec["deadline"]) * FPS
    irregular = np.abs(step - np.round(step)) > 1e-6
    assert irregular.sum() <= stats.phase_shifts <= 8 and (step > 0.5).all()


def test_slow_renderer_drops_frames_not_latency():
    world = FileAudioBackend(sawtooth(8), samplerate=SAMPLE_RATE)
    seconds = 4.0
    stats, (camera,) = run_daemon(stand_in_pipeline(delay_s=0.06), world, seconds=seconds)
    rec = stats.records
    expected = int(seconds * FPS)
    assert abs(camera.frames + stats.ticks_missed - expected) <= 2  # still 40 frames a second
    assert stats.ticks_missed <= 0.1 * expected  # a broken pacer skips far more
    assert stats.frames_new <= 0.5 * expected and stats.frames_repeated >= 0.4 * expected
    assert stats.motion_steps >= 0.9 * expected  # every 25 ms of audio still drives the motion
    lat = rec["latency_ms"]
    t = rec["deadline"] - rec["deadline"][0]
    first, last = lat[(t > 1) & (t < 2)], lat[t > seconds - 1]
    first, last = first[~np.isnan(first)], last[~np.isnan(last)]
    # bounded by one render (60 ms) + an audio block + a tick + scheduling slack, and not growing
    assert np.percentile(lat[~np.isnan(lat)], 95) <= 150.0
    # (means: latency takes two values a tick apart as rendering beats against the 25 ms ticks)
    assert abs(last.mean() - first.mean()) <= 10.0
    truth = true_latencies_ms(camera, world, rec["handed"])
    fresh = ~np.isnan(lat)
    np.testing.assert_allclose(lat[fresh], truth[fresh], atol=0.2)


@pytest.mark.parametrize("stalls", ["decoder", "encoder"])
def test_a_stall_drops_only_the_audio_it_must_and_latency_recovers(stalls):
    """One 0.6 s stall. In the decoder (its own thread on the CPU) the motion thread keeps up with
    the microphone: no audio is lost, the motion of every block is computed. In the encoder (the
    motion thread itself) 24 blocks pile up: the backlog beyond MAX_CATCHUP_BLOCKS is skipped.
    Either way latency is back to normal after it."""
    class StallDecoder(MarkDecoder):
        calls = 0

        def forward(self, motion, image):
            StallDecoder.calls += 1
            if StallDecoder.calls == 20:
                time.sleep(0.6)
            return super().forward(motion, image)

    class StallEncoder(MarkEncoder):
        calls = 0

        def forward(self, samples, prev):
            StallEncoder.calls += 1
            if StallEncoder.calls == 20:
                time.sleep(0.6)
            return super().forward(samples, prev)

    engines = (Engines(MarkEncoder(), MarkGenerator(), StallDecoder()) if stalls == "decoder"
               else Engines(StallEncoder(), MarkGenerator(), MarkDecoder()))
    pipeline = Pipeline(engines, (torch.zeros(1, 512, 512, 3, dtype=torch.uint8),), torch.zeros(1, 4))
    world = FileAudioBackend(sawtooth(8), samplerate=SAMPLE_RATE)
    stats, (camera,) = run_daemon(pipeline, world, seconds=3.0)
    if stalls == "decoder":
        assert stats.audio_dropped_ms == 0
        assert stats.frames_rendered < stats.motion_steps - 15  # the stall skipped frames, not motion
    else:
        assert stats.audio_dropped_ms >= 300
    lat = stats.records["latency_ms"]
    t = stats.records["deadline"] - stats.records["deadline"][0]
    after = lat[(t > 2.0) & ~np.isnan(lat)]
    assert after.size > 20 and np.median(after) <= 60.0


def test_frame_engine_ticker_matches_the_pipeline():
    """run_live drives a FrameEngine on CUDA: same noise, same motion, same frames as Pipeline."""
    from avatar.controls import N_CONTROLS
    from avatar.live import FrameTicker, PipelineTicker
    from engines.runtime import FrameEngine

    class NoisyGenerator(MarkGenerator):
        N_NOISE = 3

        def forward(self, features, controls, noise, count):
            return torch.cat([features[:, 1:2], noise[:, 2:3]], 1), count + 1

    def engines():
        return Engines(MarkEncoder(), NoisyGenerator(), MarkDecoder())

    image = (torch.arange(512 * 512 * 3) % 251).to(torch.uint8).reshape(1, 512, 512, 3)
    controls = torch.zeros(1, N_CONTROLS)
    a = PipelineTicker(Pipeline(engines(), (image,), controls, seed=5))
    b = FrameTicker(FrameEngine(engines(), (image,)), controls, seed=5)
    audio = sawtooth(1)
    for k in range(12):
        block = audio[k * SAMPLES_PER_FRAME:(k + 1) * SAMPLES_PER_FRAME]
        fa, fb = a.tick(block, render=k % 3 != 1), b.tick(block, render=k % 3 != 1)
        assert (fa is None) == (fb is None) == (k == 0 or k % 3 == 1)
        if fa is not None:
            np.testing.assert_array_equal(fa, fb)
            assert fa[0, 1, 0] > 0  # the noise reached the frame


def test_stream_gives_the_tick_frames_with_the_engines_a_thread_ahead():
    """Offline render's ticker.stream: the frames tick() and the flush give, in order, with the
    audio encoder (and generator) on the run-ahead thread and the decoder on the caller's."""
    from avatar.controls import N_CONTROLS
    from avatar.live import FrameTicker, PipelineTicker
    from engines.runtime import FrameEngine

    threads = {"encoder": set(), "decoder": set()}

    class Encoder(MarkEncoder):
        def forward(self, samples, prev):
            threads["encoder"].add(threading.current_thread().name)
            return super().forward(samples, prev)

    class Decoder(MarkDecoder):
        def forward(self, motion, image):
            threads["decoder"].add(threading.current_thread().name)
            return super().forward(motion, image)

    controls = torch.zeros(1, N_CONTROLS)
    image = (torch.arange(512 * 512 * 3) % 251).to(torch.uint8).reshape(1, 512, 512, 3)
    audio = sawtooth(0.5)
    blocks = list(audio.reshape(-1, SAMPLES_PER_FRAME))
    ticked = PipelineTicker(Pipeline(Engines(MarkEncoder(), MarkGenerator(), MarkDecoder()), (image,), controls))
    expected = [f for b in blocks if (f := ticked.tick(b, render=True)) is not None]
    expected += [ticked.tick(np.zeros(SAMPLES_PER_FRAME, np.float32), render=True)]
    assert len(expected) == len(blocks)

    streamed = PipelineTicker(Pipeline(Engines(Encoder(), MarkGenerator(), Decoder()), (image,), controls))
    got = list(streamed.stream(iter(blocks)))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert threads["encoder"] == {"run-ahead"} and threads["decoder"] == {threading.current_thread().name}
    # offline on the CPU: frames decoded side by side on threads of their own, still in order
    threads["decoder"].clear()
    streamed.reset()
    got = list(streamed.stream(iter(blocks), render_threads=2))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert threads["decoder"] == {"render_0", "render_1"}
    framed = FrameTicker(FrameEngine(Engines(MarkEncoder(), MarkGenerator(), MarkDecoder()), (image,)), controls)
    for a, b in zip(framed.stream(iter(blocks)), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_ahead_raises_in_order_and_stops_when_the_caller_does():
    from avatar.pipeline import run_ahead

    def items(fail_at=None):
        for i in range(100):
            if i == fail_at:
                raise ValueError("bad block")
            made.append(i)
            yield i

    made = []
    got = []
    with pytest.raises(ValueError, match="bad block"):
        for x in run_ahead(items(fail_at=5), depth=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

    made.clear()
    stream = run_ahead(items(), depth=3)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()  # what a break or an error downstream does
    assert not any(t.name == "run-ahead" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 2 + 3 + 2  # it stopped: at most the queue's depth and one more turn ahead


def test_ordered_map_keeps_the_order_raises_in_place_and_stops_when_the_caller_does():
    from avatar.pipeline import ordered_map

    def slow_square(i):
        time.sleep(0.002 * (i % 3 == 0))  # later calls finish first
        if i == 7:
            raise ValueError("bad frame")
        return i * i

    got = []
    with pytest.raises(ValueError, match="bad frame"):
        for x in ordered_map(slow_square, iter(range(20)), threads=2):
            got.append(x)
    assert got == [i * i for i in range(7)]
    assert list(ordered_map(slow_square, iter(range(7)), threads=3)) == [i * i for i in range(7)]

    taken = []

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    stream = ordered_map(slow_square, items(), threads=2)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    assert not any(t.name.startswith("render_") and t.is_alive() for t in threading.enumerate())
    assert len(taken) <= 2 + 2 + 1  # bounded: the calls in flight and one queued


def test_worker_threads_keep_the_callers_torch_thread_count():
    """torch's thread count is per thread (OpenMP's): a thread we start must set it again, or each
    op there spins a team as wide as the machine (measured: 2x the CPU for the same work)."""
    from avatar.pipeline import ordered_map, run_ahead
    from engines.face_decoder import FaceDecoder

    import ctypes

    omp = sorted({path for path in Path("/proc/self/maps").read_text().split() if "libgomp" in path or "libiomp" in path})
    if not omp:
        pytest.skip("this torch build runs no OpenMP")
    max_threads = ctypes.CDLL(omp[0]).omp_get_max_threads  # what a new thread's ops would use
    fresh = []
    probe = threading.Thread(target=lambda: fresh.append(max_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe.start()
        probe.join()
        seen = list(run_ahead((max_threads() for _ in range(3)), depth=1))
        assert list(ordered_map(lambda _: max_threads(), iter(range(4)), threads=2)) == [1, 1, 1, 1]
        pool = FaceDecoder().parallel(1)._pool
        assert seen == [1, 1, 1] and pool.submit(max_threads).result() == 1
        pool.shutdown()
        if os.cpu_count() > 1:
            assert fresh[0] > 1  # the trap itself: a bare thread does not inherit the setting
    finally:
        torch.set_num_threads(before)


# ---- voice activity gate ---------------------------------------------------------------------------

def test_gate_silences_the_encoder_while_idle():
    daemon = LiveDaemon(stand_in_pipeline(), mic=None, preview=object())
    x = np.ones(SAMPLES_PER_FRAME, np.float32)
    speak, idle = AudioBlock(x, 0.0, True, True), AudioBlock(x, 0.0, False, True)
    assert daemon._gated(speak) is x
    down = daemon._gated(idle)
    np.testing.assert_allclose(down, np.linspace(1, 0, SAMPLES_PER_FRAME), atol=1e-6)  # faded over one block
    assert not daemon._gated(idle).any()
    np.testing.assert_allclose(daemon._gated(speak), np.linspace(0, 1, SAMPLES_PER_FRAME), atol=1e-6)
    daemon.gate = False
    assert daemon._gated(idle) is x


def test_speech_then_silence_switches_speaking_and_gates_noise():
    from avatar.media import open_audio

    with open_audio(REPO / "avatar/assets/voice.wav") as a:
        voice = np.concatenate(list(a.blocks()))[:int(2.5 * SAMPLE_RATE)]
    rng = np.random.default_rng(0)
    hiss = (0.003 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32)  # room noise after the talk
    world = FileAudioBackend(np.concatenate([voice, hiss]), samplerate=SAMPLE_RATE, loop=False)
    seen = []
    stats, (camera,) = run_daemon(stand_in_pipeline(), world, seconds=4.3, gate=True,
                                  on_status=lambda s: seen.append(s.speaking), status_every_s=0.25)
    peaks = np.array([p for *_, p in camera.log])
    t = np.array([e[0] for e in camera.log]) - camera.log[0][0]
    assert any(seen[:8]) and not any(seen[-4:])  # speaking during the voice, idle after it
    assert peaks[(t > 0.5) & (t < 2.0)].max() > 50  # speech reaches the encoder...
    assert peaks[t > 3.5].max() == 0  # ...the hiss after it does not


# ---- faults ----------------------------------------------------------------------------------------

def test_microphone_loss_keeps_idle_frames_coming_and_recovers(caplog):
    caplog.set_level(logging.WARNING)
    world = FileAudioBackend(sawtooth(8), samplerate=SAMPLE_RATE)

    def plug():
        time.sleep(1.0)
        world.unplug()
        time.sleep(1.0)
        world.replug()

    threading.Thread(target=plug, daemon=True).start()
    seconds = 3.5
    stats, (camera,) = run_daemon(stand_in_pipeline(), world, seconds=seconds,
                                  mic_kw={"retry_every_s": 0.3, "stall_timeout_s": 0.2})
    assert abs(camera.frames + stats.ticks_missed - seconds * FPS) <= 2  # the camera never noticed
    assert stats.ticks_missed <= 0.1 * seconds * FPS
    assert stats.mic_losses == 1 and stats.mic_reconnects == 1 and stats.mic_connected
    rec = stats.records
    t = rec["deadline"] - rec["deadline"][0]
    gap = (t > 1.35) & (t < 1.95)
    assert rec["fresh"][gap].mean() > 0.8  # idle animation: new frames, rendered from silence
    assert np.isnan(rec["latency_ms"][gap]).all()  # ...which have no microphone latency
    assert (~np.isnan(rec["latency_ms"][t > 2.8])).mean() > 0.8  # live audio again after the retry
    assert sum("lost" in r.getMessage() for r in caplog.records) == 1


def test_camera_removed_mid_run_is_reopened(caplog):
    caplog.set_level(logging.WARNING)

    class Flaky(RecordingBackend):
        broken = False

        def __init__(self, **kw):
            if Flaky.broken:
                raise RuntimeError("No such device")
            super().__init__(**kw)

        def send(self, frame):
            if Flaky.broken:
                raise RuntimeError("write: No such device")
            super().send(frame)

    pyvirtualcam.register_backend("test-flaky", Flaky)
    RecordingBackend.instances.clear()

    def unplug():
        time.sleep(0.8)
        Flaky.broken = True
        time.sleep(0.8)
        Flaky.broken = False

    threading.Thread(target=unplug, daemon=True).start()
    world = FileAudioBackend(sawtooth(8), samplerate=SAMPLE_RATE)
    with Microphone(backend=world) as mic:
        daemon = LiveDaemon(stand_in_pipeline(), mic, camera=open_camera(backend="test-flaky"),
                            reopen_camera=lambda: open_camera(backend="test-flaky"), retry_every_s=0.3)
        stats = daemon.run(seconds=3.0, handle_signals=False)
    first, second = RecordingBackend.instances
    assert stats.camera_errors == 1 and stats.camera_reconnects == 1
    assert first.closed and second.closed
    assert 25 <= first.frames <= 40 and second.frames >= 40
    messages = [r.getMessage() for r in caplog.records if "camera" in r.getMessage()]
    assert sum("failed" in m or "unavailable" in m for m in messages) == 1  # said once, not per retry
    assert any("back" in m for m in messages)


def test_engine_exception_is_logged_once_and_frames_keep_coming(caplog):
    caplog.set_level(logging.WARNING)

    class Broken(MarkDecoder):
        def forward(self, motion, image):
            raise RuntimeError("boom")

    pipeline = Pipeline(Engines(MarkEncoder(), MarkGenerator(), Broken()), (torch.zeros(1, 512, 512, 3, dtype=torch.uint8),),
                        torch.zeros(1, 4))
    world = FileAudioBackend(sawtooth(4), samplerate=SAMPLE_RATE)
    stats, (camera,) = run_daemon(pipeline, world, seconds=1.0)
    assert stats.render_errors >= 5 and abs(camera.frames + stats.ticks_missed - FPS) <= 2  # the idle frame goes on
    assert sum("rendering failed" in r.getMessage() for r in caplog.records) == 1


def test_stop_from_another_thread_releases_the_camera():
    world = FileAudioBackend(sawtooth(4), samplerate=SAMPLE_RATE)
    RecordingBackend.instances.clear()
    with Microphone(backend=world) as mic:
        daemon = LiveDaemon(stand_in_pipeline(), mic, camera=open_camera(backend="test-mark"))
        threading.Timer(0.5, daemon.stop).start()
        started = time.monotonic()
        stats = daemon.run(handle_signals=False)
        assert time.monotonic() - started < 2.0
    (camera,) = RecordingBackend.instances
    assert camera.closed and camera.frames == stats.frames_sent > 0


def test_nothing_to_show_is_an_error():
    with pytest.raises(AvatarError, match="nothing to show"):
        LiveDaemon(stand_in_pipeline(), mic=None)


def test_sigterm_stops_run_and_restores_the_handler():
    world = FileAudioBackend(sawtooth(4), samplerate=SAMPLE_RATE)
    RecordingBackend.instances.clear()
    before = signal.getsignal(signal.SIGTERM)
    with Microphone(backend=world) as mic:
        daemon = LiveDaemon(stand_in_pipeline(), mic, camera=open_camera(backend="test-mark"))
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        stats = daemon.run()  # on the main thread: it handles SIGTERM itself
    assert signal.getsignal(signal.SIGTERM) is before
    (camera,) = RecordingBackend.instances
    assert camera.closed and 10 <= stats.frames_sent <= 40


def test_sigint_to_the_daemon_process_exits_0_and_releases_devices(tmp_path):
    sig = signal.SIGINT
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, __file__, "serve", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        proc.send_signal(sig)
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read()
    result = json.loads(out.read_text())
    assert result["camera_closed"] and result["mic_closed"] and result["frames"] >= 10


def test_delayed_mic_follows_the_measured_latency():
    from avatar.mic import DelayedMic

    world = FileAudioBackend(sawtooth(4), samplerate=SAMPLE_RATE)
    with DelayedMic("File Output", backend=world, delay_s=0.5) as delayed, \
            Microphone(backend=world, tap=delayed.push) as mic:
        daemon = LiveDaemon(stand_in_pipeline(delay_s=0.03), mic, camera=open_camera(backend="test-mark"),
                            delayed_mic=delayed, status_every_s=0.5)
        stats = daemon.run(seconds=2.0, handle_signals=False)
        played = np.concatenate([b for _, b in world.played])
    # the voice is delayed by the video's latency plus the look-ahead's 1.5 frames
    assert delayed.delay_s * 1000 == pytest.approx(stats.latency_p50_ms + 37.5, abs=15.0)
    assert 0.03 < delayed.delay_s < 0.2 and np.abs(played).max() > 0.1  # the mic audio was played


def test_list_devices_names_microphones_outputs_and_the_camera_fix():
    from avatar.live import describe_devices

    text = describe_devices(audio_backend=FileAudioBackend(np.zeros(10, np.float32), samplerate=SAMPLE_RATE))
    assert "0 'File Microphone' (file, 1 ch, 16000 Hz)" in text and "1 'File Output'" in text
    assert "virtual cameras" in text and ("modprobe" in text or "<- used" in text)


# ---- the real engines ------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_live_runs_the_real_pipeline(tmp_path, rig_cache):
    out = tmp_path / "live.json"
    result = bench_live(audio=REPO / "avatar/assets/voice.wav", seconds=3.0, portrait=None, out=out,
                        audio_model="dsp")
    saved = json.loads(out.read_text())
    assert saved["frames_sent"] == result["frames_sent"] == saved["camera_frames_received"]
    assert abs(saved["ticks"] - 3 * FPS) <= 1 and saved["camera_closed"]
    assert saved["frames_new"] >= 3 and saved["render_errors"] == 0
    assert saved["latency_ms"]["frames"] >= 1 and saved["latency_ms"]["p50"] > 0
    for key in ("fps_delivered", "fps_new", "on_time_share", "drift_ms", "peak_rss_mib", "goals_met"):
        assert key in saved


# ---- doctor -----------------------------------------------------------------------------------------

def fake_sys(tmp_path, *, module: bool, labels: dict[int, str]) -> Path:
    if module:
        (tmp_path / "module" / "v4l2loopback").mkdir(parents=True)
    for n, label in labels.items():
        d = tmp_path / "class" / "video4linux" / f"video{n}"
        d.mkdir(parents=True)
        (d / "name").write_text(label + "\n")
    return tmp_path


def test_doctor_finds_a_working_setup(tmp_path):
    from avatar.doctor import doctor

    world = FileAudioBackend(np.zeros(10, np.float32), samplerate=SAMPLE_RATE)
    checks = {c.name: c for c in doctor(audio_backend=world, system="Linux",
                                        sys_root=fake_sys(tmp_path, module=True, labels={0: "cam", 7: "VASA Avatar"}))}
    assert checks["microphone"].ok and "File Microphone" in checks["microphone"].message
    assert checks["voice detector"].ok
    assert checks["virtual camera"].ok and "/dev/video7" in checks["virtual camera"].message
    assert checks["portrait cache"].ok
    assert checks["GPU"].optional and checks["delayed mic (optional)"].optional


def test_doctor_says_the_fix_for_each_missing_piece(tmp_path):
    from avatar.doctor import check_camera, check_delayed_mic, check_microphone

    modprobe = 'sudo modprobe v4l2loopback devices=1 card_label="VASA Avatar" exclusive_caps=1'
    c = check_camera(sys_root=fake_sys(tmp_path / "a", module=False, labels={}), system="Linux")
    assert not c.ok and modprobe in c.message and "not loaded" in c.message
    c = check_camera(sys_root=fake_sys(tmp_path / "b", module=True, labels={3: "Dummy video device"}), system="Linux")
    assert not c.ok and "modprobe -r v4l2loopback" in c.message and modprobe in c.message and "'Dummy video device'" in c.message
    world = FileAudioBackend(np.zeros(10, np.float32), samplerate=SAMPLE_RATE)
    world.unplug()
    assert not check_microphone(world).ok and "no microphone found" in check_microphone(world).message
    c = check_delayed_mic(world, system="Windows")
    assert not c.ok and c.optional and "VB-Cable" in c.message
    world.output_name = "CABLE Input (VB-Audio Virtual Cable)"
    assert check_delayed_mic(world, system="Windows").ok
    c = check_delayed_mic(world, system="Darwin")
    assert not c.ok and "BlackHole" in c.message


def test_print_doctor_fails_only_on_required_checks():
    import io

    from avatar.doctor import Check, print_doctor

    out = io.StringIO()
    assert print_doctor([Check("microphone", True, "mic"), Check("delayed mic (optional)", False, "fix", True)],
                        file=out) == 0
    assert "[  --] delayed mic (optional)  fix" in out.getvalue()
    out = io.StringIO()
    assert print_doctor([Check("virtual camera", False, "sudo modprobe ..."), Check("GPU", True, "cpu", True)],
                        file=out) == 1
    assert "[FAIL] virtual camera  sudo modprobe ..." in out.getvalue() and "1 problem(s): virtual camera" in out.getvalue()


# ---- the daemon process for the signal tests --------------------------------------------------------

def _serve(out: str) -> int:
    world = FileAudioBackend(sawtooth(4), samplerate=SAMPLE_RATE)
    RecordingBackend.instances.clear()
    with Microphone(backend=world) as mic:
        daemon = LiveDaemon(stand_in_pipeline(), mic, camera=open_camera(backend="test-mark"))

        def ready():
            while not RecordingBackend.instances or RecordingBackend.instances[0].frames < 10:
                time.sleep(0.01)
            print("ready", flush=True)

        threading.Thread(target=ready, daemon=True).start()
        stats = daemon.run()
    (camera,) = RecordingBackend.instances
    Path(out).write_text(json.dumps({"camera_closed": camera.closed, "frames": camera.frames,
                                     "mic_closed": world.closed_streams == world.opened_streams,
                                     "frames_sent": stats.frames_sent}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        sys.exit(_serve(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} serve OUT.json")
