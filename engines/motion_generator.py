"""MotionGenerator: articulation + controls + noise + state -> one motion vector per 25 ms frame.

Contract (one call per video frame, 40 Hz):

    motion, *state = generator(features, controls, noise, *state)
    features: (B, 7)            articulation of this frame, engines/audio_encoder.py ARTICULATION order
    controls: (B, N_CONTROLS)   avatar/controls.py CONTROL_NAMES layout (mood, gaze, head offsets, ...)
    noise:    (B, N_NOISE)      uniform(0, 1), drawn by the caller from a seeded generator each frame
    state:    STATE_SHAPES tensors, (B, width) float32 each; `initial_state(B)` gives the first ones
    motion:   (B, N_CHANNELS)   avatar/motion.py layout, clamped to each channel's range

All randomness comes from `noise`, all memory from the state tensors, and there is no Python
control flow on data, so the same stateless graph runs in torch, onnxruntime and TensorRT, and the
same seed and audio give the same motion.

The behaviour is hand-built from measured human figures (shared/REFERENCE.md), not learned:
- mouth: the articulation targets through asymmetric smoothing; a lip closure closes the lips in
  the frame it appears and drops the jaw with it; while talking the lips seal as the jaw nears
  shut (lips_press grows to SEAL_MAX at jaw 0), so a photo with parted lips does not talk through
  its fixed gap; silence relaxes and closes the mouth.
- prosody: a speech detector with a tracked noise floor, pause/utterance timers, and stressed
  syllables as loudness/pitch peaks over running averages.
- head: drift (band-limited noise, larger while talking), damped nods/turns kicked by stressed
  syllables and phrase onsets, breathing (~0.25 Hz, irregular), a partial turn toward the gaze target.
- brows: a quick raise on stressed syllables, phrase onsets and pitch rises, decaying after.
- blinks: a renewal process (hazard + refractory time) with sampled closing/closed/reopening
  durations and depth (about half partial), more frequent while talking, at phrase boundaries and
  after gaze shifts.
- gaze: saccadic jumps (small every 0.5-2 s), aversion at utterance start and return at its end,
  the controlled target; the eyes counter-rotate against head motion so eye contact holds.
- controls glide (two cascaded low-passes, ~0.5 s) so a mood change never jumps; the gaze target
  does not glide, the eyes jump to it.

gaze_yaw/gaze_pitch are the eyes in the head (what a renderer moves inside the eye opening); the
line of sight is head angle + eye angle, and it is the line of sight that the gaze control aims.

It runs in float32 only (`half()` refuses): it is tiny, and its timers, counters and phases need
float32's resolution. Measured in float16 on the CPU, blinks and saccades left the float32
sequence within 20 s (gaze 4.8 deg, lids 0.7 apart), so a float16 build could never pass parity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from avatar.constants import FPS
from avatar.controls import CONTROL_NAMES, N_CONTROLS
from avatar.motion import CHANNELS, NAMES, N_CHANNELS

DT = 1.0 / FPS  # seconds per frame
SQRT3 = math.sqrt(3.0)  # uniform(-SQRT3, SQRT3) has unit variance

# engines/audio_encoder.py ARTICULATION, repeated here so this engine does not import the encoder
ARTICULATION = ("jaw_open", "lips_wide", "lips_round", "lips_closed", "voicing", "loudness", "pitch")
N_FEATURES = len(ARTICULATION)


def _alpha(tau_s: float) -> float:
    """Per-frame coefficient of a one-pole low-pass with time constant tau_s."""
    return 1.0 - math.exp(-DT / tau_s)


# ---- behaviour constants (sources: shared/REFERENCE.md unless said) ----------------------------
CONTROL_TAU = 0.25  # s per glide stage; two stages reach a new mood in about 0.5-1 s, S-shaped

# speech detection on the 0..1 loudness feature (-60 dBFS -> 0, -10 dBFS -> 1)
SPEECH_LOUDNESS = 0.3  # -45 dBFS: below this never speech
FLOOR_MARGIN = 0.15  # speech must also be this far (7.5 dB) above the tracked noise floor
FLOOR_RISE = 0.02  # per second: the floor creeps up, falls at once (a minimum tracker)
PAUSE_S = 0.3  # a pause this long ends a phrase; speech after it is a phrase onset
BOUNDARY_S = 0.25  # silence this long after speech counts as a phrase end (blink boundary)
ACTIVITY_TAU = 0.4  # s: how fast idle behaviour turns into talking behaviour and back

# stressed syllables: loudness (and pitch rise) peaks over running averages
LOUD_FAST_TAU = 0.04
AVG_TAU = 1.5  # s of speech the running averages remember
AVG_COUNT_CAP = AVG_TAU * FPS  # a plain running mean until this many frames, then an EMA
PITCH_FAST_TAU = 0.05
PITCH_STRESS_WEIGHT = 0.5  # loudness units per octave of pitch rise
STRESS_THRESHOLD = 0.10
STRESS_REFRACTORY = 0.35  # s: at most ~3 accents a second

# mouth
A_JAW_OPEN, A_JAW_CLOSE = _alpha(0.015), _alpha(0.02)  # measured: 0.03, 0.05 cost 0.025 of r with the phone target (lag +1)
A_LIPS = _alpha(0.04)
# the encoder's lips_round regresses to the mean (held-out corr ~0.5), and on a smiling photo the
# smile hides half of what is left: 1.6 took rendered mouth width on rounded vowels from 0.967 to 0.939
# of the median (spread 1.02, open 0.98, aperture r unchanged within 0.002); 2.2 began to pucker open vowels
ROUND_GAIN = 1.6
A_PRESS_RELEASE = _alpha(0.012)  # the attack is instant so plosives close in their own frame
# lips_closed feature -> press 0 .. 1. Measured (face-mesh aperture of the decoder's frames as a
# function of jaw_open and lips_press, applied to the commanded motion) on held-out voices reading
# held-out sentences that the lip-sync benchmark does not use: 0.2 .. 0.5 pressed the lips in frames
# around a closure where the phone target already opens (aperture r 0.745); 0.4 .. 0.7 hits as many
# closures with fewer false ones (r 0.755); 0.5 .. 0.8 began to miss closures (87.5 -> 83 %)
CLOSURE_LOW, CLOSURE_FULL = 0.4, 0.7
JAW_GATE_WIDTH = 0.1  # loudness span over which the jaw target fades in around the speech threshold
# the lip seal: while talking, the lips come together as the jaw nears closed (t, n, s, pauses), so a
# portrait photographed with parted lips does not talk through a fixed gap; gone at SEAL_JAW
SEAL_JAW, SEAL_MAX = 0.7, 0.9  # measured as above: gone at 0.5 the aperture rose too fast at low jaw (r -0.01)

# head, degrees (face widths for tx/ty, log for scale); drift std per HEAD_AXES
HEAD_AXES = ("yaw", "pitch", "roll", "tx", "ty", "scale")
DRIFT_TAU = 0.45  # s per stage of the drift filter (x mood smoothing)
DRIFT_IDLE = (0.7, 0.5, 0.35, 0.003, 0.002, 0.003)
# talking: the rendered head measured 0.70x (yaw) and 0.75x (pitch) of the commanded rotation
# (face mesh on the frames, benchmarks/lipsync.py), so drift and nods command about 1.25x the
# 2-3 deg std a person on a call shows (were 2.6, 2.0 and 0.8x these nods: measured 1.65, 1.47 deg)
DRIFT_TALK = (3.2, 2.5, 0.9, 0.006, 0.004, 0.006)
NOD_HZ, NOD_DAMPING = 2.2, 0.7  # a nod lasts ~0.4 s with a small rebound
NOD_DRIVE_TAU = 0.1  # s: the spring is pushed by a decaying pulse, so a nod starts without a jerk
# kick sizes (yaw, pitch, roll), uniform between low and high, scaled by the accent's strength:
# a stressed syllable tips the chin down with a little turn; a phrase onset lifts it and turns more
NOD_STRESS = ((-1.9, 1.5, -0.6), (1.9, 4.0, 0.6))
NOD_ONSET = ((-3.1, -1.0, -0.8), (3.1, -2.9, 0.8))
BREATH_HZ = 0.25
BREATH_JITTER = 0.15  # relative rate wobble: breathing is not a metronome
BREATH_RATE_TAU = 4.0
BREATH = (0.0, -0.35, 0.0, 0.0, -0.004, 0.0)  # per HEAD_AXES at rest: the chin and head rise on the inhale
BREATH_TALKING = 0.45  # breathing motion while talking, relative to rest
ALIVE = 0.2  # breathing left at expressiveness 0: still, but not frozen
GAZE_FOLLOW = 0.25  # the head turns this fraction of the way to the gaze target
AVERT_FOLLOW = 0.15  # and this fraction of a gaze aversion
FOLLOW_TAU = 0.4

# gaze, degrees, (yaw, pitch)
A_SACCADE = 0.75  # per frame: a jump completes in 2-3 frames (saccades last 30-80 ms)
SACCADE_RATE = 0.8  # per s, after a refractory time: one every ~0.55-2 s
SACCADE_REFRACTORY = 0.3
MICRO = (1.5, 0.9)  # max |offset| of the small jumps around the target
MICRO_ALIVE = 0.3  # micro-saccades left at expressiveness 0
AVERT_PROBABILITY = 0.72  # of utterances starting with a look away
AVERT_YAW = (3.0, 4.0)  # at least + up to extra, either side
AVERT_PITCH = (-4.0, 2.0)  # uniform: two thirds of aversions go up
AVERT_DURATION = (0.8, 2.5)  # s, uniform
AVERT_END_SILENCE = 0.15  # s of silence that brings the eyes back
SHIFT_DEG = 4.0  # a gaze jump this big (|yaw| + |pitch|) is a gaze shift (aversions, new targets), not a micro-saccade
WANDER_RATE = 0.3  # per s: a new random target with gaze "wander"
WANDER = (8.0, 4.0)
VOR_GAIN = 0.9  # eyes counter-rotate against head motion to hold the line of sight
LID_FOLLOWS_GAZE = 0.02  # upper lid closure per degree of looking down (lids follow the eyes)

# blinks: ~17/min at rest, ~26/min talking; ~100 ms closing, 50-150 ms closed, 150-200 ms reopening
TALK_BLINK_GAIN = 0.5  # talking multiplies the rest rate by 1.5 (17 -> 25.5)
BLINK_REFRACTORY = 0.4  # s after a blink ends before another can start
BLINK_CLOSE, BLINK_HOLD, BLINK_REOPEN = (0.08, 0.12), (0.05, 0.15), (0.15, 0.20)  # s, uniform
MEAN_BLINK_S = sum((a + b) / 2 for a, b in (BLINK_CLOSE, BLINK_HOLD, BLINK_REOPEN))
PARTIAL_SHARE = 0.5
PARTIAL_DEPTH, FULL_DEPTH = (0.5, 0.8), (0.95, 1.0)
BLINK_ASYM = 0.06  # the right lid closes up to 6% less: both eyes together, never a wink
SHIFT_BOOST = 2.0  # hazard x (1 + this) within BOOST_S after a gaze shift
BOUNDARY_BOOST = 3.0  # and x (1 + this) within BOOST_S of a phrase start or end
BOOST_S = 0.5
BOOST_AVG_TAU = 10.0  # s: the hazard is divided by the boost's running mean, so boosts move blinks
                      # toward boundaries and shifts without changing how many there are

# brows
BROW_STRESS_SHARE = 0.6  # of stressed syllables that raise the brows (people do not flash at every one)
BROW_STRESS = (0.2, 0.25)  # that raise: base + up to extra, x brow gain x strength
BROW_ONSET = 0.25  # raise at a phrase onset (on 60% of them)
BROW_PITCH = 0.8  # raise per octave of pitch above the running average (questions rise)
BROW_PITCH_DEADBAND = 0.2
BROW_HOLD_TAU = 0.3
BROW_SHAPE = (0.6, 1.0, 0.93, 0.0)  # inner up, outer up left, outer up right, down: per unit raise
A_BROW_UP, A_BROW_DOWN = _alpha(0.06), _alpha(0.35)  # a brow flash rises in ~150 ms


class Slots:
    """Named column groups of one (B, width) tensor: unpack to a dict of (B, w) views, pack back.

    A field is a name (one column) or (name, width). Columns that move together are grouped so the
    math runs on them as one vector: on the CPU each tensor op costs microseconds whatever its size.
    """

    def __init__(self, *fields: str | tuple[str, int]):
        fields = tuple((f, 1) if isinstance(f, str) else f for f in fields)
        self.names = tuple(name for name, _ in fields)
        self.widths = [w for _, w in fields]
        self.width = sum(self.widths)
        starts = [sum(self.widths[:i]) for i in range(len(fields))]
        self.slices = {name: slice(a, a + w) for (name, w), a in zip(fields, starts)}

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, x.split(self.widths, dim=1)))

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        return torch.cat([values[n] for n in self.names], dim=1)


# ---- noise: the caller's uniform(0,1) numbers, each mapped to the range of its use ----------------
NOISE_RANGES: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = (
    ("drift", ((-SQRT3, SQRT3),) * len(HEAD_AXES)),  # unit-variance drivers of the head drift
    ("blink_hazard", ((0.0, 1.0),)),
    ("blink_partial", ((0.0, 1.0),)),  # < PARTIAL_SHARE: a partial blink
    ("blink_depth", (PARTIAL_DEPTH, FULL_DEPTH)),  # (if partial, if full)
    ("blink_gain", ((1.0, 1.0), (1.0 - BLINK_ASYM, 1.0))),  # (left, right) share of the blink
    ("blink_shape", (BLINK_CLOSE, BLINK_HOLD, BLINK_REOPEN)),
    ("saccade_hazard", ((0.0, 1.0),)),
    ("saccade", ((-MICRO[0], MICRO[0]), (-MICRO[1], MICRO[1]))),
    ("avert_hazard", ((0.0, 1.0),)),
    ("avert", ((-AVERT_YAW[1], AVERT_YAW[1]), AVERT_PITCH)),  # yaw pushed out by AVERT_YAW[0] below
    ("avert_duration", (AVERT_DURATION,)),
    ("wander_hazard", ((0.0, 1.0),)),
    ("wander", ((-WANDER[0], WANDER[0]), (-WANDER[1], WANDER[1]))),
    ("nod", ((0.0, 1.0),) * 3),  # (yaw, pitch, roll) place within the kick's range
    ("breath", ((-SQRT3, SQRT3),)),
    ("brow", ((0.0, 1.0),)),
)
NOISE = Slots(*((name, len(ranges)) for name, ranges in NOISE_RANGES))
N_NOISE = NOISE.width

# ---- state tensors ----------------------------------------------------------------------------
MOUTH = Slots("jaw", ("lips", 2), "press")  # lips: (wide, round)
PROSODY = Slots("started", "floor", "activity", "n_speech", "n_voiced", "loud_fast", "loud_avg", "pitch_fast",
                "pitch_avg", "drive", "boost_avg")
TIMERS = Slots("silence", "since_boundary", "since_stress", "since_saccade", "since_shift", "blink")  # seconds
HEAD = Slots("breath_phase", "breath_rate", ("follow", 2))  # follow: head (yaw, pitch) toward the gaze target
BLINK = Slots("depth", ("gain", 2), "close", "hold", "reopen")  # of the current/last blink; durations in s
GAZE = Slots(("eye", 2), ("micro", 2), ("avert", 2), ("wander", 2), "avert_left")  # (yaw, pitch) deg; s
BROW = Slots("peak", "env")
NOD = Slots(("pos", 3), ("vel", 3), ("drive", 3))  # nod/turn springs (yaw, pitch, roll): deg, deg/s, deg

STATE_SHAPES: tuple[tuple[str, int], ...] = (
    ("controls_a", N_CONTROLS),  # first stage of the controls glide
    ("controls_b", N_CONTROLS),  # second stage: the controls in effect
    ("mouth", MOUTH.width),
    ("prosody", PROSODY.width),
    ("timers", TIMERS.width),
    ("drift_a", len(HEAD_AXES)),  # first stage of the head drift filter, per HEAD_AXES
    ("drift_b", len(HEAD_AXES)),  # second stage
    ("nod", NOD.width),
    ("head", HEAD.width),
    ("blink", BLINK.width),
    ("gaze", GAZE.width),
    ("brow", BROW.width),
)
STATE_NAMES = tuple(name for name, _ in STATE_SHAPES)
LONG_AGO = 100.0  # s; timers saturate here so float32 never loses its step

# the motion vector in the groups this engine computes together (the mood offsets split the same way)
MOTION_GROUPS = Slots(("head", 6), "jaw", ("lips", 2), "press", ("mouth", 4), ("brows", 4), ("lids", 2),
                      ("eyes", 2), ("gaze", 2))
assert MOTION_GROUPS.width == N_CHANNELS
assert NAMES[:len(HEAD_AXES)] == HEAD_AXES
for _group, _names in (("lips", ("lips_wide", "lips_round")), ("press", ("lips_press",)),
                       ("mouth", ("upper_lip_up", "smile_left", "smile_right", "frown")),
                       ("brows", ("brow_inner_up", "brow_outer_up_left", "brow_outer_up_right", "brow_down")),
                       ("lids", ("blink_left", "blink_right")), ("eyes", ("squint", "eyes_wide")),
                       ("gaze", ("gaze_yaw", "gaze_pitch")), ("jaw", ("jaw_open",))):
    assert NAMES[MOTION_GROUPS.slices[_group]] == _names, _group


class _Constants:
    """Scalar constants of the per-frame math as 0-dim float32 tensors.

    An op with a Python number costs ~3 us more on the CPU than the same op with a tensor (measured
    here: x * 2.0 4.4 us, x * y 1.2 us), and this engine is a few hundred ops on (B, 1) tensors, so
    that overhead would be most of its time. The forward pass takes them from `on(device)`: a
    CUDA graph cannot capture the host-to-device copies that mixing CPU constants into CUDA ops
    (torch.where of two of them, say) would make on every frame."""

    def __init__(self, device: torch.device | None = None, **values: float):
        for name, value in values.items():
            setattr(self, name, torch.tensor(float(value), device=device))
        self._copies: dict[torch.device, _Constants] = {}

    def on(self, device: torch.device) -> _Constants:
        """The constants as tensors on `device` (made on first use, then cached)."""
        if device.type == "cpu":
            return self
        if device not in self._copies:
            values = {name: float(value) for name, value in vars(self).items() if name.isupper()}
            self._copies[device] = _Constants(device, **values)
        return self._copies[device]


K = _Constants(
    ZERO=0.0, HALF=0.5, ONE=1.0, DT=DT, LONG_AGO=LONG_AGO,
    FLOOR_STEP=FLOOR_RISE * DT, FLOOR_MARGIN=FLOOR_MARGIN, PAUSE_S=PAUSE_S, BOUNDARY_S=BOUNDARY_S,
    BOUNDARY_END=BOUNDARY_S + DT, AVG_COUNT_CAP=AVG_COUNT_CAP, PITCH_STRESS_WEIGHT=PITCH_STRESS_WEIGHT,
    STRESS_THRESHOLD=STRESS_THRESHOLD, STRESS_REFRACTORY=STRESS_REFRACTORY,
    CLOSURE_LOW=CLOSURE_LOW, CLOSURE_GAIN=1.0 / (CLOSURE_FULL - CLOSURE_LOW), JAW_GATE_GAIN=1.0 / JAW_GATE_WIDTH,
    SEAL_GAIN=SEAL_MAX / SEAL_JAW, SEAL_MAX=SEAL_MAX, ROUND_GAIN=ROUND_GAIN,
    A_JAW_OPEN=A_JAW_OPEN, A_JAW_CLOSE=A_JAW_CLOSE, A_BROW_UP=A_BROW_UP, A_BROW_DOWN=A_BROW_DOWN,
    WANDER_P=_alpha(1.0 / WANDER_RATE), SACCADE_P=SACCADE_RATE * DT, SACCADE_REFRACTORY=SACCADE_REFRACTORY,
    AVERT_PROBABILITY=AVERT_PROBABILITY, AVERT_END_SILENCE=AVERT_END_SILENCE, SHIFT_DEG=SHIFT_DEG,
    DRIFT_DECAY=-DT / DRIFT_TAU, BREATH_STEP=2.0 * math.pi * BREATH_HZ * DT, TWO_PI=2.0 * math.pi,
    BREATH_WOBBLE=2.0 * math.pi * BREATH_HZ * DT * BREATH_JITTER
    / math.sqrt(_alpha(BREATH_RATE_TAU) / (2.0 - _alpha(BREATH_RATE_TAU))),  # per unit of the rate AR(1)'s std
    BREATH_TALK_DROP=1.0 - BREATH_TALKING, ALIVE=ALIVE, MICRO_ALIVE=MICRO_ALIVE, GAZE_FOLLOW=GAZE_FOLLOW,
    AVERT_FOLLOW=AVERT_FOLLOW, BROW_STRESS_SHARE=BROW_STRESS_SHARE, BROW_STRESS=BROW_STRESS[0],
    BROW_STRESS_EXTRA=BROW_STRESS[1] / BROW_STRESS_SHARE, BROW_ONSET=BROW_ONSET, BROW_ONSET_DRAW=0.4,
    BROW_PITCH=BROW_PITCH, BROW_PITCH_DEADBAND=BROW_PITCH_DEADBAND, BROW_DECAY=-DT / BROW_HOLD_TAU,
    TALK_BLINK_GAIN=TALK_BLINK_GAIN, MIN_RATE=0.01, MIN_GAP=0.1, BLINK_FIXED_S=MEAN_BLINK_S + BLINK_REFRACTORY,
    SIXTY=60.0, SHIFT_BOOST=SHIFT_BOOST, BOUNDARY_BOOST=BOUNDARY_BOOST, BOOST_S=BOOST_S,
    BLINK_REFRACTORY=BLINK_REFRACTORY, PARTIAL_SHARE=PARTIAL_SHARE, VOR_GAIN=VOR_GAIN,
    LID_FOLLOWS_GAZE=LID_FOLLOWS_GAZE, NOD_DAMP=1.0 - 2.0 * NOD_DAMPING * 2.0 * math.pi * NOD_HZ * DT,
    NOD_STIFF=(2.0 * math.pi * NOD_HZ) ** 2 * DT, NOD_DRIVE_DECAY=math.exp(-DT / NOD_DRIVE_TAU),
    STRENGTH_BASE=0.6, STRENGTH_GAIN=2.0, SMOOTH_3=3.0, SMOOTH_2=2.0, MICRO_TALK=0.5, BREATH_HARMONIC=0.3,
    BREATH_SKEW=0.5,
)


def _nod_step(pos, vel, drive, k: _Constants = K):
    """One frame of a nod spring pushed toward `drive` (a decaying pulse), damped; semi-implicit Euler.
    Works on tensors and on Python numbers (for the calibration below)."""
    vel = vel * k.NOD_DAMP + (drive - pos) * k.NOD_STIFF
    return pos + vel * k.DT, vel, drive * k.NOD_DRIVE_DECAY


def _nod_kick_gain() -> float:
    """Pulse height per degree that makes the nod spring peak at the kick's size."""
    pos, vel, drive, peak = 0.0, 0.0, 1.0, 0.0
    for _ in range(FPS):
        pos, vel, drive = _nod_step(pos, vel, drive)
        peak = max(peak, float(pos))
    return 1.0 / peak


