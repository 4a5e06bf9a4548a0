"""Media I/O: streaming audio reading (any format -> 16 kHz mono blocks) and the mp4 writer.

Test media are made here with ffmpeg (apt) from the bundled voice and from numpy sines, so every
expected number is known: durations, frequencies, levels.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from avatar.constants import FPS, FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError
from avatar.media import VideoWriter, is_silent, open_audio

ROOT = Path(__file__).resolve().parents[1]
VOICE = ROOT / "avatar" / "assets" / "voice.wav"

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="needs the ffmpeg and ffprobe command-line tools to make and probe test media")

# (name, ffmpeg output options): the formats users bring, at rates/channel counts that force
# resampling and downmixing.
FORMATS = {
    "mp3_44k_stereo.mp3": ["-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "192k"],
    "flac_48k.flac": ["-ar", "48000", "-c:a", "flac"],
    "aac_44k.m4a": ["-ar", "44100", "-c:a", "aac", "-b:a", "160k"],
    "vorbis_44k.ogg": ["-ar", "44100", "-c:a", "libvorbis", "-q:a", "6"],
    "opus_48k.opus": ["-ar", "48000", "-c:a", "libopus", "-b:a", "96k"],
    "wav_8k.wav": ["-ar", "8000", "-ac", "1", "-c:a", "pcm_s16le"],
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """samples: (n,) or (n, channels) float in [-1, 1], written as 16-bit PCM."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def read_all(path) -> tuple[np.ndarray, object]:
    with open_audio(path) as audio:
        blocks = list(audio.blocks())
    for block in blocks:
        assert block.shape == (SAMPLES_PER_FRAME,) and block.dtype == np.float32
    signal = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return signal, audio


def voice_16k() -> np.ndarray:
    with wave.open(str(VOICE)) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 800) -> tuple[float, int]:
    """Highest normalised correlation of a and b over lags |lag| <= max_lag, and that lag."""
    n = min(len(a), len(b)) - 2 * max_lag
    ref = b[max_lag:max_lag + n]
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        seg = a[max_lag + lag:max_lag + lag + n]
        c = float(np.dot(seg, ref) / (np.linalg.norm(seg) * np.linalg.norm(ref) + 1e-12))
        best = max(best, (c, lag))
    return best


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The voice and a 440 Hz sine (3 s, amplitude 0.5) in every format of FORMATS."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs the ffmpeg command-line tool to make test media")
    d = tmp_path_factory.mktemp("media")
    tone = sine(440, 3.0, 44100)
    write_wav(d / "sine_mono.wav", tone, 44100)
    # The stereo file gets the tone at full level in both channels (ffmpeg's own upmix would
    # lower it by 3 dB), so every file's downmix should come back at amplitude 0.5.
    write_wav(d / "sine_stereo.wav", np.stack([tone, tone], axis=1), 44100)
    for name, opts in FORMATS.items():
        ffmpeg("-i", str(VOICE), *opts, str(d / f"voice_{name}"))
        source = d / ("sine_stereo.wav" if "stereo" in name else "sine_mono.wav")
        ffmpeg("-i", str(source), *opts, str(d / f"sine_{name}"))
    return d


