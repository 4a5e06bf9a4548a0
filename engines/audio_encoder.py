"""AudioEncoder: 16 kHz speech -> seven articulation features per 25 ms video frame.

Contract (both encoders, one tick per video frame):

    features, *state = encoder(samples, *state)
    samples:  (B, SAMPLES_PER_FRAME) float32 in [-1, 1], the 400 newest samples (frame t)
    features: (B, N_ARTICULATION) float32, describing frame t - lookahead_frames

Features, in ARTICULATION order:
    jaw_open, lips_wide, lips_round, lips_closed  0..1 articulation targets (lips_closed = 1 at a
                                                 full bilabial closure)
    voicing    0..1 probability that the frame is voiced speech
    loudness   0..1, frame RMS in dBFS (20*log10(rms), full-scale square wave = 0 dB) mapped
               linearly from -60 dB -> 0 to -10 dB -> 1, clipped
    pitch      log2(f0 / 200 Hz) when voiced, 0 when unvoiced

Two encoders keep this contract: AudioEncoder (trained, engines/train_audio.py) and
DSPAudioEncoder (hand-set rules, no weights, the baseline). load_audio_encoder picks one by name.

Both are causal with one frame (25 ms) of look-ahead: the output at tick t describes frame t-1, so
frame t's audio is the look-ahead (the newest sample lies 37.5 ms after frame t-1's centre, within
the 40 ms budget). Everything that carries across ticks is an explicit state tensor, so the same
graph exports to ONNX with static shapes (opset 17) and runs on any backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avatar.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

ARTICULATION = ("jaw_open", "lips_wide", "lips_round", "lips_closed", "voicing", "loudness", "pitch")
N_ARTICULATION = len(ARTICULATION)
FEATURE_INDEX = {name: i for i, name in enumerate(ARTICULATION)}

LOOKAHEAD_FRAMES = 1  # 25 ms: frame t is the look-ahead for frame t-1
HISTORY_FRAMES = 2  # frames t-2 and t-1 kept in the sample ring buffer
BUFFER_SAMPLES = (HISTORY_FRAMES + 1) * SAMPLES_PER_FRAME  # 1200: frames t-2, t-1, t
TARGET_START = HISTORY_FRAMES * SAMPLES_PER_FRAME - SAMPLES_PER_FRAME * LOOKAHEAD_FRAMES  # 400
TARGET_CENTER = TARGET_START + SAMPLES_PER_FRAME // 2  # 600: centre of frame t-1 in the buffer

LOUDNESS_DB_LOW = -60.0  # dBFS mapped to loudness 0
LOUDNESS_DB_HIGH = -10.0  # dBFS mapped to loudness 1
PITCH_REF_HZ = 200.0  # pitch feature = log2(f0 / PITCH_REF_HZ)
F0_MIN_HZ = 60.0
F0_MAX_HZ = 400.0

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def db_to_loudness(db: Tensor) -> Tensor:
    return ((db - LOUDNESS_DB_LOW) / (LOUDNESS_DB_HIGH - LOUDNESS_DB_LOW)).clamp(0.0, 1.0)


def frame_db(frame: Tensor) -> Tensor:
    """RMS level in dBFS of each row: (B, N) -> (B,). Floored at -100 dB so silence stays finite."""
    return 10.0 * torch.log10(frame.pow(2).mean(dim=-1) + 1e-10)


def _hann(n: int) -> Tensor:
    # periodic Hann, the usual analysis window
    return (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float64) / n))


def _dft_basis(n_window: int, n_fft: int, n_bins: int) -> Tensor:
    """(n_window, 2 * n_bins) real matrix: windowed samples @ basis = [real | imag] of the rFFT.

    A matmul with a fixed basis instead of torch.stft keeps the graph a plain MatMul for ONNX.
    """
    n = torch.arange(n_window, dtype=torch.float64)[:, None]
    k = torch.arange(n_bins, dtype=torch.float64)[None, :]
    phase = 2 * math.pi * n * k / n_fft
    window = _hann(n_window)[:, None]
    return torch.cat([window * torch.cos(phase), -window * torch.sin(phase)], dim=1).float()


class _PitchTracker(nn.Module):
    """Normalised cross-correlation pitch tracker (RAPT-style NCCF) on the sample buffer.

    The span around the target frame is halved to 8 kHz (pair averages: voice periodicity lives
    below 4 kHz, and it quarters the work), then
        nccf(lag) = sum x[n] x[n+lag] / sqrt(sum x[n]^2 * sum x[n+lag]^2),  n < PITCH_WINDOW.
    The chosen lag maximises nccf with a slight preference for short lags (so a multiple of the
    period is not picked), refined by a parabola through its neighbours.
    """

    DECIMATE = 2
    WINDOW = 256  # samples at 8 kHz correlated per lag: 32 ms, two periods at 60 Hz

    def __init__(self) -> None:
        super().__init__()
        rate = SAMPLE_RATE // self.DECIMATE
        self.min_lag = int(math.floor(rate / F0_MAX_HZ))  # 20
        self.max_lag = int(math.ceil(rate / F0_MIN_HZ))  # 134
        # one extra lag on each side so every candidate has two neighbours for the parabola
        lags = torch.arange(self.min_lag - 1, self.max_lag + 2)
        self.span = self.WINDOW + int(lags[-1])  # at 8 kHz
        # the analysis span is centred on the target frame's centre
        self.start = TARGET_CENTER - self.span * self.DECIMATE // 2
        assert self.start >= 0 and self.start + self.span * self.DECIMATE <= BUFFER_SAMPLES, "pitch span exceeds the buffer"
        n = torch.arange(self.WINDOW)
        self.register_buffer("lags", lags.float() * self.DECIMATE, persistent=False)  # in 16 kHz samples
        # -0.15 per lag range in log lag: the double period (nccf nearly equal, and sampled more
        # finely at 8 kHz) loses by 0.05, a clearly better peak still wins
        log_lag = torch.log(lags.float())
        preference = -0.15 * (log_lag - log_lag[0]) / (log_lag[-1] - log_lag[0])
        self.register_buffer("lag_preference", preference, persistent=False)
        self.register_buffer("neighbours", torch.tensor([[-1, 0, 1]]), persistent=False)
        # a constant-index gather builds the (lag, n) matrix: one Gather node in ONNX
        self.register_buffer("shift_index", (lags[:, None] + n[None, :]).reshape(-1), persistent=False)
        self.register_buffer("energy_end", lags + self.WINDOW, persistent=False)
        self.register_buffer("energy_start", lags, persistent=False)

    def forward(self, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """buffer: (B, BUFFER_SAMPLES) -> (lag in 16 kHz samples (B,), peak nccf (B,))."""
        batch = buffer.shape[0]
        span = buffer[:, self.start:self.start + self.span * self.DECIMATE]
        span = span.reshape(batch, self.span, self.DECIMATE).mean(dim=2)  # (B, S) at 8 kHz
        span = span - span.mean(dim=1, keepdim=True)  # remove a microphone's DC offset
        base = span[:, :self.WINDOW]  # (B, W)
        shifted = torch.index_select(span, 1, self.shift_index).reshape(batch, -1, self.WINDOW)  # (B, L, W)
        cross = torch.matmul(shifted, base[:, :, None])[:, :, 0]  # (B, L)
        # sliding energies from a cumulative sum: e(lag) = sum of span^2 over [lag, lag + W)
        cumulative = torch.cumsum(nn.functional.pad(span.pow(2), (1, 0)), dim=1)
        energy = torch.index_select(cumulative, 1, self.energy_end) - torch.index_select(cumulative, 1, self.energy_start)
        nccf = cross / torch.sqrt(energy.clamp(min=0.0) * base.pow(2).sum(dim=1, keepdim=True) + 1e-9)

        # a slight preference for short lags keeps a period's multiples (nearly as correlated)
        # from winning; the outermost lags are only neighbours for the parabola
        best = torch.argmax(nccf + self.lag_preference, dim=1, keepdim=True).clamp(1, nccf.shape[1] - 2)
        y0, y1, y2 = torch.gather(nccf, 1, best + self.neighbours).unbind(dim=1)  # (B,) each
        curvature = y0 - 2 * y1 + y2  # < 0 at a peak
        offset = (0.5 * (y0 - y2) / torch.clamp(curvature, max=-1e-6)).clamp(-0.5, 0.5)
        lag = (best[:, 0] + offset) * self.DECIMATE + self.lags[0]
        return lag, y1


class _Spectrum(nn.Module):
    """Power spectrum of the target frame (frame t-1) up to 4 kHz, 40 Hz per bin."""

    N_FFT = SAMPLES_PER_FRAME  # 400 samples -> 40 Hz bins
    MAX_HZ = 4000.0

    def __init__(self) -> None:
        super().__init__()
        self.n_bins = int(self.MAX_HZ * self.N_FFT / SAMPLE_RATE) + 1  # 101
        self.register_buffer("basis", _dft_basis(self.N_FFT, self.N_FFT, self.n_bins), persistent=False)
        self.register_buffer(
            "freqs", torch.arange(self.n_bins, dtype=torch.float32) * SAMPLE_RATE / self.N_FFT, persistent=False
        )

    def forward(self, buffer: Tensor) -> Tensor:
        """buffer: (B, BUFFER_SAMPLES) -> power (B, n_bins)."""
        frame = buffer[:, TARGET_START:TARGET_START + SAMPLES_PER_FRAME]
        spec = frame @ self.basis
        return spec[:, : self.n_bins].pow(2) + spec[:, self.n_bins:].pow(2)


def frame_measures(buffer: Tensor, pitch: _PitchTracker) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level, pitch period, periodicity and zero-crossing rate of the target frame (frame t-1).

    buffer: (B, BUFFER_SAMPLES) -> db (B,) dBFS, lag (B,) samples at 16 kHz, nccf peak (B,),
    crossings (B,) per sample.
    """
    target = buffer[:, TARGET_START:TARGET_START + SAMPLES_PER_FRAME]
    lag, periodicity = pitch(buffer)
    crossings = (target[:, 1:] * target[:, :-1] < 0).to(torch.float32).mean(dim=1)
    return frame_db(target), lag, periodicity, crossings


