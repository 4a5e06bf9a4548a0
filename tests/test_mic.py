"""Microphone: ring buffer, streaming resampler, capture times, voice activity, device choice,
device loss, and the delayed mic. Audio comes from FileAudioBackend: a thread that calls the very
callback PortAudio would, at real-time pace."""

import logging
import time

import numpy as np
import pytest
from scipy.signal import resample_poly

from avatar.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError
from avatar.media import open_audio
from avatar.mic import (AudioDevice, DelayedMic, FileAudioBackend, Microphone, SoundDeviceBackend, StreamResampler,
                        VoiceActivity, _Ring, find_device, list_input_devices)

VOICE = "avatar/assets/voice.wav"


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    with open_audio(VOICE) as a:
        return np.concatenate(list(a.blocks()))


# ---- resampler ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate_in", [44_100, 48_000, 22_050, 32_000, 8_000, 16_000])
def test_stream_resampler_matches_resample_poly_in_random_chunks(rate_in):
    rng = np.random.default_rng(rate_in)
    x = rng.standard_normal(rate_in).astype(np.float32)
    r = StreamResampler(rate_in, SAMPLE_RATE)
    ys, newest, pos = [], [], 0
    while pos < x.size:
        n = int(rng.integers(1, 3000))
        y, j = r.process(x[pos:pos + n])
        pos += n
        ys.append(y)
        newest.append(j)
    y, j = np.concatenate(ys), np.concatenate(newest)
    ref = resample_poly(x.astype(np.float64), r.up, r.down)
    # everything but the filter's tail (which needs input that never comes) is out, and equal
    assert ref.size - y.size <= r.delay_in * r.up // r.down + 1
    np.testing.assert_allclose(y, ref[:y.size], atol=2e-6)
    # each output's newest input: within the filter's reach, never beyond what was given
    t_out = np.arange(y.size) * rate_in / SAMPLE_RATE
    assert np.all(j >= np.floor(t_out)) and np.all(j - t_out <= r.delay_in + 1) and j[-1] <= x.size - 1


def test_stream_resampler_passes_a_tone_at_16k():
    t = np.arange(48_000) / 48_000
    x = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y, _ = StreamResampler(48_000).process(x)
    ref = np.sin(2 * np.pi * 1000 * np.arange(y.size) / SAMPLE_RATE)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 2e-3  # 1 kHz passes within 0.02 dB, in phase


# ---- ring buffer --------------------------------------------------------------------------------

def test_ring_overwrites_oldest_and_counts_drops():
    ring = _Ring(1000, 1)
    data = np.arange(2500, dtype=np.float32)[:, None]
    for start in range(0, 2500, 100):  # the writer laps an idle reader
        ring.write(data[start:start + 100], float(start))
    out, first = ring.pull()
    margin = 1000 // 4
    assert out.shape[0] == 1000 - margin and first == 2500 - (1000 - margin)
    np.testing.assert_array_equal(out[:, 0], np.arange(first, 2500))  # newest, in order
    assert ring.dropped == first
    ring.write(data[:10], 0.0)
    out, first = ring.pull()
    assert first == 2500 and out.shape[0] == 10 and ring.dropped == 2500 - 750


def test_ring_capture_times_interpolate_from_callback_stamps():
    ring = _Ring(48_000, 1)
    for k in range(10):  # callbacks of 480 frames, newest frame captured at 10 ms steps
        ring.write(np.zeros((480, 1), np.float32), 100.0 + 0.01 * (k + 1))
    t = ring.times(np.array([479, 480, 4799, 2400]), 48_000)
    np.testing.assert_allclose(t, [100.01, 100.01 + 1 / 48_000, 100.1, 100.05 + 1 / 48_000], atol=1e-9)


# ---- the microphone on the file backend ---------------------------------------------------------

def test_blocks_carry_exact_capture_times_through_the_resampler(voice):
    audio = resample_poly(voice, 3, 1).astype(np.float32)
    be = FileAudioBackend(audio, samplerate=48_000, channels=2, loop=True)
    blocks = []
    with Microphone(backend=be) as mic:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            blocks += mic.read_blocks(max_blocks=1000, timeout=0.1)
        assert mic.stats.dropped_samples == 0 and mic.stats.ring_overruns == 0
    assert 35 <= len(blocks) <= 41
    r = StreamResampler(48_000)
    for k, b in enumerate(blocks):
        newest_out = (k + 1) * SAMPLES_PER_FRAME - 1
        newest_in = (newest_out * r.down + r.half) // r.up
        # to 0.2 ms: the callback reads the monotonic clock a little after the stream clock was read
        assert b.captured_at == pytest.approx(be.capture_time(newest_in), abs=2e-4)
        assert b.live
    # stereo in, mono 16 kHz out: the samples are the voice (resampled twice), to 1e-3
    got = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(got[100:-100], voice[100:got.size - 100], atol=2e-3)


