"""Media files for the offline render: streaming audio in, H.264 + AAC mp4 out (PyAV / FFmpeg).

Memory is constant in the file's length on both sides: audio is decoded packet by packet and
handed out in frame-sized blocks; the writer encodes each video frame as it arrives and pulls just
enough source audio to keep the two streams interleaved.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from avatar.constants import FPS, FRAME_SIZE, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

# Sample rates the AAC encoder accepts (MPEG-4 sampling frequency index table).
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AAC_FALLBACK_RATE = 48000
AAC_BIT_RATE = {1: 96_000, 2: 160_000}  # bits/s per layout; speech and music both sound clean

# Muxer per output suffix: mp4 is the product; mov/mkv cost nothing to allow.
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# mp4/mov are written in two passes. During the render: fragments, one per keyframe, so the muxer
# holds the sample index of one fragment only. A classic mp4 keeps every sample's size and offset
# until it writes the index at the end: measured here, the writer thread's heap grew ~0.6 MB per
# minute of video (benchmarks/results/render-memory-classic-writer.json). At close, a stream copy
# into a classic mp4 (index first: faststart), which players, editors and file browsers all read,
# with the exact durations (the AAC edit list) that a fragmented file cannot carry.
FRAGMENTED_FLAGS = "+frag_keyframe+delay_moov+default_base_moof"
CLASSIC_FLAGS = "+faststart+use_metadata_tags"

# x264 settings, measured on the 2-core target writing 512x512 astronaut frames with small whole-
# frame motion (a worst case: the real background is still), AAC muxed, median of 3 runs:
#   CPU ms/frame  ultrafast 5.4 (4.8 Mbit/s) | superfast 7.4 (1.1 Mbit/s) | veryfast 8.9 (0.57 Mbit/s)
# With a 10 ms/frame decoder stand-in on the render thread and the encoder on its own thread,
# superfast/1 thread kept the render at the decoder's pace (11 ms/frame); veryfast was 11-14 ms
# and suffered most when another process took a core. One x264 thread leaves the other core to
# the engines; auto threads (3 on 2 cores) only added contention. CRF 20 looks clean at 512x512.
DEFAULT_CRF = 20
DEFAULT_PRESET = "superfast"
DEFAULT_THREADS = 1


def _media_error(path: Path, exc: BaseException) -> AvatarError:
    reason = getattr(exc, "strerror", None) or str(exc)
    return AvatarError(f"{path} is not a readable audio/video file ({reason}); "
                       "use wav, flac, mp3, m4a, ogg or a video with sound")


def _open_input_audio(path: Path) -> tuple[av.container.InputContainer, av.audio.stream.AudioStream]:
    """Open `path` and return its container and first audio stream, or raise a one-line AvatarError."""
    if not path.exists():
        raise AvatarError(f"audio file not found: {path}")
    if path.is_dir():
        raise AvatarError(f"{path} is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AvatarError(f"{path} is empty (0 bytes); give an audio file with speech in it")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _media_error(path, exc) from None
    if not container.streams.audio:
        container.close()
        raise AvatarError(f"{path} has no audio track; give a file with sound")
    stream = container.streams.audio[0]
    if stream.codec_context is None or stream.codec_context.sample_rate <= 0:
        container.close()
        raise AvatarError(f"{path}: its audio track cannot be decoded (unknown codec or sample rate)")
    return container, stream


def _stream_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _mix_matrix(channels: tuple[str, ...], out_channels: int) -> np.ndarray:
    """(out_channels, len(channels)) downmix weights, each row summing to 1 so nothing clips.

    Left-side channels feed the left output, right-side ones the right, centre (and unknown)
    channels both at -3 dB; LFE is dropped unless it is all there is. Mono takes every channel.
    Done here rather than by swresample, whose float downmix is unnormalised (a 5.1 file came out
    at 3.4x full scale) and whose normalising option needs a recent PyAV.
    """
    weights = np.zeros((out_channels, len(channels)), dtype=np.float32)
    for i, name in enumerate(channels):
        if name.startswith("LFE") and len(channels) > 1:
            continue
        if out_channels == 1:
            weights[0, i] = 1.0
        elif name.endswith(("L", "LC")) and "R" not in name:
            weights[0, i] = 1.0
        elif name.endswith(("R", "RC")):
            weights[1, i] = 1.0
        else:
            weights[:, i] = np.sqrt(0.5)
    sums = weights.sum(axis=1, keepdims=True)
    if np.any(sums == 0):  # e.g. a layout of unnamed channels routed nowhere: share them equally
        weights[:] = 1.0
        sums = weights.sum(axis=1, keepdims=True)
    return weights / sums


class _Decoder:
    """Decodes one audio stream packet by packet into planar float32 arrays at a fixed rate.

    Yields (channels, n) arrays already mixed down to `out_channels`. Handles a change of
    source format mid-stream (some mp3/ogg chains do this) by flushing the resampler and
    starting a new one, which AudioResampler itself refuses to do.
    """

    def __init__(self, path: Path, container, stream, *, rate: int, out_channels: int):
        self.path, self.container, self.stream = path, container, stream
        self.rate, self.out_channels = rate, out_channels
        self.resampler: av.AudioResampler | None = None
        self.samples_out = 0  # samples at `rate` produced so far, for error positions
        self._weights: dict[tuple[str, ...], np.ndarray] = {}

    def _resample(self, frame) -> list:
        # Keep the source layout: the mix to mono/stereo is ours (see _mix_matrix).
        if self.resampler is None:
            self.resampler = av.AudioResampler(format="fltp", rate=self.rate)
        try:
            return self.resampler.resample(frame)
        except ValueError:  # source format changed: drain the old graph, start a new one
            out = self.resampler.resample(None)
            self.resampler = av.AudioResampler(format="fltp", rate=self.rate)
            return out + self.resampler.resample(frame)

    def _mix(self, frame) -> np.ndarray:
        planes = frame.to_ndarray()  # (channels, n) float32 for fltp
        if planes.shape[0] == self.out_channels and planes.shape[0] <= 2:
            return planes  # mono to mono, stereo to stereo: untouched
        names = tuple(channel.name for channel in frame.layout.channels) or ("FC",) * planes.shape[0]
        if names not in self._weights:
            self._weights[names] = _mix_matrix(names, self.out_channels)
        return self._weights[names] @ planes

    def arrays(self) -> Iterator[np.ndarray]:
        """Yields (out_channels, n) float32 arrays until the end of the stream, resampler flushed."""
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
                decoded = packet.decode()
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                minutes, ms = divmod(round(self.samples_out * 1000 / self.rate), 60_000)
                raise AvatarError(f"{self.path}: the audio is damaged at {minutes}:{ms / 1000:06.3f} "
                                  f"({getattr(exc, 'strerror', exc)}); re-export or trim the file") from None
            for frame in decoded:
                for out in self._resample(frame):
                    self.samples_out += out.samples
                    yield self._mix(out)
        if self.resampler is not None:
            for out in self.resampler.resample(None):
                self.samples_out += out.samples
                yield self._mix(out)


class AudioFile:
    """An audio (or video) file read as a stream of mono float32 blocks at SAMPLE_RATE.

    Use through `open_audio(path)`. Attributes: `duration_s` (float or None when the container does
    not say), `source_rate` (Hz), `source_channels`, `codec` (decoder name), `samples_read` (16 kHz
    samples handed out so far, excluding the final block's zero padding).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.container, self.stream = _open_input_audio(self.path)
        ctx = self.stream.codec_context
        self.duration_s = _stream_duration(self.container, self.stream)
        self.source_rate: int = ctx.sample_rate
        self.source_channels: int = ctx.channels
        self.codec: str = ctx.name
        self.samples_read = 0
        self._started = False

    def blocks(self, block: int = SAMPLES_PER_FRAME) -> Iterator[np.ndarray]:
        """Yields (block,) float32 mono blocks at SAMPLE_RATE; the last one zero-padded.

        The number of blocks is ceil(total samples / block). Raises AvatarError when the stream
        decodes to no samples at all. Can be iterated once.
        """
        if block <= 0:
            raise ValueError(f"block must be a positive sample count, got {block}")
        if self._started:
            raise RuntimeError("AudioFile.blocks() can be iterated once; open the file again")
        self._started = True
        decoder = _Decoder(self.path, self.container, self.stream, rate=SAMPLE_RATE, out_channels=1)
        pending = np.zeros(0, dtype=np.float32)  # < block samples carried between decoded frames
        for mixed in decoder.arrays():
            samples = mixed[0]
            if pending.size:
                samples = np.concatenate([pending, samples])
            whole = samples.size - samples.size % block
            for start in range(0, whole, block):
                self.samples_read += block
                yield samples[start:start + block].copy()
            pending = samples[whole:].copy()
        if pending.size:
            self.samples_read += pending.size
            yield np.concatenate([pending, np.zeros(block - pending.size, dtype=np.float32)])
        if self.samples_read == 0:
            raise AvatarError(f"{self.path} contains no audio samples; give a file with speech in it")

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_audio(path: str | os.PathLike) -> AudioFile:
    """Opens any audio FFmpeg decodes (or a video's sound) for streaming 16 kHz mono reading."""
    return AudioFile(path)


def is_silent(block: np.ndarray, *, threshold_db: float = -60.0) -> bool:
    """True when the block's RMS level is below `threshold_db` dBFS (digital silence or near it)."""
    rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if block.size else 0.0
    return rms <= 10 ** (threshold_db / 20)


class VideoWriter:
    """Writes RGB frames to an H.264 (yuv420p) file at exactly `fps`, with the source audio muxed in.

    with VideoWriter("out.mp4", audio_path="talk.wav", metadata={"title": "..."}) as w:
        w.write(frame)  # (size, size, 3) uint8 RGB

    Frame n has pts n in time base 1/fps. Audio from `audio_path` is re-encoded to AAC and
    interleaved as frames arrive; at close the rest of it, to its end, is written. The file is
    written under a temporary name next to `path` and renamed over it only when closed without
    an error, so a failed render never leaves a partial file nor clobbers an existing one.
    """

    def __init__(self, path: str | os.PathLike, *, fps: int = FPS, size: int = FRAME_SIZE,
                 audio_path: str | os.PathLike | None = None, metadata: dict[str, str] | None = None,
                 crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET, threads: int = DEFAULT_THREADS):
        self.path = Path(path)
        self.fps, self.size = int(fps), int(size)
        if self.fps <= 0 or self.size <= 0 or self.size % 2:
            raise ValueError(f"fps must be positive and size a positive even number, got fps={fps} size={size}")
        fmt = OUTPUT_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise AvatarError(f"cannot write {self.path.name}: the output name must end in "
                              f"{', '.join(OUTPUT_FORMATS)} (e.g. talk.mp4)")
        parent = self.path.parent
        if not parent.is_dir():
            raise AvatarError(f"output folder does not exist: {parent}; create it or choose another -o path")
        if self.path.is_dir():
            raise AvatarError(f"{self.path} is a folder; give a file name such as {self.path / 'talk.mp4'}")
        self.frames = 0
        self._checked = False
        self._closed = False
        self._audio: _AudioMux | None = None
        # Temp name keeps the suffix so FFmpeg and users see what it is; hidden, unique per writer.
        self.tmp_path = parent / f".{self.path.stem}.{uuid.uuid4().hex[:8]}.part{self.path.suffix}"

        self._format = fmt
        self._fragmented = fmt in ("mp4", "mov")
        self._metadata: dict[str, str] = {}
        self._copy_path = parent / f".{self.path.stem}.{uuid.uuid4().hex[:8]}.copy{self.path.suffix}"
        options = {"movflags": FRAGMENTED_FLAGS} if self._fragmented else {}
        try:
            self.container = av.open(str(self.tmp_path), mode="w", format=fmt, options=options)
        except av.error.FFmpegError as exc:
            raise AvatarError(f"cannot write {self.path}: {getattr(exc, 'strerror', exc)}") from None
        try:
            for key, value in (metadata or {}).items():
                # libavformat overwrites "encoder" with its own version string at the header, so a
                # caller's value would be lost silently: keep it under FFmpeg's "encoded_by" tag.
                key = "encoded_by" if key == "encoder" else str(key)
                self.container.metadata[key] = self._metadata[key] = str(value)
            self.video = self.container.add_stream("libx264", rate=self.fps)
            ctx = self.video.codec_context
            ctx.width = ctx.height = self.size
            ctx.pix_fmt = "yuv420p"
            ctx.time_base = Fraction(1, self.fps)
            self.video.time_base = Fraction(1, self.fps)
            # Tag what we convert with (BT.709, limited range) so players do not guess.
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # AVCOL_*_BT709
            ctx.color_range = 1  # AVCOL_RANGE_MPEG
            ctx.thread_count = threads
            ctx.options = {"crf": str(crf), "preset": preset}
            if audio_path is not None:
                self._audio = _AudioMux(Path(audio_path), self.container)
        except BaseException:
            self._discard()
            raise

    def write(self, frame: np.ndarray) -> None:
        """Encodes one (size, size, 3) uint8 RGB frame at the next pts."""
        if not self._checked:
            shape = (self.size, self.size, 3)
            if not isinstance(frame, np.ndarray) or frame.shape != shape or frame.dtype != np.uint8:
                got = (f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__)
                raise ValueError(f"VideoWriter.write expects a {shape} uint8 RGB array, got {got}")
            self._checked = True
        rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        yuv = rgb.reformat(format="yuv420p", src_colorspace="ITU709", dst_colorspace="ITU709",
                           src_color_range="JPEG", dst_color_range="MPEG")
        yuv.pts = self.frames
        yuv.time_base = self.video.codec_context.time_base
        with self._io_errors():
            self.container.mux(self.video.encode(yuv))
            self.frames += 1
            if self._audio is not None:
                # Keep audio just ahead of the video written so far so the muxer interleaves.
                self._audio.write_until((self.frames + 1) / self.fps)

    def close(self) -> None:
        """Flushes both encoders, finishes the file and moves it to `path`."""
        if self._closed:
            return
        try:
            with self._io_errors():
                self.container.mux(self.video.encode(None))
                if self._audio is not None:
                    self._audio.write_until(math.inf)
                    self._audio.close()
                self.container.close()
                self._closed = True
                if self._fragmented:
                    self._defragment()
                os.replace(self._copy_path if self._fragmented else self.tmp_path, self.path)
                self.tmp_path.unlink(missing_ok=True)
        except BaseException:
            self._discard()
            raise

    def _defragment(self) -> None:
        """The fragmented file -> a classic one, packets copied as they are (no re-encoding)."""
        with av.open(str(self.tmp_path)) as source, av.open(str(self._copy_path), mode="w", format=self._format,
                                                             options={"movflags": CLASSIC_FLAGS}) as copy:
            for key, value in self._metadata.items():
                copy.metadata[key] = value
            streams = {s.index: copy.add_stream_from_template(s) for s in source.streams}
            for packet in source.demux():
                if packet.dts is None:  # the empty packet that ends each stream
                    continue
                packet.stream = streams[packet.stream.index]
                copy.mux(packet)

    @contextlib.contextmanager
    def _io_errors(self):
        """A full disk or a vanished folder is the user's to fix: say so in one line."""
        try:
            yield
        except OSError as exc:  # av.error.OSError (ENOSPC, EIO...) subclasses it too
            raise AvatarError(f"writing {self.path} failed: {exc.strerror or exc}") from None

    def _discard(self) -> None:
        """Drops the partial output; the destination, if it existed, is left as it was."""
        self._closed = True
        for closer in (getattr(self._audio, "close", None), getattr(self, "container", None) and self.container.close):
            if closer is not None:
                try:
                    closer()
                except Exception:  # already failing; the original error is what matters
                    pass
        self.tmp_path.unlink(missing_ok=True)
        self._copy_path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()


class _AudioMux:
    """Re-encodes a source audio file to AAC into an output container, a little at a time."""

    FRAME = 1024  # samples per AAC frame

    def __init__(self, path: Path, container):
        self.path, self.container = path, container
        self.input, stream = _open_input_audio(path)
        ctx = stream.codec_context
        self.rate = ctx.sample_rate if ctx.sample_rate in AAC_RATES else AAC_FALLBACK_RATE
        self.channels = 1 if ctx.channels <= 1 else 2
        self.layout = "mono" if self.channels == 1 else "stereo"
        self.out = container.add_stream("aac", rate=self.rate)
        octx = self.out.codec_context
        octx.layout = self.layout
        octx.format = "fltp"
        octx.bit_rate = AAC_BIT_RATE[self.channels]
        octx.time_base = Fraction(1, self.rate)
        self.out.time_base = Fraction(1, self.rate)
        self.arrays = _Decoder(path, self.input, stream, rate=self.rate, out_channels=self.channels).arrays()
        self.pending = np.zeros((self.channels, 0), dtype=np.float32)
        self.samples = 0  # samples handed to the encoder
        self.done = False

    def _encode(self, planes: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, dtype=np.float32),
                                           format="fltp", layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = self.samples
        frame.time_base = self.out.codec_context.time_base
        self.samples += frame.samples
        self.container.mux(self.out.encode(frame))

    def write_until(self, seconds: float) -> None:
        """Encodes and muxes source audio until `seconds` of it are written or it ends."""
        limit = seconds * self.rate
        while not self.done and self.samples < limit:
            if self.pending.shape[1] < self.FRAME:
                planes = next(self.arrays, None)
                if planes is not None:
                    self.pending = np.concatenate([self.pending, planes], axis=1)
                    continue
                self.done = True  # end of the source: the short last frame, then flush
                if self.pending.shape[1]:
                    self._encode(self.pending)
                self.container.mux(self.out.encode(None))
                break
            self._encode(self.pending[:, :self.FRAME])
            self.pending = self.pending[:, self.FRAME:]

    def close(self) -> None:
        self.input.close()