def _band(freqs: Tensor, lo: float, hi: float) -> Tensor:
    return ((freqs >= lo) & (freqs < hi)).float()


# Hand-set ramps of the DSP baseline: (measure, value at 0, value at 1), clipped to 0..1.
# Measures: level (dBFS), below_peak (dB relative to the running speech peak), periodicity (NCCF
# peak), crossings (zero crossings per sample), f1_hz (spectral centroid 200-1000 Hz),
# high_db (energy 1.5-3.5 kHz over 200-1000 Hz), low_share (share of energy below 500 Hz).
_MEASURES = ("level", "below_peak", "periodicity", "crossings", "f1_hz", "high_db", "low_share")
_RAMPS = (
    ("loudness", "level", LOUDNESS_DB_LOW, LOUDNESS_DB_HIGH),
    ("periodic", "periodicity", 0.4, 0.7),
    ("audible", "level", -55.0, -45.0),  # quieter than about -50 dBFS is not speech
    ("tonal", "crossings", 0.3, 0.2),  # fricatives cross zero every few samples
    ("relative", "below_peak", -30.0, 0.0),  # speech level, gain-independent
    ("open", "f1_hz", 350.0, 750.0),  # open vowels have F1 ~700 Hz, close vowels ~300 Hz
    ("wide", "high_db", -22.0, -8.0),  # "ee": strong F2/F3 around 2-3 kHz
    ("round", "high_db", -20.0, -32.0),  # "oo": almost nothing above 1.5 kHz
    ("muffled", "low_share", 0.85, 0.95),  # nasal murmur: energy below 500 Hz
    ("dull", "high_db", -25.0, -35.0),
    ("dipped", "below_peak", -6.0, -12.0),  # nasals are quieter than the vowels around them
    ("quiet", "below_peak", -24.0, -26.0),  # near silence relative to speech
)