def test_vad_speech_then_silence(voice):
    audio = np.concatenate([voice, np.zeros(3 * SAMPLE_RATE, np.float32)])
    vad = VoiceActivity()
    states = np.array([vad.update(audio[i:i + SAMPLES_PER_FRAME])
                       for i in range(0, audio.size - SAMPLES_PER_FRAME + 1, SAMPLES_PER_FRAME)])
    n_voice = voice.size // SAMPLES_PER_FRAME
    speech = states[:n_voice]
    assert speech.mean() > 0.8  # the clip is continuous speech with short pauses
    first = int(np.argmax(speech))
    onset = np.argmax(np.abs(voice) > 0.02) // SAMPLES_PER_FRAME
    assert first - onset <= 4  # speaking within 100 ms of the first sound
    release = int(np.argmax(~states[n_voice:]))
    assert release <= 16  # idle within 400 ms after the speech ends
    assert not states[n_voice + 20:].any()


def test_vad_stays_idle_on_steady_noise():
    rng = np.random.default_rng(1)
    for level in (0.003, 0.01):  # -50 and -40 dBFS hiss
        audio = (level * rng.standard_normal(10 * SAMPLE_RATE)).astype(np.float32)
        vad = VoiceActivity()
        states = np.array([vad.update(audio[i:i + SAMPLES_PER_FRAME])
                           for i in range(0, audio.size, SAMPLES_PER_FRAME)])
        # webrtcvad calls its first ~0.3 s speech while it learns the noise; then idle throughout.
        # (Louder noise, -30 dBFS, takes it several seconds and still blips: not asserted here.)
        assert not states[40:].any(), states[40:].mean()


def test_speaking_flag_through_the_microphone(voice):
    audio = np.concatenate([voice[:2 * SAMPLE_RATE], np.zeros(SAMPLE_RATE, np.float32)])
    be = FileAudioBackend(audio, samplerate=SAMPLE_RATE, loop=False)
    flags = []
    with Microphone(backend=be) as mic:
        while len(flags) < 118:
            flags += [b.speaking for b in mic.read_blocks(max_blocks=200, timeout=0.2)]
    flags = np.array(flags[:118])
    assert flags[10:75].mean() > 0.8 and not flags[100:].any()


def test_read_blocks_drops_stale_audio_keeping_the_newest():
    audio = np.arange(SAMPLE_RATE * 4, dtype=np.float32) / (SAMPLE_RATE * 4)
    be = FileAudioBackend(audio, samplerate=SAMPLE_RATE, loop=False)
    with Microphone(backend=be) as mic:
        time.sleep(0.5)  # a slow caller: ~20 blocks wait
        blocks = mic.read_blocks(max_blocks=3, timeout=0.1)
        dropped = mic.stats.dropped_samples
        world = be.position
    assert len(blocks) == 3
    assert dropped >= 12 * SAMPLES_PER_FRAME
    newest = blocks[-1].samples[-1] * SAMPLE_RATE * 4
    assert world - SAMPLES_PER_FRAME - 200 <= newest <= world  # the newest audio, not the oldest
    np.testing.assert_allclose(np.diff(np.concatenate([b.samples for b in blocks])), 1 / (SAMPLE_RATE * 4), atol=1e-7)


def test_read_block_hands_out_every_block_in_order():
    audio = np.arange(SAMPLE_RATE * 2, dtype=np.float32) / (SAMPLE_RATE * 2)
    be = FileAudioBackend(audio, samplerate=SAMPLE_RATE, loop=False)
    with Microphone(backend=be) as mic:
        time.sleep(0.3)  # a backlog: read_block still takes the oldest first
        blocks = [mic.read_block(timeout=0.5) for _ in range(20)]
        assert mic.stats.dropped_samples == 0
    got = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(got, audio[:got.size], atol=1e-7)
    assert all(b.samples.shape == (SAMPLES_PER_FRAME,) and b.samples.dtype == np.float32 for b in blocks)
    assert np.all(np.diff([b.captured_at for b in blocks]) > 0)


