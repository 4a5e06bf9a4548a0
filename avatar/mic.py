"""The microphone: a PortAudio input stream in, 400-sample 16 kHz blocks with capture times out.

    device callback ──► ring buffer (native rate, 1-2 ch) ──► worker: mono ──► StreamResampler ──►
    16 kHz FIFO ──► read_blocks(): AudioBlock(samples (400,), captured_at, speaking, live)

- The stream runs at the device's native rate (many devices refuse 16 kHz). Its callback only copies
  into a preallocated ring buffer (overwrite-oldest, single producer / single consumer, lock-free:
  the write counter is published after the data) and stamps the monotonic capture time of the
  newest sample. It never blocks, never logs and allocates nothing but numpy views.
- Downmixing, resampling (a polyphase FIR with carried state, the same filter and alignment as
  scipy.signal.resample_poly), voice activity (webrtcvad on 10 ms frames, smoothed) and stale-audio
  dropping all run on the worker side, in `Microphone.read_blocks`.
- Device loss (unplugged, stream error, callbacks stop) turns the microphone into a silence source
  paced by the wall clock (`AudioBlock.live` is False) and it tries to reopen the device every
  `retry_every_s`, recovering by itself. Problems are logged once per episode, never per block.
- Audio I/O goes through an `AudioBackend` chosen by name (`register_audio_backend`):
  "sounddevice" is PortAudio; `FileAudioBackend` plays an array as a microphone at real-time pace
  through a thread that calls the very same callback (tests, `bench live`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Protocol, TypeVar

import numpy as np

from avatar.constants import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

log = logging.getLogger(__name__)

MAX_CHANNELS = 2  # capture at most 2 channels: PulseAudio's "default" claims 32, the voice is in 1-2
RING_SECONDS = 2.0  # native audio the ring holds before the oldest is overwritten (and counted)
RETRY_EVERY_S = 2.0  # reopen a lost device this often
STALL_TIMEOUT_S = 0.5  # no callback for this long on an open stream means the device is gone
POLL_S = (0.0005, 0.002)  # worker-side wait while a block is incomplete (the callback never signals):
# about the time the missing samples take to arrive, within these bounds

# voice activity: webrtcvad on 10 ms frames, smoothed (it flags 7-9% of quiet-noise frames alone)
VAD_MODE = 3  # measured: mode 2 holds "speech" for 1-2 s of -50 dBFS hiss after a sentence, 3 lets go in 0.2 s
VAD_FRAME = SAMPLE_RATE // 100  # 160 samples = 10 ms, a frame length webrtcvad accepts
VAD_ONSET = (3, 5)  # speaking starts when >= 3 of the last 5 frames are speech (30-50 ms)
VAD_RELEASE = (5, 30)  # ... and ends when <= 5 of the last 30 frames are (about 250 ms hangover)


# ---- devices ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioDevice:
    """One PortAudio device as the user sees it in `--list-devices`."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    samplerate: int  # the device's default (native) rate, Hz

    def describe(self, *, output: bool = False) -> str:
        ch = self.max_output_channels if output else self.max_input_channels
        return f"{self.index} {self.name!r} ({self.hostapi}, {ch} ch, {self.samplerate} Hz)"


class AudioBackend(Protocol):
    """What Microphone and DelayedMic need from an audio library (sounddevice's vocabulary)."""

    name: str

    def devices(self) -> list[AudioDevice]: ...

    def default_device(self, *, output: bool) -> int | None: ...

    def input_stream(self, *, device: int, samplerate: int, channels: int, callback: Callable,
                     finished_callback: Callable): ...

    def output_stream(self, *, device: int, samplerate: int, channels: int, callback: Callable,
                      finished_callback: Callable): ...

    def refresh(self) -> None:
        """Re-scan devices (so a re-plugged device is seen); a no-op where that is unsafe."""


class SoundDeviceBackend:
    """PortAudio through sounddevice, imported on first use so a missing library is one clear line."""

    name = "sounddevice"

    def __init__(self) -> None:
        self._open_streams = 0
        self._lock = threading.Lock()

    @staticmethod
    def module():
        try:
            import sounddevice
        except OSError as e:  # the Python package is there, the PortAudio library is not
            raise AvatarError(f"cannot use the microphone: {e} (Debian/Ubuntu: sudo apt install libportaudio2)") from None
        except ImportError:
            raise AvatarError("cannot use the microphone: the sounddevice package is missing "
                              "(pip install sounddevice)") from None
        return sounddevice

    def devices(self) -> list[AudioDevice]:
        sd = self.module()
        apis = [api["name"] for api in sd.query_hostapis()]
        return [AudioDevice(index=d["index"], name=d["name"], hostapi=apis[d["hostapi"]],
                            max_input_channels=d["max_input_channels"],
                            max_output_channels=d["max_output_channels"],
                            samplerate=int(round(d["default_samplerate"])))
                for d in sd.query_devices()]

    def default_device(self, *, output: bool) -> int | None:
        index = self.module().default.device[1 if output else 0]
        return None if index is None or index < 0 else int(index)

    def _stream(self, cls_name: str, **kw):
        sd = self.module()
        finished = kw.pop("finished_callback")

        def done():
            with self._lock:
                self._open_streams -= 1
            finished()

        stream = getattr(sd, cls_name)(dtype="float32", latency="low", finished_callback=done, **kw)
        with self._lock:
            self._open_streams += 1
        return stream

    def input_stream(self, **kw):
        return self._stream("InputStream", **kw)

    def output_stream(self, **kw):
        return self._stream("OutputStream", **kw)

    def refresh(self) -> None:
        # PortAudio scans devices once at initialisation; re-initialising is the only way to see a
        # re-plugged device, and it would kill any stream still open (e.g. the delayed mic).
        with self._lock:
            if self._open_streams:
                return
        sd = self.module()
        try:
            sd._terminate()
            sd._initialize()
        except Exception:  # keep the old device list rather than fail the retry
            pass