class DSPAudioEncoder(nn.Module):
    """The weight-free baseline: loudness, NCCF voicing/pitch, spectral-band mouth shapes.

    Mouth shapes come from hand-set ramps (_RAMPS), so they are rough and voice-dependent:
      jaw_open    level relative to a running speech peak (automatic gain), raised by a high
                  first-formant centroid
      lips_wide   energy 1.5-3.5 kHz relative to 200-1000 Hz (high F2, as in "ee")
      lips_round  low F1 centroid and little energy above 1.5 kHz (low F2, as in "oo")
      lips_closed a short quiet gap right after speech (stop closure), or a voiced murmur with
                  almost all energy below 500 Hz (nasal /m/); it also fires for /t k/ closures
                  and /n/, which a spectrum this coarse cannot tell from bilabials.

    State: sample history (B, 800), running speech peak in dB (B, 1), frames of quiet since
    speech (B, 1), smoothed mouth features (B, 4).
    """

    lookahead_frames = LOOKAHEAD_FRAMES

    def __init__(self) -> None:
        super().__init__()
        self.pitch = _PitchTracker()
        self.spectrum = _Spectrum()
        f = self.spectrum.freqs
        f1 = _band(f, 200.0, 1000.0)
        # one matmul gives every band sum: [F1 band, F1 band weighted by Hz, 1.5-3.5 kHz, < 500 Hz, all]
        bands = torch.stack([f1, f1 * f, _band(f, 1500.0, 3500.0), _band(f, 60.0, 500.0), _band(f, 60.0, 4000.0)], 1)
        self.register_buffer("bands", bands, persistent=False)
        index = torch.tensor([_MEASURES.index(m) for _, m, _, _ in _RAMPS])
        lo = torch.tensor([a for _, _, a, _ in _RAMPS])
        hi = torch.tensor([b for _, _, _, b in _RAMPS])
        self.register_buffer("ramp_index", index, persistent=False)
        self.register_buffer("ramp_lo", lo, persistent=False)
        self.register_buffer("ramp_scale", 1.0 / (hi - lo), persistent=False)
        # one-pole smoothing of the mouth features; closure stays sharp (plosives need a fast attack)
        self.register_buffer("smoothing", torch.tensor([0.6, 0.5, 0.5, 1.0]), persistent=False)

    def initial_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        return (
            torch.zeros(batch, BUFFER_SAMPLES - SAMPLES_PER_FRAME),
            torch.full((batch, 1), -40.0),  # speech peak starts at a typical speaking level
            torch.full((batch, 1), 100.0),  # "long ago": no closure at the very start
            torch.zeros(batch, 4),
        )

    def forward(
        self, samples: Tensor, history: Tensor, peak_db: Tensor, quiet_frames: Tensor, mouth: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """samples (B, 400); history (B, 800); peak_db (B, 1); quiet_frames (B, 1); mouth (B, 4)
        -> features (B, 7), history (B, 800), peak_db (B, 1), quiet_frames (B, 1), mouth (B, 4)."""
        buffer = torch.cat([history, samples], dim=1)  # (B, 1200): frames t-2, t-1, t
        db, lag, periodicity, crossings = frame_measures(buffer, self.pitch)
        db = db[:, None]  # (B, 1)
        # automatic gain: the speech peak rises at once and falls 0.05 dB per frame (2 dB/s)
        peak_db = torch.maximum(peak_db - 0.05, db).clamp(min=-45.0)

        sums = self.spectrum(buffer) @ self.bands + 1e-10  # (B, 5)
        f1_energy, f1_moment, high, low, total = sums.unbind(dim=1)
        measures = torch.stack(
            [db[:, 0], (db - peak_db)[:, 0], periodicity, crossings, f1_moment / f1_energy,
             10.0 * torch.log10(high / f1_energy), low / total], dim=1)  # (B, 7) in _MEASURES order
        ramps = ((measures[:, self.ramp_index] - self.ramp_lo) * self.ramp_scale).clamp(0.0, 1.0)
        loudness, periodic, audible, tonal, relative, is_open, wide, rnd, muffled, dull, dipped, quiet = (
            ramps.unbind(dim=1))

        voicing = periodic * audible * tonal
        speech = relative * voicing
        # the automatic gain would lift steady hiss to "speech": below -50 dBFS nothing opens the jaw
        jaw = relative.pow(1.5) * (0.45 + 0.55 * is_open) * audible
        quiet_frames = (quiet_frames + 1.0) * quiet[:, None]  # counts frames of quiet, 0 when loud
        # a stop closure lasts 50-120 ms: quiet for at most 4 frames right after speech
        gap = quiet * (quiet_frames[:, 0] <= 4.0).to(torch.float32)
        murmur = voicing * muffled * dull * dipped
        raw = torch.stack([jaw, wide * speech, rnd * (1.0 - is_open) * speech, torch.maximum(gap, murmur)], 1)
        mouth = self.smoothing * raw + (1.0 - self.smoothing) * mouth
        jaw_open = mouth[:, 0:1] * (1.0 - mouth[:, 3:4])  # closed lips hold the jaw nearly shut

        f0 = SAMPLE_RATE / lag
        pitch = torch.log2(f0 / PITCH_REF_HZ) * (voicing > 0.5).to(torch.float32)
        features = torch.cat([jaw_open, mouth[:, 1:4], voicing[:, None], loudness[:, None], pitch[:, None]], 1)
        return features, buffer[:, SAMPLES_PER_FRAME:], peak_db, quiet_frames, mouth


def mel_filterbank(n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale, each peaking at 1."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * SAMPLE_RATE / n_fft
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None).T.astype(np.float32))


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int = 40
    mel_hop: int = 100  # samples between log-mel frames: 4 per tick (6.25 ms)
    mel_window: int = 400  # 25 ms Hann window
    n_fft: int = 512
    f_min: float = 50.0
    f_max: float = 7600.0
    mel_floor: float = 1e-7  # power floor before the log: silence maps to log(mel_floor)
    hidden: int = 160  # width of the per-tick MLP
    gru: int = 128  # recurrent state width

    @property
    def mels_per_tick(self) -> int:
        return SAMPLES_PER_FRAME // self.mel_hop

    @property
    def n_inputs(self) -> int:
        # log-mel frames of this tick and the previous one, plus the four DSP measures
        return 2 * self.mels_per_tick * self.n_mels + N_MEASURES