@pytest.mark.parametrize("fail_mode", ["error", "silent"])
def test_device_loss_gives_silence_then_recovers(fail_mode, caplog):
    caplog.set_level(logging.INFO)
    audio = 0.3 * np.sin(np.arange(SAMPLE_RATE) * 0.05).astype(np.float32)
    be = FileAudioBackend(audio, samplerate=SAMPLE_RATE, fail_mode=fail_mode)
    got = []
    with Microphone(backend=be, retry_every_s=0.2, stall_timeout_s=0.15) as mic:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            el = time.monotonic() - t0
            if 0.5 <= el < 1.2:
                be.unplug()
            elif el >= 1.2:
                be.replug()
            for b in mic.read_blocks(max_blocks=8, timeout=0.1):
                got.append((time.monotonic() - t0, b.live, float(np.abs(b.samples).max())))
        assert mic.stats.losses == 1 and mic.stats.reconnects == 1 and mic.connected
    t = np.array([g[0] for g in got])
    live = np.array([g[1] for g in got])
    peak = np.array([g[2] for g in got])
    assert 76 <= len(got) <= 82  # a block every 25 ms all along, lost or not
    assert not live[(t > 0.75) & (t < 1.2)].any() and (peak[~live] == 0).all()
    assert live[t > 1.5].all() and (peak[t > 1.5] > 0.1).all()
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1  # said once, not per block or per retry


def test_no_device_and_bad_names_list_what_exists():
    be = FileAudioBackend(np.zeros(100, np.float32), samplerate=SAMPLE_RATE)
    assert find_device(None, backend=be).name == "File Microphone"
    assert find_device("file mic", backend=be).index == 0
    assert find_device(0, backend=be).index == 0 and find_device("0", backend=be).index == 0
    with pytest.raises(AvatarError, match=r"no input device matches 'USB'.*0 'File Microphone'"):
        find_device("USB", backend=be)
    with pytest.raises(AvatarError, match=r"no input device with index 7.*'File Microphone'"):
        find_device(7, backend=be)
    with pytest.raises(AvatarError, match="no input device with index 1"):
        find_device(1, backend=be)  # the output is not a microphone
    be.unplug()
    with pytest.raises(AvatarError, match="no microphone found"):
        Microphone(backend=be).open()


def test_several_matches_ask_for_the_index():
    class Two(FileAudioBackend):
        def devices(self):
            return [AudioDevice(3, "USB Mic (hw:1,0)", "ALSA", 1, 0, 48_000),
                    AudioDevice(7, "USB Mic", "PulseAudio", 2, 0, 44_100)]

    be = Two(np.zeros(10, np.float32), samplerate=SAMPLE_RATE)
    assert find_device("usb mic", backend=be).index == 7  # an exact name wins
    with pytest.raises(AvatarError, match=r"2 input devices match 'USB'.*3 'USB Mic \(hw:1,0\)'.*give the index"):
        find_device("USB", backend=be)


def test_sounddevice_without_a_sound_card_is_a_clear_error():
    be = SoundDeviceBackend()
    if list_input_devices(backend=be):
        pytest.skip("this machine has a microphone")
    with pytest.raises(AvatarError, match="no microphone found"):
        Microphone(backend=be).open()


# ---- delayed mic --------------------------------------------------------------------------------

def test_delayed_mic_plays_the_voice_delay_after_capture():
    rng = np.random.default_rng(3)
    audio = (0.2 * rng.standard_normal(SAMPLE_RATE * 4)).astype(np.float32)
    be = FileAudioBackend(audio, samplerate=SAMPLE_RATE, blocksize=160)
    delay = 0.120
    with DelayedMic("File Output", backend=be, delay_s=delay) as out, \
            Microphone(backend=be, tap=out.push) as mic:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            mic.read_blocks(max_blocks=100, timeout=0.1)
            time.sleep(0.05)  # a render cycle: pushes come in bursts
    played = np.concatenate([blk for _, blk in be.played])
    start = be.played[0][0]
    # locate the world's audio in what was played: the lag tells when each sample played
    probe = played[int(0.9 * SAMPLE_RATE):int(1.2 * SAMPLE_RATE)]
    corr = np.correlate(audio[:int(1.4 * SAMPLE_RATE)], probe, mode="valid")
    world_index = int(np.argmax(corr))  # world sample played at probe's first sample
    played_at = start + 0.9
    captured_at = be.capture_time(world_index)
    assert corr.max() > 0.9 * np.dot(probe, probe)
    assert played_at - captured_at == pytest.approx(delay, abs=0.025)