_BACKENDS: dict[str, AudioBackend] = {}


def register_audio_backend(name: str, backend: AudioBackend) -> None:
    """Make `backend` selectable by name (`Microphone(backend=name)`), replacing any of that name."""
    _BACKENDS[name] = backend


def get_audio_backend(backend: str | AudioBackend | None = None) -> AudioBackend:
    if backend is None:
        backend = "sounddevice"
    if not isinstance(backend, str):
        return backend
    if backend == "sounddevice" and backend not in _BACKENDS:
        _BACKENDS[backend] = SoundDeviceBackend()
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise AvatarError(f"unknown audio backend {backend!r}: use one of {', '.join(sorted(_BACKENDS))}") from None


def list_input_devices(*, backend: str | AudioBackend | None = None) -> list[AudioDevice]:
    """Every device that can record, in the backend's order."""
    return [d for d in get_audio_backend(backend).devices() if d.max_input_channels > 0]


def list_output_devices(*, backend: str | AudioBackend | None = None) -> list[AudioDevice]:
    """Every device that can play (a delayed-mic target is one of these)."""
    return [d for d in get_audio_backend(backend).devices() if d.max_output_channels > 0]


def find_device(spec: str | int | None, *, output: bool = False,
                backend: str | AudioBackend | None = None) -> AudioDevice:
    """The device `spec` names: None = the default, an index (int or digits), or a case-insensitive
    part of its name (an exact name wins over partial matches). AvatarError, listing the devices
    found, when nothing or several match."""
    be = get_audio_backend(backend)
    kind = "output" if output else "input"
    found = list_output_devices(backend=be) if output else list_input_devices(backend=be)
    listing = "; ".join(d.describe(output=output) for d in found)
    if not found:
        what = "audio output device (for --delayed-mic)" if output else "microphone"
        raise AvatarError(f"no {what} found: connect one, or check that the sound system sees it "
                          f"(Linux: arecord -l / pactl list short sources)")
    if spec is None:
        default = be.default_device(output=output)
        for d in found:
            if d.index == default:
                return d
        return found[0]
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        for d in found:
            if d.index == index:
                return d
        raise AvatarError(f"no {kind} device with index {index}; {kind} devices: {listing}")
    want = str(spec).strip().lower()
    exact = [d for d in found if d.name.lower() == want]
    matches = exact or [d for d in found if want in d.name.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AvatarError(f"no {kind} device matches {spec!r}; {kind} devices: {listing}")
    raise AvatarError(f"{len(matches)} {kind} devices match {spec!r}: "
                      f"{'; '.join(d.describe(output=output) for d in matches)}; give the index")


# ---- resampling ---------------------------------------------------------------------------------

class StreamResampler:
    """rate_in -> rate_out in chunks, a polyphase FIR with carried state.

    The filter and the alignment are scipy.signal.resample_poly's (Kaiser window, beta 5, half
    length 10 * max(up, down) taps of the upsampled rate): output sample n is the input at time
    n / rate_out, zero-phase, so streaming output equals resample_poly's on the whole signal except
    at the very end, which streaming never reaches. Output n needs input up to index
    floor((n*down + half) / up), a look-ahead of `delay_in` input samples (0.2 ms at 48 kHz).
    """

    def __init__(self, rate_in: int, rate_out: int = SAMPLE_RATE):
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        g = math.gcd(int(rate_in), int(rate_out))
        self.up, self.down = int(rate_out) // g, int(rate_in) // g
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self.passthrough = self.up == self.down == 1
        if not self.passthrough:
            from scipy.signal import firwin

            self.half = 10 * max(self.up, self.down)
            h = firwin(2 * self.half + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0)) * self.up
            self.taps = -(-h.size // self.up)
            padded = np.zeros(self.taps * self.up)
            padded[:h.size] = h
            # phase r, tap i -> h[r + i*up]; stored reversed in i so it lines up with x[j_hi-T+1 .. j_hi]
            self.phases = padded.reshape(self.taps, self.up).T[:, ::-1].astype(np.float32).copy()
            self.delay_in = self.half // self.up
        else:
            self.half, self.taps, self.delay_in = 0, 1, 0
        self.reset()

    def reset(self) -> None:
        """Forget all input: the next sample is input index 0 again."""
        self.n_in = 0  # input samples received
        self.n_out = 0  # output samples emitted
        # input history: x[hist_start:], with zeros standing in for indices < 0
        self.hist = np.zeros(max(self.taps - 1, 0), dtype=np.float32)
        self.hist_start = -self.hist.size

    def process(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (N,) float32 at rate_in -> (y (K,) float32 at rate_out, newest (K,) int64): for each
        output sample, the index of the newest input sample it depends on."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.passthrough:
            idx = np.arange(self.n_in, self.n_in + x.size, dtype=np.int64)
            self.n_in += x.size
            self.n_out += x.size
            return x.copy(), idx
        self.hist = np.concatenate([self.hist, x])
        self.n_in += x.size
        last = self.n_in - 1
        # outputs n with j_hi(n) = (n*down + half) // up <= last
        n_end = (last * self.up - self.half) // self.down + 1 if last * self.up >= self.half else 0
        n = np.arange(self.n_out, max(n_end, self.n_out), dtype=np.int64)
        if n.size:
            pos = n * self.down + self.half
            j_hi, phase = pos // self.up, pos % self.up
            windows = np.lib.stride_tricks.sliding_window_view(self.hist, self.taps)
            rows = windows[j_hi - (self.taps - 1) - self.hist_start]  # (K, taps): x[j_hi-T+1 .. j_hi]
            y = np.einsum("kt,kt->k", rows, self.phases[phase]).astype(np.float32)
            self.n_out = int(n[-1]) + 1
        else:
            j_hi, y = n, np.zeros(0, dtype=np.float32)
        # keep what the next output needs: from j_hi(n_out) - taps + 1
        keep_from = (self.n_out * self.down + self.half) // self.up - (self.taps - 1)
        cut = min(max(keep_from - self.hist_start, 0), self.hist.size)
        if cut:
            self.hist = self.hist[cut:]
            self.hist_start += cut
        return y, j_hi


# ---- voice activity -----------------------------------------------------------------------------

class VoiceActivity:
    """webrtcvad (mode 2) on 10 ms frames of 16 kHz audio, with onset/hangover smoothing.

    `update(block)` takes any number of samples (a partial 10 ms frame is carried to the next call)
    and returns `speaking`: it turns on when >= 3 of the last 5 frames are speech and off when no
    more than 5 of the last 30 are, so a lone false positive on noise does nothing and the tail of
    a word is not cut.
    """

    def __init__(self, *, mode: int = VAD_MODE):
        try:
            import webrtcvad
        except ImportError:
            raise AvatarError("voice activity detection needs webrtcvad (pip install webrtcvad-wheels)") from None
        self._vad = webrtcvad.Vad(mode)
        self._carry = np.zeros(VAD_FRAME, dtype=np.int16)
        self._n_carry = 0
        self._flags = np.zeros(VAD_RELEASE[1], dtype=bool)  # circular, newest at _k - 1
        self._k = 0
        self.speaking = False
        self.frames = 0
        self.speech_frames = 0

    def reset(self) -> None:
        self._n_carry = 0
        self._flags[:] = False
        self.speaking = False

    def update(self, block: np.ndarray) -> bool:
        pcm = (np.clip(block, -1.0, 1.0) * 32767.0).astype(np.int16)
        start = 0
        if self._n_carry:
            take = min(VAD_FRAME - self._n_carry, pcm.size)
            self._carry[self._n_carry:self._n_carry + take] = pcm[:take]
            self._n_carry += take
            start = take
            if self._n_carry == VAD_FRAME:
                self._frame(self._carry.tobytes())
                self._n_carry = 0
        while start + VAD_FRAME <= pcm.size:
            self._frame(pcm[start:start + VAD_FRAME].tobytes())
            start += VAD_FRAME
        rest = pcm.size - start
        if rest:
            self._carry[:rest] = pcm[start:]
            self._n_carry = rest
        return self.speaking

    def _frame(self, pcm: bytes) -> None:
        speech = self._vad.is_speech(pcm, SAMPLE_RATE)
        self.frames += 1
        self.speech_frames += speech
        self._flags[self._k % self._flags.size] = speech
        self._k += 1
        recent = [self._flags[(self._k - 1 - i) % self._flags.size] for i in range(VAD_ONSET[1])]
        if not self.speaking and sum(recent) >= VAD_ONSET[0]:
            self.speaking = True
        elif self.speaking and self._flags.sum() <= VAD_RELEASE[0]:
            self.speaking = False


# ---- the ring buffer the callback writes --------------------------------------------------------

class _Ring:
    """Native-rate frames (capacity, channels) float32, one writer (the audio callback), one reader.

    The writer copies, stamps, then publishes `written`; the reader snapshots `written`, copies, and
    re-checks it to discard whatever the writer overwrote meanwhile (counted as dropped).
    """

    STAMPS = 512  # capture-time stamps kept, one per callback

    def __init__(self, capacity: int, channels: int):
        self.capacity = capacity
        self.data = np.zeros((capacity, channels), dtype=np.float32)
        self.stamp_end = np.zeros(self.STAMPS, dtype=np.int64)  # sample count after that callback
        self.stamp_time = np.zeros(self.STAMPS, dtype=np.float64)  # monotonic time of its newest sample
        self.n_stamps = 0
        self.written = 0
        self.read = 0
        self.dropped = 0  # frames overwritten before the worker read them

    def write(self, indata: np.ndarray, newest_time: float) -> None:
        n = indata.shape[0]
        w = self.written
        if n > self.capacity:  # a huge callback: only its newest part fits
            indata = indata[n - self.capacity:]
            w += n - self.capacity
            n = self.capacity
        i = w % self.capacity
        first = min(n, self.capacity - i)
        self.data[i:i + first] = indata[:first]
        if first < n:
            self.data[:n - first] = indata[first:]
        k = self.n_stamps % self.STAMPS
        self.stamp_end[k] = w + n
        self.stamp_time[k] = newest_time
        self.n_stamps += 1
        self.written = w + n  # publish last

    def pull(self) -> tuple[np.ndarray, int]:
        """Everything not read yet: (frames (n, channels) copy, index of its first frame)."""
        w = self.written
        r = self.read
        margin = self.capacity // 4  # leave the writer room while we copy
        if w - r > self.capacity - margin:
            skip = w - r - (self.capacity - margin)
            self.dropped += skip
            r += skip
        n = w - r
        i = r % self.capacity
        first = min(n, self.capacity - i)
        out = np.empty((n, self.data.shape[1]), dtype=np.float32)
        out[:first] = self.data[i:i + first]
        if first < n:
            out[first:] = self.data[:n - first]
        over = self.written - r - self.capacity  # the writer lapped our copy's start
        if over > 0:
            self.dropped += over
            out = out[over:]
            r += over
        self.read = w
        return out, r

    def times(self, index: np.ndarray, rate: int) -> np.ndarray:
        """Monotonic capture times of native frames `index` (recent ones), from the callback stamps."""
        count = min(self.n_stamps, self.STAMPS)
        if count == 0:
            return np.full(index.shape, time.monotonic())
        order = (np.arange(self.n_stamps - count, self.n_stamps)) % self.STAMPS
        ends, stamps = self.stamp_end[order], self.stamp_time[order]
        # the first stamp whose callback delivered the frame (end > index); newer than all: the last
        j = np.minimum(np.searchsorted(ends, index, side="right"), count - 1)
        return stamps[j] - (ends[j] - 1 - index) / rate


# ---- the microphone -----------------------------------------------------------------------------

@dataclass
class AudioBlock:
    """One frame's audio: samples (400,) float32 at 16 kHz, the monotonic capture time of its newest
    sample, whether the voice detector says the user is speaking, and whether it came from the
    device (False: silence fed while the device is lost)."""

    samples: np.ndarray
    captured_at: float
    speaking: bool
    live: bool


@dataclass
class MicStats:
    """Counters since the microphone was opened."""

    blocks: int = 0  # blocks handed out (live + silence)
    silence_blocks: int = 0  # of those, silence fed while the device was lost
    dropped_samples: int = 0  # 16 kHz samples discarded as stale (live catch-up)
    ring_overruns: int = 0  # native frames overwritten in the ring before being read
    callback_status: int = 0  # callbacks that reported an over/underflow
    reconnects: int = 0  # successful reopenings after a loss
    losses: int = 0  # times the device was lost


_Stream = TypeVar("_Stream", bound="_DeviceStream")


class _DeviceStream:
    """The life cycle the Microphone and the DelayedMic share: open the device `spec` names, stop its
    stream, and reopen it at most every `retry_every_s` after a loss.

    A subclass sets spec, backend, device, retry_every_s, _stream, _generation and _next_retry, and
    defines `_start(device)` (open and start a stream, AvatarError if it cannot) and `close()`."""

    output = False  # an output device (find_device's `output`)

    def __enter__(self: _Stream) -> _Stream:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Resolve the device and start the stream. AvatarError if it does not exist or cannot open."""
        self.device = find_device(self.spec, output=self.output, backend=self.backend)
        self._start(self.device)

    def _retry_due(self, now: float) -> bool:
        """True when a reopening is due, and then not again for `retry_every_s`."""
        if now < self._next_retry:
            return False
        self._next_retry = now + self.retry_every_s
        return True

    def _reopen(self) -> AudioDevice:
        """Look the device up again (it may be back under another index) and start it."""
        self.backend.refresh()
        device = find_device(self.spec, output=self.output, backend=self.backend)
        self._start(device)
        return device

    def _stop_stream(self) -> None:
        self._generation += 1  # its finished callback, whenever it comes, is expected
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.stop()
        except Exception:
            pass
        try:
            stream.close()
        except Exception:
            pass


class Microphone(_DeviceStream):
    """A live microphone: `with Microphone("USB") as mic: blocks = mic.read_blocks(...)`.

    device: None (the default input), an index, or part of the device's name.
    tap: called on the worker side with each native-rate mono chunk, the capture time of its newest
         sample and the native rate (the delayed mic's `push`); never from the audio callback.
    Opening raises AvatarError when the device spec matches nothing; once open, a lost device is
    silence plus retries, never an exception.
    """

    def __init__(self, device: str | int | None = None, *, backend: str | AudioBackend | None = None,
                 ring_seconds: float = RING_SECONDS, retry_every_s: float = RETRY_EVERY_S,
                 stall_timeout_s: float = STALL_TIMEOUT_S, vad_mode: int = VAD_MODE,
                 tap: Callable[[np.ndarray, float, int], None] | None = None):
        self.spec = device
        self.backend = get_audio_backend(backend)
        self.ring_seconds = ring_seconds
        self.retry_every_s = retry_every_s
        self.stall_timeout_s = stall_timeout_s
        self.tap = tap
        self.vad = VoiceActivity(mode=vad_mode)
        self.stats = MicStats()
        self.device: AudioDevice | None = None
        self.rate = SAMPLE_RATE
        self._stream = None
        self._ring: _Ring | None = None
        self._resampler: StreamResampler | None = None
        self._fifo = np.zeros(0, dtype=np.float32)  # 16 kHz samples not yet handed out
        self._fifo_time = np.zeros(0, dtype=np.float64)  # capture time of each one's newest input
        self._connected = False
        self._finished = False  # set by the stream's finished callback (device error / stop)
        self._generation = 0
        self._index_offset = 0  # ring index - resampler input index (grows when the ring overruns)
        self._last_callback = 0.0
        self._opened_at = 0.0
        self._next_retry = 0.0
        self._silence_due = 0.0  # wall time the next silence block is due while disconnected
        self._lost_reason = ""
        self._zeros = np.zeros(SAMPLES_PER_FRAME, dtype=np.float32)

    # -- life cycle
    def close(self) -> None:
        self._stop_stream()
        self._connected = False

    @property
    def connected(self) -> bool:
        """True while audio comes from the device (False: silence while retrying)."""
        return self._connected

    def _start(self, device: AudioDevice) -> None:
        channels = max(1, min(device.max_input_channels, MAX_CHANNELS))
        self.rate = device.samplerate
        ring = _Ring(int(self.ring_seconds * self.rate), channels)
        self._ring = ring
        self._finished = False
        self._generation += 1
        generation = self._generation
        callback = self._make_callback(ring, self.rate)

        def finished():  # only this stream's end counts, not a late one from a stream we replaced
            if generation == self._generation:
                self._finished = True

        try:
            stream = self.backend.input_stream(device=device.index, samplerate=self.rate, channels=channels,
                                               callback=callback, finished_callback=finished)
            stream.start()
        except AvatarError:
            raise
        except Exception as e:
            raise AvatarError(f"cannot open microphone {device.describe()}: {_one_line(e)}") from None
        self._stream = stream
        self._resampler = StreamResampler(self.rate, SAMPLE_RATE)
        self._index_offset = 0
        self._fifo = self._fifo[:0]
        self._fifo_time = self._fifo_time[:0]
        self.vad.reset()
        now = time.monotonic()
        self._opened_at = self._last_callback = now
        self._connected = True

    def _make_callback(self, ring: _Ring, rate: int):
        stats, mono = self.stats, time.monotonic

        def callback(indata, frames, time_info, status):
            # real-time thread: copy, stamp, return. No locks, no logging, no allocation beyond views.
            now = mono()
            if status:
                stats.callback_status += 1
            newest = now
            try:
                adc, cur = time_info.inputBufferAdcTime, time_info.currentTime
                if adc > 0.0 and 0.0 <= cur - adc < 1.0:
                    newest = min(now, now - (cur - adc) + (frames - 1) / rate)
            except AttributeError:
                pass
            ring.write(indata, newest)
            self._last_callback = now

        return callback

    # -- health
    def _check_health(self, now: float) -> None:
        if not self._connected:
            return
        reason = ""
        if self._finished:
            reason = "the audio stream stopped"
        elif self._stream is not None and not getattr(self._stream, "active", True):
            reason = "the audio stream is no longer active"
        elif now - self._last_callback > self.stall_timeout_s:
            reason = f"no audio for {now - self._last_callback:.1f} s"
        if reason:
            self._lose(reason, now)

    def _lose(self, reason: str, now: float) -> None:
        self.stats.losses += 1
        self._connected = False
        self._lost_reason = reason
        name = self.device.name if self.device else str(self.spec)
        log.warning("microphone %r lost (%s): the avatar idles on silence; retrying every %g s",
                    name, reason, self.retry_every_s)
        self._stop_stream()
        self._next_retry = now + self.retry_every_s
        # silence takes over from the last audio, so the generator's clock does not skip the gap
        self._silence_due = max(min(self._last_callback, now), now - 0.5)
        self.vad.reset()

    def _retry(self, now: float) -> None:
        if not self._retry_due(now):
            return
        try:
            device = self._reopen()
        except Exception as e:  # stays lost; said once per episode, not per attempt
            if self._lost_reason != "retrying":
                log.info("microphone not back yet (%s); still retrying", _one_line(e))
                self._lost_reason = "retrying"
            return
        self.device = device
        self.stats.reconnects += 1
        log.warning("microphone %r is back", device.name)

    # -- worker side
    def _drain(self) -> None:
        """Move everything the callback wrote into the 16 kHz FIFO (with capture times)."""
        ring = self._ring
        if ring is None or ring.written == ring.read:
            return
        frames, first = ring.pull()
        self.stats.ring_overruns = ring.dropped
        if frames.shape[0] == 0:
            return
        mono = frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float32)
        if self.tap is not None:
            self.tap(mono, float(ring.times(np.array([first + mono.size - 1]), self.rate)[0]), self.rate)
        # both counts start at 0 with each stream; an overrun skips ring frames the resampler never saw
        self._index_offset = first - self._resampler.n_in
        y, newest = self._resampler.process(mono)
        if y.size:
            self._fifo = np.concatenate([self._fifo, y])
            self._fifo_time = np.concatenate([self._fifo_time, ring.times(newest + self._index_offset, self.rate)])

    def available(self) -> int:
        """16 kHz samples ready now (after moving what the callback wrote)."""
        self._drain()
        return self._fifo.size

    def read_block(self, *, timeout: float) -> AudioBlock | None:
        """The next block in order (nothing dropped; the ring still overwrites what waits longer
        than `ring_seconds`), or None when `timeout` (s) passes first."""
        blocks = self._read(timeout=timeout, keep=None, take=1)
        return blocks[0] if blocks else None

    def read_blocks(self, *, max_blocks: int, timeout: float) -> list[AudioBlock]:
        """The next blocks in order, at least one unless `timeout` (s) passes first (then []).

        Stale audio is dropped so that at most `max_blocks` are returned: the newest ones, so a
        slow caller never falls further behind (`stats.dropped_samples` counts what was skipped).
        While the device is lost, returns silence blocks at the wall-clock rate and retries opening.
        """
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        return self._read(timeout=timeout, keep=max_blocks, take=max_blocks)

    def _read(self, *, timeout: float, keep: int | None, take: int) -> list[AudioBlock]:
        """Wait for a block; drop all but the newest `keep` (None: drop nothing); hand out `take`."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self._check_health(now)
            if self._connected:
                self._drain()
                n = self._fifo.size // SAMPLES_PER_FRAME
                if n:
                    return self._take_live(n, keep, take)
            else:
                self._retry(now)
                if not self._connected and now >= self._silence_due:
                    return self._take_silence(now, take)
            if now >= deadline:
                return []
            if self._connected:
                wake = min(deadline, now + (SAMPLES_PER_FRAME - self._fifo.size % SAMPLES_PER_FRAME) / SAMPLE_RATE)
            else:
                wake = min(deadline, self._silence_due)
            time.sleep(min(max(wake - now, POLL_S[0]), POLL_S[1]))

    def _take_live(self, n: int, keep: int | None, take: int) -> list[AudioBlock]:
        if keep is not None and n > keep:
            skip = (n - keep) * SAMPLES_PER_FRAME
            self.stats.dropped_samples += skip
            self._fifo, self._fifo_time = self._fifo[skip:], self._fifo_time[skip:]
            n = keep
        n = min(n, take)
        out = []
        for k in range(n):
            s = self._fifo[k * SAMPLES_PER_FRAME:(k + 1) * SAMPLES_PER_FRAME].copy()
            speaking = self.vad.update(s)
            out.append(AudioBlock(s, float(self._fifo_time[(k + 1) * SAMPLES_PER_FRAME - 1]), speaking, True))
        used = n * SAMPLES_PER_FRAME
        self._fifo, self._fifo_time = self._fifo[used:], self._fifo_time[used:]
        self.stats.blocks += n
        return out

    def _take_silence(self, now: float, max_blocks: int) -> list[AudioBlock]:
        period = FRAME_MS / 1000
        due = int((now - self._silence_due) / period) + 1
        if due > max_blocks:
            self._silence_due += (due - max_blocks) * period
            due = max_blocks
        self._silence_due += due * period
        self.stats.blocks += due
        self.stats.silence_blocks += due
        return [AudioBlock(self._zeros.copy(), now, False, False) for _ in range(due)]


class DelayedMic(_DeviceStream):
    """Plays the microphone, delayed, into an output device that a meeting app records from.

    The live video lags the voice by the daemon's latency; the meeting app would show lips after the
    words. Routing the voice through this delay line makes both arrive together. The output is a
    loopback device the user makes once (Linux: a PulseAudio/PipeWire null sink with its monitor
    remapped as a source; Windows: VB-Cable; macOS: BlackHole; see `vasa-avatar doctor`).

    `push(mono, captured_at, rate)` (worker side, e.g. as the Microphone's tap) resamples to the
    device rate and queues so that each sample plays `delay_s` after it was captured; the output
    callback only copies from the queue (zeros on underrun). The queue is re-aimed only when it is
    more than `tolerance_s` off target, so changing the delay or clock drift costs a rare small skip
    or gap, not continuous warbling.
    """

    output = True

    def __init__(self, device: str | int | None, *, backend: str | AudioBackend | None = None,
                 delay_s: float = 0.15, tolerance_s: float = 0.02, retry_every_s: float = RETRY_EVERY_S):
        self.spec = device
        self.backend = get_audio_backend(backend)
        self.delay_s = delay_s
        self.tolerance_s = tolerance_s
        self.retry_every_s = retry_every_s
        self.device: AudioDevice | None = None
        self.rate = SAMPLE_RATE
        self.underruns = 0  # callbacks that ran out of audio (zeros played)
        self.skipped_samples = 0  # samples dropped to shorten the delay
        self.inserted_samples = 0  # silence inserted to lengthen it
        self._stream = None
        self._data = np.zeros(0, dtype=np.float32)
        self._written = 0
        self._read = 0
        self._resampler: StreamResampler | None = None
        self._latency = 0.0
        self._ok = False
        self._warned = False
        self._next_retry = 0.0
        self._generation = 0

    def _start(self, device: AudioDevice) -> None:
        self.rate = device.samplerate
        self._data = np.zeros(int(2.0 * self.rate), dtype=np.float32)
        self._written = self._read = 0
        self._resampler = None
        self._generation += 1
        generation = self._generation
        channels = max(1, min(device.max_output_channels, MAX_CHANNELS))

        def finished():
            if generation == self._generation:
                self._ok = False

        try:
            stream = self.backend.output_stream(device=device.index, samplerate=self.rate, channels=channels,
                                                callback=self._callback, finished_callback=finished)
            stream.start()
        except AvatarError:
            raise
        except Exception as e:
            raise AvatarError(f"cannot open delayed-mic output {device.describe(output=True)}: {_one_line(e)}") from None
        self._stream = stream
        latency = getattr(stream, "latency", 0.0)
        self._latency = float(latency if isinstance(latency, (int, float)) else 0.0)
        self._ok = True

    def close(self) -> None:
        self._ok = False
        self._stop_stream()

    def _callback(self, outdata, frames, time_info, status):
        # real-time thread: copy what is queued, zeros for the rest; no locks, no logging
        data, cap = self._data, self._data.size
        r = self._read
        n = min(frames, self._written - r)
        if n > 0:
            i = r % cap
            first = min(n, cap - i)
            outdata[:first] = data[i:i + first, None]
            if first < n:
                outdata[first:n] = data[:n - first, None]
            self._read = r + n
        else:
            n = 0
        if n < frames:
            outdata[n:] = 0.0
            self.underruns += 1

    def set_delay(self, seconds: float) -> None:
        self.delay_s = max(0.0, float(seconds))

    def push(self, mono: np.ndarray, captured_at: float, rate: int) -> None:
        """Queue mic audio (native rate `rate`) whose newest sample was captured at `captured_at`."""
        now = time.monotonic()
        if not self._ok:
            if not self._warned:
                self._warned = True
                log.warning("delayed-mic output %r stopped; retrying every %g s",
                            self.device.name if self.device else self.spec, self.retry_every_s)
            if not self._retry_due(now):
                return
            self.close()
            try:
                self.device = self._reopen()
            except AvatarError:
                return
            self._warned = False
            log.warning("delayed-mic output %r is back", self.device.name)
        if self._resampler is None or self._resampler.rate_in != rate:
            self._resampler = StreamResampler(rate, self.rate)
        y, _ = self._resampler.process(mono)
        cap = self._data.size
        level = self._written - self._read
        # queue after this push so that its newest sample plays at captured_at + delay
        target = (captured_at + self.delay_s - now - self._latency) * self.rate
        after = level + y.size
        tol = self.tolerance_s * self.rate
        if after > target + tol:
            drop = int(min(y.size, after - target))
            self.skipped_samples += drop
            y = y[drop:]
        elif after < target - tol:
            pad = int(min(target - after, cap - level - y.size))
            if pad > 0:
                self._write(np.zeros(pad, dtype=np.float32))
                self.inserted_samples += pad
        room = cap - (self._written - self._read)
        if y.size > room:  # the device stopped pulling; keep the newest
            self.skipped_samples += y.size - room
            y = y[y.size - room:]
        self._write(y)

    def _write(self, y: np.ndarray) -> None:
        cap = self._data.size
        w = self._written
        i = w % cap
        first = min(y.size, cap - i)
        self._data[i:i + first] = y[:first]
        if first < y.size:
            self._data[:y.size - first] = y[first:]
        self._written = w + y.size  # publish last


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


# ---- a file (or array) played as a microphone ----------------------------------------------------

class _FakeStream:
    """What the two fake streams share: PortAudio's constructor arguments, and a thread that `_run`s
    at real-time pace (`_paced`) from `start()` until `stop()`."""

    thread_name = "fake-stream"

    def __init__(self, backend: FileAudioBackend, *, samplerate: int, channels: int, callback: Callable,
                 finished_callback: Callable):
        self.backend = backend
        self.samplerate = samplerate
        self.channels = channels
        self.callback = callback
        self.finished_callback = finished_callback
        self.active = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.active = True
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def _paced(self, t0: float, *, first: int):
        """Yields t0 + k * blocksize / samplerate for k = first, first + 1, ..., each once that time
        has come; ends when the stream is stopped."""
        block, rate = self.backend.blocksize, self.samplerate
        k = first
        while not self._stop.is_set():
            due = t0 + k * block / rate
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            yield due
            k += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self.active = False


class _FakeInputStream(_FakeStream):
    """Calls the microphone's callback from a thread at real-time pace with the backend's audio,
    as PortAudio does: (frames, channels) float32 blocks, time info, status."""

    thread_name = "fake-mic"
    closed = False

    def _run(self) -> None:
        be, block, rate = self.backend, self.backend.blocksize, self.samplerate
        t0 = time.monotonic()
        pos = be.position  # a re-opened stream carries on where the "world" is
        be.stream_starts.append((t0, pos))
        try:
            for due in self._paced(t0, first=1):  # due: the moment the block's newest sample is captured
                if be.unplugged:
                    if be.fail_mode == "error":
                        break  # PortAudio reports the error and the stream stops
                    continue  # "silent": callbacks just stop coming while the stream looks active
                chunk = be.chunk(pos, block, self.channels)
                pos += block
                be.position = pos
                # PortAudio's stream clock (offset so it is never 0): the first sample's ADC time and now
                now = time.monotonic()
                ti = SimpleNamespace(inputBufferAdcTime=due - t0 + 1.0 - (block - 1) / rate,
                                     currentTime=now - t0 + 1.0, outputBufferDacTime=0.0)
                be.callbacks += 1
                self.callback(chunk, block, ti, 0)
        finally:
            self.active = False
            if not self.closed:
                self.finished_callback()

    def close(self) -> None:
        self.stop()
        self.closed = True
        self.backend.closed_streams += 1


class _FakeOutputStream(_FakeStream):
    """Pulls from the delayed mic's callback at real-time pace and records what was played, with
    the monotonic time each block started playing."""

    thread_name = "fake-out"
    latency = 0.0

    def _run(self) -> None:
        block = self.backend.blocksize
        out = np.zeros((block, self.channels), dtype=np.float32)
        for due in self._paced(time.monotonic(), first=0):  # due: the moment the block starts playing
            ti = SimpleNamespace(outputBufferDacTime=0.0, currentTime=0.0, inputBufferAdcTime=0.0)
            self.callback(out, block, ti, 0)
            self.backend.played.append((due, out[:, 0].copy()))
        self.active = False

    def close(self) -> None:
        self.stop()


class FileAudioBackend:
    """An audio backend whose one microphone plays `audio` (looping) at real-time pace, and whose one
    output records what is played: the same callback path as PortAudio, for tests and `bench live`.

    audio: (N,) or (N, channels) float32 at `samplerate`. `unplug()` makes the running stream fail
    (fail_mode "error": it stops, as PortAudio does on a device error; "silent": callbacks just stop)
    and hides the device until `replug()`.
    """

    def __init__(self, audio: np.ndarray, *, samplerate: int, channels: int = 1, blocksize: int | None = None,
                 loop: bool = True, name: str = "File Microphone", output_name: str = "File Output",
                 fail_mode: str = "error"):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim == 1 and channels > 1:
            audio = np.repeat(audio[:, None], channels, axis=1)
        if audio.shape[0] == 0:
            raise ValueError("FileAudioBackend needs at least one sample")
        self.audio = audio
        self.samplerate = int(samplerate)
        self.channels = channels
        self.blocksize = blocksize or max(1, self.samplerate // 100)  # 10 ms callbacks, like PortAudio
        self.loop = loop
        self.name = "file"
        self.input_name, self.output_name = name, output_name
        self.fail_mode = fail_mode
        self.unplugged = False
        self.position = 0  # samples played into the world so far (continues across reopenings)
        self.callbacks = 0
        self.opened_streams = 0
        self.closed_streams = 0
        self.played: list[tuple[float, np.ndarray]] = []
        self.stream_starts: list[tuple[float, int]] = []  # (monotonic t0, world position) per input stream

    def devices(self) -> list[AudioDevice]:
        out = [AudioDevice(1, self.output_name, "file", 0, 2, self.samplerate)]
        if not self.unplugged:
            out.insert(0, AudioDevice(0, self.input_name, "file", self.channels, 0, self.samplerate))
        return out

    def default_device(self, *, output: bool) -> int | None:
        return 1 if output else (None if self.unplugged else 0)

    def input_stream(self, *, device: int, samplerate: int, channels: int, callback: Callable,
                     finished_callback: Callable) -> _FakeInputStream:
        if self.unplugged or device != 0:
            raise OSError(f"Error opening InputStream: Invalid device [PaErrorCode -9996] ({device})")
        self.opened_streams += 1
        return _FakeInputStream(self, samplerate=samplerate, channels=channels, callback=callback,
                                finished_callback=finished_callback)

    def output_stream(self, *, device: int, samplerate: int, channels: int, callback: Callable,
                      finished_callback: Callable) -> _FakeOutputStream:
        if device != 1:
            raise OSError(f"Error opening OutputStream: Invalid device ({device})")
        return _FakeOutputStream(self, samplerate=samplerate, channels=channels, callback=callback,
                                 finished_callback=finished_callback)

    def refresh(self) -> None:
        pass

    def unplug(self) -> None:
        self.unplugged = True

    def replug(self) -> None:
        self.unplugged = False

    def chunk(self, pos: int, n: int, channels: int) -> np.ndarray:
        """Samples pos .. pos+n-1 of the world, (n, channels): the audio looped, or silence after it."""
        idx = pos + np.arange(n)
        total = self.audio.shape[0]
        x = self.audio[idx % total] if self.loop else self.audio[np.minimum(idx, total - 1)]
        x = x[:, None] if x.ndim == 1 else x
        out = np.repeat(x[:, :1], channels, axis=1) if x.shape[1] < channels else x[:, :channels]
        if not self.loop:
            out = np.where((idx < total)[:, None], out, 0.0)
        return np.ascontiguousarray(out, dtype=np.float32)

    def capture_time(self, sample: int) -> float:
        """Monotonic time the world's sample `sample` was captured (by the stream that played it)."""
        for t0, pos0 in reversed(self.stream_starts):
            if sample >= pos0:
                return t0 + (sample - pos0 + 1) / self.samplerate
        raise ValueError(f"sample {sample} was never played")