NOD_KICK = _nod_kick_gain()
K.NOD_KICK = torch.tensor(NOD_KICK)


def _smoothstep(x: Tensor, k: _Constants = K) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (k.SMOOTH_3 - k.SMOOTH_2 * x)


def _row(values) -> Tensor:
    return torch.tensor([values], dtype=torch.float32)


class MotionGenerator(nn.Module):
    """features (B, 7), controls (B, N_CONTROLS), noise (B, N_NOISE), *state -> motion (B, N_CHANNELS), *state.

    State tensors, in order, are STATE_SHAPES: (B, width) float32 each. No parameters: the
    behaviour is the constants above; the buffers are those constants as tensors.
    """

    N_NOISE = N_NOISE
    STATE_NAMES = STATE_NAMES

    def __init__(self):
        super().__init__()
        ranges = [r for _, group in NOISE_RANGES for r in group]
        constants = {
            "low": [c.low for c in CHANNELS], "high": [c.high for c in CHANNELS],
            "noise_low": [a for a, _ in ranges], "noise_span": [b - a for a, b in ranges],
            "drift_idle": DRIFT_IDLE, "drift_span": [t - i for t, i in zip(DRIFT_TALK, DRIFT_IDLE)],
            "stress_low": NOD_STRESS[0], "stress_span": [h - l for l, h in zip(*NOD_STRESS)],
            "onset_low": NOD_ONSET[0], "onset_span": [h - l for l, h in zip(*NOD_ONSET)],
            "breath": BREATH, "brow_shape": BROW_SHAPE, "avert_push": (AVERT_YAW[0], 0.0),
        }
        for name, values in constants.items():
            self.register_buffer(name, _row(values), persistent=False)

    def half(self):
        raise TypeError("MotionGenerator runs in float32 only: its timers and phases need float32 resolution")

    def initial_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        """The state before the first frame: silent for long, eyes open, nothing in motion."""
        state = {name: torch.zeros(batch, width) for name, width in STATE_SHAPES}
        state["prosody"][:, PROSODY.slices["floor"]] = SPEECH_LOUDNESS - FLOOR_MARGIN
        state["prosody"][:, PROSODY.slices["boost_avg"]] = 1.0
        state["timers"][:] = LONG_AGO
        # a finished blink of depth 0, so the shape's divisions are never by zero
        for name, (_, longest) in zip(("close", "hold", "reopen"), (BLINK_CLOSE, BLINK_HOLD, BLINK_REOPEN)):
            state["blink"][:, BLINK.slices[name]] = longest
        return tuple(state[name] for name in STATE_NAMES)

    def forward(self, features: Tensor, controls: Tensor, noise: Tensor, controls_a: Tensor, controls_b: Tensor,
                mouth: Tensor, prosody: Tensor, timers: Tensor, drift_a: Tensor, drift_b: Tensor, nod: Tensor,
                head: Tensor, blink: Tensor, gaze: Tensor, brow: Tensor) -> tuple[Tensor, ...]:
        """features (B, 7), controls (B, N_CONTROLS), noise (B, N_NOISE), state per STATE_SHAPES
        -> motion (B, N_CHANNELS), then the new state in STATE_SHAPES order."""
        k = K.on(features.device)  # the scalar constants, on the features' device
        f = dict(zip(ARTICULATION, features.split(1, dim=1)))  # (B, 1) each
        n = NOISE.unpack(self.noise_low + self.noise_span * noise)  # (B, w) each, in its NOISE_RANGES
        p = PROSODY.unpack(prosody)
        zero = torch.zeros_like(f["loudness"])  # (B, 1)
        ages = TIMERS.unpack((timers + k.DT).clamp(max=LONG_AGO))  # every timer a frame older; reset below

        # ---- controls: glide to the requested ones (start on them at the first frame) -----------
        first = p["started"] < k.HALF
        controls_a = torch.where(first, controls, controls_a.lerp(controls, _alpha(CONTROL_TAU)))
        controls_b = torch.where(first, controls, controls_b.lerp(controls_a, _alpha(CONTROL_TAU)))
        o = dict(zip(MOTION_GROUPS.names, controls_b[:, :N_CHANNELS].split(MOTION_GROUPS.widths, dim=1)))
        c = dict(zip(CONTROL_NAMES[N_CHANNELS:], controls_b[:, N_CHANNELS:].split(1, dim=1)))  # (B, 1) each
        raw = dict(zip(CONTROL_NAMES[N_CHANNELS:], controls[:, N_CHANNELS:].split(1, dim=1)))  # not glided
        expr = c["expressiveness"]

        # ---- prosody: speech detection, phrase timers, stressed syllables ------------------------
        loud, pitch = f["loudness"], f["pitch"]
        floor = torch.where(loud < p["floor"], p["floor"].lerp(loud, 0.5), p["floor"] + k.FLOOR_STEP)
        threshold = torch.clamp(floor + k.FLOOR_MARGIN, min=SPEECH_LOUDNESS)
        speech = loud > threshold
        voiced = speech & (f["voicing"] > k.HALF)
        onset = speech & (ages["silence"] > k.PAUSE_S)  # the silence timer is one frame older here
        silence = torch.where(speech, zero, ages["silence"])
        phrase_end = (silence >= k.BOUNDARY_S) & (silence < k.BOUNDARY_END)
        since_boundary = torch.where(onset | phrase_end, zero, ages["since_boundary"])
        talking = silence < k.PAUSE_S  # holds through closures and short gaps
        speaking = talking.to(zero.dtype)
        activity = p["activity"].lerp(speaking, _alpha(ACTIVITY_TAU))

        # running averages over speech: a plain mean over the first frames, then an EMA
        n_speech = torch.where(speech, torch.clamp(p["n_speech"] + k.ONE, max=AVG_COUNT_CAP), p["n_speech"])
        n_voiced = torch.where(voiced, torch.clamp(p["n_voiced"] + k.ONE, max=AVG_COUNT_CAP), p["n_voiced"])
        loud_avg = torch.where(speech, p["loud_avg"].lerp(loud, n_speech.clamp(min=1.0).reciprocal()), p["loud_avg"])
        pitch_avg = torch.where(voiced, p["pitch_avg"].lerp(pitch, n_voiced.clamp(min=1.0).reciprocal()),
                                p["pitch_avg"])
        loud_fast = p["loud_fast"].lerp(loud, _alpha(LOUD_FAST_TAU))
        pitch_fast = torch.where(voiced, p["pitch_fast"].lerp(pitch, _alpha(PITCH_FAST_TAU)), p["pitch_fast"])
        pitch_rise = pitch_fast - pitch_avg
        drive = torch.where(speech, loud_fast - loud_avg + k.PITCH_STRESS_WEIGHT * pitch_rise.clamp(min=0.0), zero)
        stress = (drive >= k.STRESS_THRESHOLD) & (p["drive"] < k.STRESS_THRESHOLD) & (
            ages["since_stress"] > k.STRESS_REFRACTORY)
        since_stress = torch.where(stress, zero, ages["since_stress"])
        strength = (drive - k.STRESS_THRESHOLD).clamp(0.0, 0.2) * k.STRENGTH_GAIN + k.STRENGTH_BASE  # 0.6 .. 1.0

        # ---- mouth: asymmetric smoothing; a closure closes the lips in its own frame --------------
        m = MOUTH.unpack(mouth)
        press_target = torch.where(talking, ((f["lips_closed"] - k.CLOSURE_LOW) * k.CLOSURE_GAIN).clamp(0.0, 1.0),
                                   zero)
        press = torch.where(press_target > m["press"], press_target, m["press"].lerp(press_target, A_PRESS_RELEASE))
        open_ = k.ONE - press
        gate = ((loud - threshold) * k.JAW_GATE_GAIN + k.HALF).clamp(0.0, 1.0)
        jaw_target = f["jaw_open"] * torch.where(talking, k.ONE, gate)
        # the press shuts the jaw it shows, not the jaw it tracks: once the lips part, the mouth opens to
        # where the speech already is instead of opening again from closed (measured as above: r +0.01)
        jaw_free = m["jaw"].lerp(jaw_target, torch.where(jaw_target > m["jaw"], k.A_JAW_OPEN, k.A_JAW_CLOSE))
        jaw = jaw_free * open_
        seal = (k.SEAL_MAX - jaw * k.SEAL_GAIN).clamp(min=0.0) * activity  # relaxes with the talking
        lips_target = torch.cat([f["lips_wide"], (f["lips_round"] * k.ROUND_GAIN).clamp(max=1.0)], dim=1)
        lips = m["lips"].lerp(lips_target * speaking, A_LIPS)  # (B, 2) wide, round

        # ---- gaze, (B, 2) = (yaw, pitch): saccadic jumps between targets -------------------------
        g = GAZE.unpack(gaze)
        target = torch.cat([raw["gaze_yaw"], raw["gaze_pitch"]], dim=1)  # raw: a new target is a jump, not a drift
        wander_jump = n["wander_hazard"] < k.WANDER_P
        wander = torch.where(raw["gaze_wander"] > k.HALF, torch.where(wander_jump, n["wander"], g["wander"]), zero)

        saccade = (n["saccade_hazard"] < c["saccade_rate"] * k.SACCADE_P) & (
            ages["since_saccade"] > k.SACCADE_REFRACTORY)
        micro_gain = torch.clamp(expr, min=MICRO_ALIVE) * (k.ONE + k.MICRO_TALK * activity)
        micro = torch.where(saccade, n["saccade"] * micro_gain, g["micro"])
        since_saccade = torch.where(saccade, zero, ages["since_saccade"])

        avert_now = onset & (n["avert_hazard"] < k.AVERT_PROBABILITY)
        avert_new = (n["avert"] + torch.sign(n["avert"]) * self.avert_push) * expr  # |yaw| >= AVERT_YAW[0]
        avert_left = torch.where(avert_now, n["avert_duration"], g["avert_left"] - k.DT)
        looking_back = (avert_left <= k.ZERO) | (silence >= k.AVERT_END_SILENCE)
        avert = torch.where(avert_now, avert_new, torch.where(looking_back, zero, g["avert"]))
        avert_left = avert_left.clamp(min=-1.0)

        want = target + wander + avert + micro
        shift = (want - g["eye"]).abs().sum(dim=1, keepdim=True) > k.SHIFT_DEG
        since_shift = torch.where(shift, zero, ages["since_shift"])
        eye = g["eye"].lerp(want, A_SACCADE)  # line of sight, before the head is taken out

        # ---- head, (B, 6) per HEAD_AXES: drift + nods/turns + breathing + following the gaze -----
        h = HEAD.unpack(head)
        a_drift = k.ONE - torch.exp(k.DRIFT_DECAY / c["smoothing"])
        drift_a = drift_a.lerp(n["drift"], a_drift)
        drift_b = drift_b.lerp(drift_a, a_drift)
        # two cascaded one-poles fed unit-variance noise have std ~ sqrt(a)/2 (within 3% for these a)
        drift = drift_b * (self.drift_idle + self.drift_span * activity) * (
            c["head_energy"] * expr * torch.rsqrt(a_drift * 0.25))

        kick = torch.where(stress, (self.stress_low + self.stress_span * n["nod"]) * strength, zero) + torch.where(
            onset, self.onset_low + self.onset_span * n["nod"], zero)
        nods = NOD.unpack(nod)
        nod_pos, nod_vel, nod_drive = _nod_step(nods["pos"], nods["vel"],
                                                nods["drive"] + kick * (c["nod_gain"] * expr * k.NOD_KICK), k)

        breath_rate = h["breath_rate"].lerp(n["breath"], _alpha(BREATH_RATE_TAU))
        phase = torch.remainder(h["breath_phase"] + k.BREATH_STEP + breath_rate * k.BREATH_WOBBLE, 2.0 * math.pi)
        breath = (torch.sin(phase) + k.BREATH_HARMONIC * torch.sin(phase + phase + k.BREATH_SKEW)) * (
            (k.ONE - k.BREATH_TALK_DROP * activity) * torch.clamp(expr, min=ALIVE))  # a quicker inhale than exhale

        follow = h["follow"].lerp(k.GAZE_FOLLOW * (target + wander) + k.AVERT_FOLLOW * avert, _alpha(FOLLOW_TAU))
        head_offset = torch.cat([c["head_yaw"], c["head_pitch"], c["head_roll"]], dim=1)  # the user's, deg
        angles = nod_pos + head_offset + torch.cat([follow, zero], dim=1)  # (B, 3) yaw, pitch, roll
        head6 = drift + o["head"] + torch.cat([angles, zero, zero, zero], dim=1) + self.breath * breath

        # ---- brows: raised at accents and onsets, following pitch rises ----------------------------
        br = BROW.unpack(brow)
        brow_gain = c["brow_gain"] * expr
        brow_kick = torch.where(stress & (n["brow"] < k.BROW_STRESS_SHARE),
                                (k.BROW_STRESS + k.BROW_STRESS_EXTRA * n["brow"]) * strength,
                                torch.where(onset & (n["brow"] > k.BROW_ONSET_DRAW), k.BROW_ONSET, k.ZERO))
        peak = torch.maximum(br["peak"] * torch.exp(k.BROW_DECAY / c["smoothing"]), brow_kick * brow_gain)
        rise = torch.where(voiced, (pitch_rise - k.BROW_PITCH_DEADBAND).clamp(min=0.0), zero)
        goal = torch.maximum(peak, rise * (k.BROW_PITCH * brow_gain))
        env = br["env"].lerp(goal, torch.where(goal > br["env"], k.A_BROW_UP, k.A_BROW_DOWN))

        # ---- blinks: a renewal process with a sampled shape ----------------------------------------
        b = BLINK.unpack(blink)
        rate = c["blink_rate"] * (k.ONE + k.TALK_BLINK_GAIN * activity)  # per minute
        gap = (k.SIXTY / rate.clamp(min=0.01) - k.BLINK_FIXED_S).clamp(min=0.1)  # mean wait after the refractory, s
        boost = k.ONE + torch.where(since_shift < k.BOOST_S, k.SHIFT_BOOST, k.ZERO) + torch.where(
            since_boundary < k.BOOST_S, k.BOUNDARY_BOOST, k.ZERO)
        boost_avg = p["boost_avg"].lerp(boost, _alpha(BOOST_AVG_TAU))
        hazard = torch.where(rate > k.MIN_RATE, boost / (gap * boost_avg) * k.DT, zero)  # per frame (DT/gap << 1)
        open_at = b["close"] + b["hold"]
        ready = ages["blink"] > open_at + b["reopen"] + k.BLINK_REFRACTORY
        start = ready & (n["blink_hazard"] < hazard)
        depth = torch.where(n["blink_partial"] < k.PARTIAL_SHARE, n["blink_depth"][:, :1], n["blink_depth"][:, 1:])
        blink = torch.where(start, torch.cat([depth, n["blink_gain"], n["blink_shape"]], dim=1), blink)
        b = BLINK.unpack(blink)
        t = torch.where(start, zero, ages["blink"])  # time since the blink started
        phases = _smoothstep(torch.cat([t / b["close"], (t - b["close"] - b["hold"]) / b["reopen"]], dim=1), k)
        closing, reopening = phases.split(1, dim=1)
        lid = b["depth"] * closing * (k.ONE - reopening)  # closing, then (after the hold) reopening

        # ---- eyes in the head: counter-rotate against head motion; lids follow the gaze -----------
        eyes = eye - k.VOR_GAIN * head6[:, :2] + o["gaze"]
        base = (o["lids"] + k.LID_FOLLOWS_GAZE * eyes[:, 1:].clamp(min=0.0)).clamp(0.0, 0.5)
        lids = base + (k.ONE - base) * (lid * b["gain"])

        motion = torch.cat([head6, jaw + o["jaw"] * open_, lips + o["lips"], torch.maximum(press, seal) + o["press"], o["mouth"],
                            o["brows"] + self.brow_shape * env, lids, o["eyes"], eyes], dim=1)
        motion = torch.minimum(torch.maximum(motion, self.low), self.high)

        prosody = PROSODY.pack(dict(
            started=torch.ones_like(zero), floor=floor, activity=activity, n_speech=n_speech, n_voiced=n_voiced,
            loud_fast=loud_fast, loud_avg=loud_avg, pitch_fast=pitch_fast, pitch_avg=pitch_avg, drive=drive,
            boost_avg=boost_avg))
        timers = TIMERS.pack(dict(silence=silence, since_boundary=since_boundary, since_stress=since_stress,
                                  since_saccade=since_saccade, since_shift=since_shift, blink=t))
        mouth = MOUTH.pack(dict(jaw=jaw_free, lips=lips, press=press))
        nod = NOD.pack(dict(pos=nod_pos, vel=nod_vel, drive=nod_drive))
        head = HEAD.pack(dict(breath_phase=phase, breath_rate=breath_rate, follow=follow))
        gaze = GAZE.pack(dict(eye=eye, micro=micro, avert=avert, wander=wander, avert_left=avert_left))
        brow = BROW.pack(dict(peak=peak, env=env))
        return (motion, controls_a, controls_b, mouth, prosody, timers, drift_a, drift_b, nod, head, blink, gaze,
                brow)