# --- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
def test_voice_in_any_format_reads_as_the_same_16k_signal(media, name):
    ref = voice_16k()
    signal, audio = read_all(media / f"voice_{name}")
    # Block count is ceil(samples / block) and the padding is zeros.
    assert len(signal) == math.ceil(audio.samples_read / SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
    assert not signal[audio.samples_read:].any()
    # Length matches the source within one block (AAC/Opus add a few priming/padding samples).
    assert abs(audio.samples_read - len(ref)) <= SAMPLES_PER_FRAME
    assert audio.duration_s == pytest.approx(len(ref) / SAMPLE_RATE, abs=0.03)
    # Same waveform: lossy codecs keep speech highly correlated, at (almost) no delay.
    corr, lag = best_correlation(signal[:audio.samples_read], ref)
    assert corr > 0.95, (corr, lag)
    assert abs(lag) <= 2, lag


@pytest.mark.parametrize("name", FORMATS)
def test_sine_keeps_its_pitch_and_level(media, name):
    signal, audio = read_all(media / f"sine_{name}")
    x = signal[:audio.samples_read]
    assert audio.samples_read == pytest.approx(3.0 * SAMPLE_RATE, abs=SAMPLES_PER_FRAME)
    assert audio.source_rate == {"wav_8k.wav": 8000, "flac_48k.flac": 48000, "opus_48k.opus": 48000}.get(name, 44100)
    assert audio.source_channels == (2 if "stereo" in name else 1)
    window = x[4000:-4000] * np.hanning(len(x) - 8000)  # away from codec onset/offset transients
    spectrum = np.abs(np.fft.rfft(window, n=16 * len(window)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / (16 * len(window))
    assert peak_hz == pytest.approx(440.0, abs=1.0)
    # Level: 0.5 amplitude -> RMS 0.354; a stereo copy of it downmixes to the same level.
    rms = float(np.sqrt(np.mean(x[4000:-4000] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_exact_samples_and_zero_padding_for_16k_wav(tmp_path):
    n = 3 * SAMPLES_PER_FRAME + 34
    x = sine(300, n / SAMPLE_RATE, SAMPLE_RATE, 0.8)
    signal, audio = read_all(write_wav(tmp_path / "a.wav", x, SAMPLE_RATE))
    assert audio.samples_read == n and len(signal) == 4 * SAMPLES_PER_FRAME
    np.testing.assert_allclose(signal[:n], x, atol=1.5 / 32768)  # int16 quantisation only
    assert not signal[n:].any()
    assert (audio.source_rate, audio.source_channels, audio.codec) == (16000, 1, "pcm_s16le")


def test_custom_block_size(tmp_path):
    with open_audio(write_wav(tmp_path / "a.wav", sine(200, 1.0, 22050), 22050)) as audio:
        sizes = [len(b) for b in audio.blocks(1000)]
    assert sizes == [1000] * 16 and audio.samples_read == 16000


def test_surround_downmix_does_not_clip(tmp_path):
    # 5.1 with the same full-scale sine in every channel: a naive sum would peak at 3-4x.
    path = tmp_path / "surround.wav"
    write_wav(path, np.repeat(sine(440, 1.0, 48000, 0.9)[:, None], 6, axis=1), 48000)
    signal, audio = read_all(path)
    assert audio.source_channels == 6
    assert np.abs(signal).max() == pytest.approx(0.9, abs=0.02)


@needs_ffmpeg
def test_audio_track_of_a_video(tmp_path):
    path = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-f", "lavfi", "-i", "sine=f=440:r=44100",
           "-t", "2", "-c:v", "libx264", "-c:a", "aac", str(path))
    signal, audio = read_all(path)
    assert audio.codec == "aac"
    assert audio.samples_read == pytest.approx(2 * SAMPLE_RATE, abs=SAMPLES_PER_FRAME)


def test_silence_is_not_an_error(tmp_path):
    signal, audio = read_all(write_wav(tmp_path / "quiet.wav", np.zeros(8000), 16000))
    assert audio.samples_read == 8000 and not signal.any()
    assert is_silent(signal[:400]) and not is_silent(np.full(400, 0.01, np.float32))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from Linux's /proc/self/status")
def test_constant_memory_for_a_ten_minute_file(tmp_path):
    # 10 min of 44.1 kHz stereo: 106 MB as int16, 38 MB even as 16 kHz mono float32, so a reader
    # that held the file or its blocks would blow through the 16 MB allowed here.
    path = tmp_path / "long.wav"
    second = (sine(440, 1.0, 44100) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(44100)
        chunk = np.repeat(second[:, None], 2, axis=1).tobytes()
        for _ in range(600):
            w.writeframes(chunk)
    # VmHWM (peak RSS of this process image) rather than getrusage's ru_maxrss, which Linux carries
    # over exec from the parent: under pytest it starts at pytest's own peak and hides any growth.
    script = (
        "import sys\n"
        "from avatar.media import open_audio\n"
        "def peak_mb():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "with open_audio(sys.argv[1]) as a:\n"
        "    it = a.blocks(); [next(it) for _ in range(100)]\n"
        "    base = peak_mb(); n = 100 + sum(1 for _ in it)\n"
        "print(n, a.samples_read, peak_mb() - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.split()
    blocks, samples, growth_mb = int(out[0]), int(out[1]), float(out[2])
    assert blocks == 600 * FPS and samples == 600 * SAMPLE_RATE
    assert growth_mb < 16, f"peak RSS grew {growth_mb:.1f} MB while streaming"


# --- reading errors ----------------------------------------------------------------------------

def assert_one_line_error(path, *fragments: str) -> None:
    with pytest.raises(AvatarError) as err:
        with open_audio(path) as audio:
            for _ in audio.blocks():
                pass
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.wav", "not found", "nope.wav")


def test_text_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples\n" * 50)
    assert_one_line_error(path, "not a readable audio", "notes.wav")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp3"
    path.touch()
    assert_one_line_error(path, "empty", "empty.mp3")


def test_folder(tmp_path):
    assert_one_line_error(tmp_path, "folder")


def test_zero_sample_wav(tmp_path):
    assert_one_line_error(write_wav(tmp_path / "none.wav", np.zeros(0), 16000), "no audio samples", "none.wav")


@needs_ffmpeg
def test_video_without_audio(tmp_path):
    path = tmp_path / "silent_film.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "1", "-c:v", "libx264", str(path))
    assert_one_line_error(path, "has no audio track", "silent_film.mp4")


def test_damaged_middle_names_file_and_time(media, tmp_path):
    data = bytearray((media / "voice_mp3_44k_stereo.mp3").read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 2000):  # scramble ~0.1 s of frames in the middle
        data[i] = (data[i] * 7 + 13) % 256
    path = tmp_path / "damaged.mp3"
    path.write_bytes(bytes(data))
    with pytest.raises(AvatarError) as err:
        with open_audio(path) as audio:
            for _ in audio.blocks():
                pass
    message = str(err.value)
    assert "damaged.mp3" in message and "damaged at 0:0" in message and "\n" not in message
    seconds = float(message.split("damaged at 0:")[1][:6])
    assert 3.0 < seconds < 5.5, message  # the damage is at about half of 8.5 s


# --- writing -------------------------------------------------------------------------------------

def test_frames(n: int, size: int = FRAME_SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    return [np.roll(base, i, axis=1) for i in range(n)]


test_frames.__test__ = False  # a helper, not a test


@needs_ffmpeg
def test_writer_makes_h264_at_40fps_with_aac_of_the_right_length(tmp_path):
    n = 80  # 2.0 s of video; the audio is exactly as long
    audio = write_wav(tmp_path / "two_seconds.wav", np.stack([sine(440, 2.0, 44100), sine(660, 2.0, 44100)], 1), 44100)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, audio_path=audio) as writer:
        for frame in test_frames(n):
            writer.write(frame)
    info = probe(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    sound = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert (video["codec_name"], video["width"], video["height"], video["pix_fmt"]) == ("h264", 512, 512, "yuv420p")
    assert video["avg_frame_rate"] == "40/1" and video["r_frame_rate"] == "40/1"
    assert int(video["nb_frames"]) == n
    assert float(video["duration"]) == pytest.approx(n / FPS, abs=1e-6)
    assert (sound["codec_name"], int(sound["sample_rate"]), sound["channels"]) == ("aac", 44100, 2)
    # The spec allows one frame (25 ms); the edit list makes it exact, so hold it to 2 ms.
    assert float(sound["duration"]) == pytest.approx(n / FPS, abs=0.002)
    assert float(info["format"]["duration"]) == pytest.approx(n / FPS, abs=0.002)


@needs_ffmpeg
def test_writer_keeps_the_whole_audio_when_it_is_a_little_shorter(tmp_path):
    # The render writes ceil(samples / 400) frames: the voice (8.495 s) gets 340 frames (8.5 s).
    out = tmp_path / "voice.mp4"
    with VideoWriter(out, audio_path=VOICE) as writer:
        frame = test_frames(1)[0]
        for _ in range(340):
            writer.write(frame)
    sound = next(s for s in probe(out)["streams"] if s["codec_type"] == "audio")
    assert int(sound["sample_rate"]) == 16000 and sound["channels"] == 1
    assert float(sound["duration"]) == pytest.approx(8.495, abs=1 / FPS)


@pytest.mark.parametrize("source", ["voice_wav_8k.wav", "voice_mp3_44k_stereo.mp3", "voice_flac_48k.flac"])
def test_muxed_audio_starts_with_the_first_frame(media, tmp_path, source):
    # Lip sync: the AAC priming delay must be hidden by the edit list, so the audio decoded back
    # from the mp4 lines up with the source at lag 0 (one 16 kHz sample allowed).
    out = tmp_path / "sync.mp4"
    with VideoWriter(out, size=64, audio_path=media / source) as writer:
        for frame in test_frames(340, size=64):
            writer.write(frame)
    signal, audio = read_all(out)
    corr, lag = best_correlation(signal[:audio.samples_read], voice_16k())
    assert corr > 0.97 and abs(lag) <= 1, (corr, lag)


def test_writer_interleaves_audio_with_video(tmp_path):
    # Packets in file order: audio never runs more than half a second ahead of or behind video.
    # 15 s, because libavformat's own interleaving queue hides a writer that held the audio back
    # for up to 10 s (and buffers that much video in memory meanwhile). Small frames keep it fast.
    out = tmp_path / "out.mp4"
    audio = write_wav(tmp_path / "a.wav", sine(440, 15.0, 48000), 48000)
    with VideoWriter(out, size=64, audio_path=audio) as writer:
        for frame in test_frames(15 * FPS, size=64):
            writer.write(frame)
    last = {"video": 0.0, "audio": 0.0}
    worst = 0.0
    with av.open(str(out)) as container:
        for packet in container.demux():
            if packet.dts is None:
                continue
            last[packet.stream.type] = float(packet.dts * packet.time_base)
            worst = max(worst, abs(last["video"] - last["audio"]))
    assert worst < 0.5, worst


def test_writer_colours_round_trip(tmp_path):
    # BT.709 conversion and tags agree: a decoder gets the colours back within 3 levels.
    colours = [(200, 30, 60), (20, 180, 90), (240, 240, 240), (10, 10, 10), (90, 60, 220)]
    out = tmp_path / "colours.mp4"
    with VideoWriter(out) as writer:
        for colour in colours:
            for _ in range(4):
                writer.write(np.full((FRAME_SIZE, FRAME_SIZE, 3), colour, np.uint8))
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24")[256, 256].astype(int) for f in container.decode(video=0)]
    assert len(decoded) == 20
    for i, colour in enumerate(colours):
        assert np.abs(decoded[4 * i + 3] - colour).max() <= 3, (colour, decoded[4 * i + 3])


@needs_ffmpeg
def test_metadata_survive(tmp_path):
    out = tmp_path / "tagged.mp4"
    tags = {"title": "VASA Avatar render", "comment": "AI-generated talking portrait", "ai_generated": "true",
            "generator": "vasa-avatar 0.1.0; seed=7", "encoder": "vasa-avatar 0.1.0"}
    with VideoWriter(out, metadata=tags) as writer:
        for frame in test_frames(4):
            writer.write(frame)
    found = probe(out)["format"]["tags"]
    for key in ("title", "comment", "ai_generated", "generator"):
        assert found.get(key) == tags[key], (key, found)
    # libavformat stamps its own "encoder"; ours is kept under "encoded_by".
    assert found.get("encoded_by") == tags["encoder"]


def test_exception_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "render.mp4"
    out.write_bytes(b"previous render")
    with pytest.raises(RuntimeError, match="engine failed"):
        with VideoWriter(out, audio_path=VOICE) as writer:
            for frame in test_frames(10):
                writer.write(frame)
            raise RuntimeError("engine failed")
    assert out.read_bytes() == b"previous render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]

    fresh = tmp_path / "fresh.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(fresh) as writer:
            writer.write(test_frames(1)[0])
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]


def _top_level_boxes(data: bytes) -> list[bytes]:
    boxes, at = [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        if size == 1:
            size = int.from_bytes(data[at + 8:at + 16], "big")
        boxes.append(data[at + 4:at + 8])
        if size < 8:
            break
        at += size
    return boxes


def test_writer_holds_one_fragment_while_writing_and_leaves_a_classic_mp4(tmp_path):
    # Memory flat in the length: while frames arrive the file grows fragment by fragment (the muxer
    # keeps one fragment's sample index, not every sample's); closed, it is a classic mp4 with its
    # index first, and the fragments are gone.
    out = tmp_path / "out.mp4"
    audio = write_wav(tmp_path / "a.wav", sine(440, 20.0, 48000), 48000)
    with VideoWriter(out, size=64, audio_path=audio) as writer:
        for frame in test_frames(20 * FPS, size=64):
            writer.write(frame)
        writing = _top_level_boxes(writer.tmp_path.read_bytes())
        assert writing.count(b"moof") >= 2, writing  # x264 puts a keyframe every 250 frames at most
    final = _top_level_boxes(out.read_bytes())
    assert b"moof" not in final and final.index(b"moov") < final.index(b"mdat"), final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]


def test_successful_close_replaces_the_old_file(tmp_path):
    out = tmp_path / "render.mp4"
    out.write_bytes(b"previous render")
    with VideoWriter(out) as writer:
        for frame in test_frames(3):
            writer.write(frame)
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]


def test_wrong_frame_is_named_and_aborts_cleanly(tmp_path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=r"\(512, 512, 3\) uint8 RGB array, got \(256, 256, 3\) uint8"):
        with VideoWriter(out) as writer:
            writer.write(np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(ValueError, match="got \\(512, 512, 3\\) float32"):
        with VideoWriter(out) as writer:
            writer.write(np.zeros((512, 512, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_user_errors(tmp_path):
    with pytest.raises(AvatarError, match="output folder does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4")
    with pytest.raises(AvatarError, match="must end in"):
        VideoWriter(tmp_path / "out.gif")
    with pytest.raises(AvatarError, match="not found"):
        VideoWriter(tmp_path / "out.mp4", audio_path=tmp_path / "nope.wav")
    assert list(tmp_path.iterdir()) == []  # a failed constructor leaves no temp file behind


def test_steady_heap_reuses_freed_frames_without_faults_or_growth():
    """Per-frame blocks (the decoder's 2.4 MB head window, a 768 KiB frame) must come back from the
    heap, not as fresh pages faulted in every frame (~780 faults a round with glibc's 128 KiB
    threshold, measured), and the freed space must be reused: batches of frames with small blocks
    that outlive them in between must not grow the process beyond those small blocks. In a fresh
    process, so the heap starts as a render's does."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    script = """
import resource
import numpy as np
from avatar.memory import steady_heap
assert steady_heap()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
for _ in range(5):
    np.ones(448 * 448 * 3, np.float32)
before = faults()
for _ in range(200):  # one frame's worth of big temporaries, freed
    window, frame = np.ones(448 * 448 * 3, np.float32), np.ones((512, 512, 3), np.uint8)
    del window, frame
per_round = (faults() - before) / 200
kept = []
def batch():  # 30 MiB of frames, each followed by a 16 KiB block that outlives it
    frames = []
    for _ in range(40):
        frames.append(np.ones((512, 512, 3), np.uint8))
        kept.append(np.ones(16384, np.uint8))
batch()
start = resident_mb()
for _ in range(5):
    batch()
print(per_round, resident_mb() - start)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    per_round, grown = (float(v) for v in out.split())
    assert per_round < 20
    # the 200 small survivors are 3.1 MiB; frames that found no freed hole would be 150 MiB
    assert grown < 6