MEASURE_NAMES = ("loudness", "periodicity", "dsp_pitch", "crossings")
N_MEASURES = len(MEASURE_NAMES)


class AudioFrontend(nn.Module):
    """Fixed (untrained) analysis of one tick's buffer: log-mel frames and DSP measures.

    The log-mel windows end at the newest sample and every mel_hop before it, so the frames of
    consecutive ticks tile the stream; the measures describe frame t-1 (the output frame).
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        n_bins = config.n_fft // 2 + 1
        self.register_buffer("basis", _dft_basis(config.mel_window, config.n_fft, n_bins), persistent=False)
        self.register_buffer("filters", mel_filterbank(config.n_fft, config.n_mels, config.f_min, config.f_max), persistent=False)
        ends = BUFFER_SAMPLES - config.mel_hop * torch.arange(config.mels_per_tick - 1, -1, -1)
        index = (ends[:, None] - config.mel_window + torch.arange(config.mel_window)[None, :]).reshape(-1)
        self.register_buffer("window_index", index, persistent=False)
        self.pitch = _PitchTracker()
        self.n_bins = n_bins

    def forward(self, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """buffer: (B, BUFFER_SAMPLES) -> log-mel (B, mels_per_tick * n_mels), measures (B, 4)."""
        batch = buffer.shape[0]
        c = self.config
        windows = torch.index_select(buffer, 1, self.window_index).reshape(batch * c.mels_per_tick, c.mel_window)
        spec = windows @ self.basis  # (B * M, 2 * bins)
        power = spec[:, : self.n_bins].pow(2) + spec[:, self.n_bins:].pow(2)
        log_mel = torch.log(power @ self.filters + c.mel_floor).reshape(batch, c.mels_per_tick * c.n_mels)
        db, lag, periodicity, crossings = frame_measures(buffer, self.pitch)
        dsp_pitch = torch.log2(SAMPLE_RATE / lag / PITCH_REF_HZ)
        measures = torch.stack([db_to_loudness(db), periodicity, dsp_pitch, crossings], dim=1)
        return log_mel, measures

    def silence_mel(self, batch: int) -> Tensor:
        """The log-mel of an all-zero tick: (B, mels_per_tick * n_mels)."""
        return torch.full((batch, self.config.mels_per_tick * self.config.n_mels), math.log(self.config.mel_floor))

    def sequence(self, samples: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """Whole clips at once (training and evaluation): the same numbers as tick by tick.

        samples: (B, T * 400) -> log-mel (B, T, mels_per_tick * n_mels), measures (B, T, 4).
        """
        batch, n = samples.shape
        ticks = n // SAMPLES_PER_FRAME
        padded = torch.cat([samples.new_zeros(batch, BUFFER_SAMPLES - SAMPLES_PER_FRAME), samples], dim=1)
        buffers = padded.unfold(1, BUFFER_SAMPLES, SAMPLES_PER_FRAME)  # (B, T, 1200)
        mels, measures = [], []
        flat = buffers.reshape(batch * ticks, BUFFER_SAMPLES)
        for part in flat.split(chunk):
            m, d = self(part.contiguous())
            mels.append(m)
            measures.append(d)
        return torch.cat(mels).reshape(batch, ticks, -1), torch.cat(measures).reshape(batch, ticks, N_MEASURES)


class AudioEncoder(nn.Module):
    """The trained encoder: log-mel + DSP measures -> per-tick MLP -> GRU -> articulation.

    loudness is the exact definition (frame RMS), not learned. pitch is the NCCF tracker's
    estimate, gated to 0 where the network says the frame is unvoiced (a learned correction of
    the tracker was tried and added more error than it removed). jaw/lips/voicing are learned
    from synthesized speech with phone timings (engines/train_audio.py).

    State: sample history (B, 800), previous tick's log-mel (B, mels_per_tick * n_mels), GRU
    hidden state (B, gru).
    """

    lookahead_frames = LOOKAHEAD_FRAMES

    def __init__(self, config: AudioEncoderConfig = AudioEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.frontend = AudioFrontend(config)
        # input normalisation measured on the training corpus (saved with the weights)
        self.register_buffer("input_mean", torch.zeros(config.n_inputs))
        self.register_buffer("input_std", torch.ones(config.n_inputs))
        self.mlp = nn.Sequential(
            nn.Linear(config.n_inputs, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(),
        )
        self.gru = nn.GRU(config.hidden, config.gru, batch_first=True)
        # jaw, wide, round, closed and voicing logits
        self.head = nn.Linear(config.gru + config.hidden, 5)

    def initial_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        return (
            torch.zeros(batch, BUFFER_SAMPLES - SAMPLES_PER_FRAME),
            self.frontend.silence_mel(batch),
            torch.zeros(batch, self.config.gru),
        )

    def core(self, prev_mel: Tensor, mel: Tensor, measures: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The trained part, over T ticks at once (T = 1 when streaming).

        prev_mel, mel: (B, T, M) log-mel of ticks t-1 and t; measures: (B, T, 4); hidden: (B, H)
        -> features (B, T, 7), hidden (B, H).
        """
        x = torch.cat([prev_mel, mel, measures], dim=2)
        x = (x - self.input_mean) / self.input_std
        z = self.mlp(x)  # (B, T, hidden)
        out, h = self.gru(z, hidden[None].contiguous())  # (B, T, gru), (1, B, gru)
        y = self.head(torch.cat([out, z], dim=2))  # (B, T, 5)
        mouth = torch.sigmoid(y[..., 0:4])
        voicing = torch.sigmoid(y[..., 4:5])
        pitch = measures[..., 2:3] * (voicing > 0.5).to(y.dtype)
        loudness = measures[..., 0:1]
        return torch.cat([mouth, voicing, loudness, pitch], dim=2), h[0]

    def forward(self, samples: Tensor, history: Tensor, prev_mel: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """samples (B, 400); history (B, 800); prev_mel (B, 4 * n_mels); hidden (B, gru)
        -> features (B, 7), history (B, 800), prev_mel (B, 4 * n_mels), hidden (B, gru)."""
        buffer = torch.cat([history, samples], dim=1)  # (B, 1200): frames t-2, t-1, t
        mel, measures = self.frontend(buffer)
        features, hidden = self.core(prev_mel[:, None], mel[:, None], measures[:, None], hidden)
        return features[:, 0], buffer[:, SAMPLES_PER_FRAME:], mel, hidden

    def logits_sequence(self, mel: Tensor, measures: Tensor) -> Tensor:
        """Training view: raw head outputs for whole sequences from the initial state.

        mel: (B, T, M) from AudioFrontend.sequence; measures: (B, T, 4) -> (B, T, 5)."""
        prev = torch.cat([self.frontend.silence_mel(mel.shape[0])[:, None].to(mel), mel[:, :-1]], dim=1)
        x = (torch.cat([prev, mel, measures], dim=2) - self.input_mean) / self.input_std
        z = self.mlp(x)
        out, _ = self.gru(z)
        return self.head(torch.cat([out, z], dim=2))

    def sequence(self, samples: Tensor) -> Tensor:
        """Whole clips from the initial state: samples (B, T * 400) -> features (B, T, 7)."""
        mel, measures = self.frontend.sequence(samples)
        prev = torch.cat([self.frontend.silence_mel(mel.shape[0])[:, None], mel[:, :-1]], dim=1)
        features, _ = self.core(prev, mel, measures, torch.zeros(samples.shape[0], self.config.gru))
        return features


def encode_clip(encoder: nn.Module, samples: Tensor) -> Tensor:
    """Run an encoder tick by tick over a whole clip.

    samples: (B, N) float32, N a multiple of SAMPLES_PER_FRAME (pad the caller's audio).
    Returns (B, N / SAMPLES_PER_FRAME, N_ARTICULATION); row t describes frame t - lookahead_frames.
    """
    if samples.ndim != 2 or samples.shape[1] % SAMPLES_PER_FRAME:
        raise ValueError(f"expected (B, k*{SAMPLES_PER_FRAME}) samples, got {tuple(samples.shape)}")
    state = encoder.initial_state(samples.shape[0])
    out = []
    for tick in samples.split(SAMPLES_PER_FRAME, dim=1):
        features, *state = encoder(tick, *state)
        out.append(features)
    return torch.stack(out, dim=1)


def load_audio_encoder(name: str = "trained") -> nn.Module:
    """"trained" -> the AudioEncoder with committed weights; "dsp" -> the weight-free baseline."""
    if name == "dsp":
        return DSPAudioEncoder().eval()
    if name == "trained":
        return load_trained_weights(WEIGHTS_DIR / "audio_encoder.pt")
    raise AvatarError(f"unknown audio encoder {name!r}; choose 'trained' or 'dsp'")


def load_trained_weights(path: Path) -> AudioEncoder:
    """The AudioEncoder with weights from a file written by engines.train_audio."""
    if not Path(path).is_file():
        raise AvatarError(f"audio encoder weights not found at {path}; run python -m engines.train_audio")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    encoder = AudioEncoder(AudioEncoderConfig(**checkpoint["config"]))
    encoder.load_state_dict(checkpoint["state_dict"])
    return encoder.eval()
