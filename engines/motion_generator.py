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
  the frame it appears and drops the jaw with it; silence relaxes and closes the mouth.
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
- controls glide (two cascaded low-passes, ~0.5 s) so a mood change never jumps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from avatar.constants import FPS
from avatar.controls import CONTROL_INDEX, CONTROL_NAMES, N_CONTROLS
from avatar.motion import CHANNELS, NAMES, N_CHANNELS

DT = 1.0 / FPS  # seconds per frame
SQRT12 = math.sqrt(12.0)  # (u - 0.5) * SQRT12 has unit variance for u ~ uniform(0, 1)

# engines/audio_encoder.py ARTICULATION, repeated here so this engine does not import the encoder
ARTICULATION = ("jaw_open", "lips_wide", "lips_round", "lips_closed", "voicing", "loudness", "pitch")
N_FEATURES = len(ARTICULATION)


def _alpha(tau_s: float) -> float:
    """Per-frame coefficient of a one-pole low-pass with time constant tau_s."""
    return 1.0 - math.exp(-DT / tau_s)


class Slots:
    """Named column groups of one (B, width) tensor: unpack to a dict of (B, w) views, pack back.

    A field is a name (one column) or (name, width); group columns that move together so the
    math runs on them as one vector (each tensor op costs microseconds on the CPU, whatever its size).
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


# ---- noise: uniform(0,1) per named use per frame ----------------------------------------------
HEAD_AXES = ("yaw", "pitch", "roll", "tx", "ty", "scale")
NOISE = Slots(
    ("drift", len(HEAD_AXES)),  # head drift, per HEAD_AXES
    "blink_hazard", "blink_depth", ("blink_shape", 4),  # shape: closing, closed, reopening, asymmetry
    "saccade_hazard", ("saccade", 2),  # (yaw, pitch) of the new small offset
    "avert_hazard", "avert_side", "avert_pitch", "avert_duration",
    "wander_hazard", ("wander", 2),
    ("nod", 3),  # yaw, pitch, roll size of a nod/turn
    "breath", "brow",
)
N_NOISE = NOISE.width

# ---- state tensors ----------------------------------------------------------------------------
MOUTH = Slots("jaw", "wide", "round", "press")
PROSODY = Slots("started", "floor", "activity", "n_speech", "n_voiced", "loud_fast", "loud_avg", "pitch_fast",
                "pitch_avg", "drive", "boost_avg")
TIMERS = Slots("silence", "since_boundary", "since_stress", "since_saccade", "since_shift", "blink")  # seconds
HEAD = Slots("breath_phase", "breath_rate", ("follow", 2))  # follow: head (yaw, pitch) toward the gaze target
BLINK = Slots("depth", ("shape", 4))  # shape: closing, closed, reopening (s), asymmetry (0..1)
GAZE = Slots(("eye", 2), ("micro", 2), ("avert", 2), ("wander", 2), "avert_left")  # (yaw, pitch) deg; s
BROW = Slots("peak", "env")
NOD = Slots(("pos", 3), ("vel", 3), ("drive", 3))  # damped nod/turn springs (yaw, pitch, roll): deg, deg/s, deg

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
A_JAW_OPEN, A_JAW_CLOSE = _alpha(0.03), _alpha(0.05)
A_LIPS = _alpha(0.04)
A_PRESS_RELEASE = _alpha(0.04)  # the attack is instant so plosives close in their own frame
CLOSURE_LOW, CLOSURE_FULL = 0.2, 0.5  # lips_closed feature -> press 0 .. 1
JAW_GATE_WIDTH = 0.1  # loudness span over which the jaw target fades in around the speech threshold

# head, degrees (face widths for tx/ty, log for scale); drift std per HEAD_AXES
DRIFT_TAU = 0.45  # s per stage of the drift filter (x mood smoothing)
DRIFT_IDLE = (0.7, 0.5, 0.35, 0.003, 0.002, 0.003)
DRIFT_TALK = (2.6, 2.0, 0.9, 0.006, 0.004, 0.006)
NOD_HZ, NOD_DAMPING = 2.2, 0.7  # a nod lasts ~0.4 s with a small rebound
NOD_DRIVE_TAU = 0.1  # s: the spring is pushed by a decaying pulse, so a nod starts without a jerk
# kick sizes (yaw, pitch, roll), uniform between low and high, scaled by the accent's strength:
# a stressed syllable tips the chin down with a little turn; a phrase onset lifts it and turns more
NOD_STRESS = ((-1.5, 1.2, -0.6), (1.5, 3.2, 0.6))
NOD_ONSET = ((-2.5, -0.8, -0.8), (2.5, -2.3, 0.8))
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
AVERT_YAW = (3.0, 4.0)  # base + up to extra, either side
AVERT_UP = 0.7  # share of aversions that go up (the rest down)
AVERT_PITCH = (1.0, 3.0)  # base + up to extra
AVERT_DURATION = (0.8, 1.7)  # s: base + up to extra
AVERT_END_SILENCE = 0.15  # s of silence that brings the eyes back
SHIFT_DEG = 4.0  # a gaze jump this big (|yaw| + |pitch|) is a gaze shift (aversions, new targets), not a micro-saccade
WANDER_RATE = 0.3  # per s: a new random target with gaze "wander"
WANDER = (8.0, 4.0)
VOR_GAIN = 0.9  # eyes counter-rotate against head motion to hold the line of sight
LID_FOLLOWS_GAZE = 0.02  # upper lid closure per degree of looking down (lids follow the eyes)

# blinks: ~17/min at rest, ~26/min talking; ~100 ms closing, 50-150 ms closed, 150-200 ms reopening
TALK_BLINK_GAIN = 0.5  # talking multiplies the rest rate by 1.5 (17 -> 25.5)
BLINK_REFRACTORY = 0.4  # s after a blink ends before another can start
BLINK_SHAPE = ((0.08, 0.05, 0.15, 0.0), (0.12, 0.15, 0.20, 1.0))  # closing, closed, reopening (s), asym
MEAN_BLINK_S = sum((a + b) / 2 for a, b in zip(*BLINK_SHAPE)) - 0.5  # mean of the three phases
PARTIAL_SHARE = 0.5
PARTIAL_DEPTH = (0.5, 0.3)  # base + up to extra: partial blinks close 0.5-0.8
FULL_DEPTH = (0.95, 0.05)
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

# where channels sit in the motion vector
CH = {name: i for i, name in enumerate(NAMES)}
GAZE_TARGET = slice(CONTROL_INDEX["gaze_yaw"], CONTROL_INDEX["gaze_pitch"] + 1)
HEAD_OFFSET = slice(CONTROL_INDEX["head_yaw"], CONTROL_INDEX["head_roll"] + 1)
DYNAMICS = slice(N_CHANNELS, CONTROL_INDEX["gaze_yaw"])  # head_energy ... blink_rate
DYNAMICS_NAMES = CONTROL_NAMES[DYNAMICS]
assert NAMES[CH["yaw"]:CH["scale"] + 1] == HEAD_AXES
assert NAMES[CH["brow_inner_up"]:CH["brow_down"] + 1] == ("brow_inner_up", "brow_outer_up_left",
                                                           "brow_outer_up_right", "brow_down")
# mood offsets that are added at the end; the rest are folded in where they act (head before the
# eyes counter-rotate, jaw under lip closure, lids under blinks, gaze in the eye's frame)
ADDED_LAST = tuple(n for n in NAMES if n not in HEAD_AXES + ("jaw_open", "blink_left", "blink_right",
                                                            "gaze_yaw", "gaze_pitch"))


def _nod_step(pos, vel, drive):
    """One frame of the nod spring: pushed toward `drive` (a decaying pulse), critically-ish damped."""
    w = 2.0 * math.pi * NOD_HZ
    vel = vel + DT * (w * w * (drive - pos) - 2.0 * NOD_DAMPING * w * vel)
    return pos + DT * vel, vel, drive * math.exp(-DT / NOD_DRIVE_TAU)


def _nod_kick_gain() -> float:
    """Pulse height per degree that makes the nod spring peak at the kick's size."""
    pos, vel, drive, peak = 0.0, 0.0, 1.0, 0.0
    for _ in range(FPS):
        pos, vel, drive = _nod_step(pos, vel, drive)
        peak = max(peak, pos)
    return 1.0 / peak


NOD_KICK = _nod_kick_gain()


def _smoothstep(x: Tensor) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _signed(u: Tensor) -> Tensor:
    """uniform(0,1) -> uniform(-1,1)"""
    return 2.0 * u - 1.0


def _const(values) -> Tensor:
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
        constants = {
            "low": [c.low for c in CHANNELS], "high": [c.high for c in CHANNELS],
            "added_last": [float(n in ADDED_LAST) for n in NAMES],
            "drift_idle": DRIFT_IDLE, "drift_span": [t - i for t, i in zip(DRIFT_TALK, DRIFT_IDLE)],
            "stress_low": NOD_STRESS[0], "stress_span": [h - l for l, h in zip(*NOD_STRESS)],
            "onset_low": NOD_ONSET[0], "onset_span": [h - l for l, h in zip(*NOD_ONSET)],
            "breath": BREATH, "brow_shape": BROW_SHAPE,
            "blink_low": BLINK_SHAPE[0], "blink_span": [h - l for l, h in zip(*BLINK_SHAPE)],
            "micro": MICRO, "wander": WANDER, "follow_pad": (0.0,),
        }
        for name, values in constants.items():
            self.register_buffer(name, _const(values), persistent=False)

    def initial_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        """The state before the first frame: silent for long, eyes open, nothing in motion."""
        state = {name: torch.zeros(batch, width) for name, width in STATE_SHAPES}
        state["prosody"][:, PROSODY.slices["floor"]] = SPEECH_LOUDNESS - FLOOR_MARGIN
        state["prosody"][:, PROSODY.slices["boost_avg"]] = 1.0
        state["timers"][:] = LONG_AGO
        # a finished blink of depth 0, so the shape's divisions are never by zero
        state["blink"][:, BLINK.slices["shape"]] = torch.tensor(BLINK_SHAPE[1])
        return tuple(state[name] for name in STATE_NAMES)

    def forward(self, features: Tensor, controls: Tensor, noise: Tensor, controls_a: Tensor, controls_b: Tensor,
                mouth: Tensor, prosody: Tensor, timers: Tensor, drift_a: Tensor, drift_b: Tensor, nod: Tensor,
                head: Tensor, blink: Tensor, gaze: Tensor, brow: Tensor) -> tuple[Tensor, ...]:
        """features (B, 7), controls (B, N_CONTROLS), noise (B, N_NOISE), state per STATE_SHAPES
        -> motion (B, N_CHANNELS), then the new state in STATE_SHAPES order."""
        f = dict(zip(ARTICULATION, features.split(1, dim=1)))  # (B, 1) each
        n = NOISE.unpack(noise)
        p = PROSODY.unpack(prosody)
        zero = torch.zeros_like(f["loudness"])  # (B, 1)
        ages = TIMERS.unpack((timers + DT).clamp(max=LONG_AGO))  # every timer one frame older; reset below

        # ---- controls: glide to the requested ones (start on them at the first frame) -----------
        first = p["started"] < 0.5
        controls_a = torch.where(first, controls, controls_a.lerp(controls, _alpha(CONTROL_TAU)))
        controls_b = torch.where(first, controls, controls_b.lerp(controls_a, _alpha(CONTROL_TAU)))
        offsets = controls_b[:, :N_CHANNELS]  # (B, N_CHANNELS) mood offsets in effect
        c = dict(zip(DYNAMICS_NAMES, controls_b[:, DYNAMICS].split(1, dim=1)))  # (B, 1) each
        expr = controls_b[:, CONTROL_INDEX["expressiveness"]:CONTROL_INDEX["expressiveness"] + 1]

        # ---- prosody: speech detection, phrase timers, stressed syllables ------------------------
        loud, pitch = f["loudness"], f["pitch"]
        floor = torch.where(loud < p["floor"], p["floor"].lerp(loud, 0.5), p["floor"] + FLOOR_RISE * DT)
        threshold = torch.clamp(floor + FLOOR_MARGIN, min=SPEECH_LOUDNESS)
        speech = loud > threshold
        voiced = speech & (f["voicing"] > 0.5)
        onset = speech & (ages["silence"] > PAUSE_S)  # the silence timer is one frame older here
        silence = torch.where(speech, zero, ages["silence"])
        phrase_end = (silence >= BOUNDARY_S) & (silence < BOUNDARY_S + DT)
        since_boundary = torch.where(onset | phrase_end, zero, ages["since_boundary"])
        speaking = (silence < PAUSE_S).float()  # holds through closures and short gaps
        activity = p["activity"].lerp(speaking, _alpha(ACTIVITY_TAU))

        # running averages over speech: a plain mean over the first frames, then an EMA
        n_speech = torch.where(speech, (p["n_speech"] + 1.0).clamp(max=AVG_COUNT_CAP), p["n_speech"])
        n_voiced = torch.where(voiced, (p["n_voiced"] + 1.0).clamp(max=AVG_COUNT_CAP), p["n_voiced"])
        loud_avg = torch.where(speech, p["loud_avg"].lerp(loud, 1.0 / n_speech.clamp(min=1.0)), p["loud_avg"])
        pitch_avg = torch.where(voiced, p["pitch_avg"].lerp(pitch, 1.0 / n_voiced.clamp(min=1.0)), p["pitch_avg"])
        loud_fast = p["loud_fast"].lerp(loud, _alpha(LOUD_FAST_TAU))
        pitch_fast = torch.where(voiced, p["pitch_fast"].lerp(pitch, _alpha(PITCH_FAST_TAU)), p["pitch_fast"])
        pitch_rise = torch.relu(pitch_fast - pitch_avg)
        drive = torch.where(speech, loud_fast - loud_avg + PITCH_STRESS_WEIGHT * pitch_rise, zero)
        stress = (speech & (drive >= STRESS_THRESHOLD) & (p["drive"] < STRESS_THRESHOLD)
                  & (ages["since_stress"] > STRESS_REFRACTORY))
        since_stress = torch.where(stress, zero, ages["since_stress"])
        strength = 0.6 + 2.0 * (drive - STRESS_THRESHOLD).clamp(0.0, 0.2)  # 0.6 .. 1.0

        # ---- mouth: asymmetric smoothing; a closure closes the lips in its own frame --------------
        m = MOUTH.unpack(mouth)
        press_target = ((f["lips_closed"] - CLOSURE_LOW) / (CLOSURE_FULL - CLOSURE_LOW)).clamp(0.0, 1.0) * speaking
        press = torch.where(press_target > m["press"], press_target, m["press"].lerp(press_target, A_PRESS_RELEASE))
        jaw_target = f["jaw_open"] * ((loud - threshold) / JAW_GATE_WIDTH + 0.5).clamp(0.0, 1.0)
        jaw_rate = torch.where(jaw_target > m["jaw"], A_JAW_OPEN, A_JAW_CLOSE)
        jaw = m["jaw"].lerp(jaw_target, jaw_rate) * (1.0 - press)
        wide = m["wide"].lerp(f["lips_wide"] * speaking, A_LIPS)
        round_ = m["round"].lerp(f["lips_round"] * speaking, A_LIPS)

        # ---- gaze, (B, 2) = (yaw, pitch): saccadic jumps between targets -------------------------
        g = GAZE.unpack(gaze)
        target = controls[:, GAZE_TARGET]  # raw, not glided: a new target is a jump, not a drift
        wandering = controls[:, CONTROL_INDEX["gaze_wander"]:CONTROL_INDEX["gaze_wander"] + 1] > 0.5
        wander_jump = wandering & (n["wander_hazard"] < 1.0 - math.exp(-WANDER_RATE * DT))
        wander = torch.where(wander_jump, self.wander * _signed(n["wander"]), g["wander"]) * wandering

        saccade_p = 1.0 - torch.exp(c["saccade_rate"] * (-SACCADE_RATE * DT))
        saccade = (n["saccade_hazard"] < saccade_p) & (ages["since_saccade"] > SACCADE_REFRACTORY)
        micro_gain = torch.clamp(expr, min=MICRO_ALIVE) * (1.0 + 0.5 * activity)
        micro = torch.where(saccade, self.micro * micro_gain * _signed(n["saccade"]), g["micro"])
        since_saccade = torch.where(saccade, zero, ages["since_saccade"])

        avert_now = onset & (n["avert_hazard"] < AVERT_PROBABILITY)
        side = _signed(n["avert_side"])  # its sign picks the side, its size the extra
        up = n["avert_pitch"] < AVERT_UP
        avert_new = torch.cat([
            torch.sign(side) * (AVERT_YAW[0] + AVERT_YAW[1] * side.abs()),
            torch.where(up, -(AVERT_PITCH[0] + AVERT_PITCH[1] / AVERT_UP * n["avert_pitch"]),
                        AVERT_PITCH[0] + AVERT_PITCH[1] / (1.0 - AVERT_UP) * (n["avert_pitch"] - AVERT_UP))],
            dim=1) * expr
        avert_left = torch.where(avert_now, AVERT_DURATION[0] + AVERT_DURATION[1] * n["avert_duration"],
                                 (g["avert_left"] - DT).clamp(min=-1.0))
        looking_back = (avert_left <= 0.0) | (silence >= AVERT_END_SILENCE)
        avert = torch.where(avert_now, avert_new, g["avert"] * (~looking_back))

        want = target + wander + avert + micro
        shift = (want - g["eye"]).abs().sum(dim=1, keepdim=True) > SHIFT_DEG
        since_shift = torch.where(shift, zero, ages["since_shift"])
        eye = g["eye"].lerp(want, A_SACCADE)  # line of sight, before the head is taken out

        # ---- head, (B, 6) per HEAD_AXES: drift + nods/turns + breathing + following the gaze -----
        h = HEAD.unpack(head)
        a_drift = 1.0 - torch.exp(-DT / (DRIFT_TAU * c["smoothing"]))
        drift_a = drift_a.lerp(SQRT12 * (n["drift"] - 0.5), a_drift)
        drift_b = drift_b.lerp(drift_a, a_drift)
        pole = 1.0 - a_drift  # stationary std of two cascaded one-poles fed unit-variance noise
        drift_std = a_drift * a_drift * torch.sqrt((1.0 + pole * pole) / (1.0 - pole * pole) ** 3)
        drift = drift_b * ((self.drift_idle + self.drift_span * activity) * (c["head_energy"] * expr / drift_std))

        stress_kick = (self.stress_low + self.stress_span * n["nod"]) * strength
        onset_kick = self.onset_low + self.onset_span * n["nod"]
        kick = (stress_kick * stress + onset_kick * onset) * (c["nod_gain"] * expr * NOD_KICK)
        nods = NOD.unpack(nod)
        nod_pos, nod_vel, nod_drive = _nod_step(nods["pos"], nods["vel"], nods["drive"] + kick)

        breath_rate = h["breath_rate"].lerp(SQRT12 * (n["breath"] - 0.5), _alpha(BREATH_RATE_TAU))
        rate_std = math.sqrt(_alpha(BREATH_RATE_TAU) / (2.0 - _alpha(BREATH_RATE_TAU)))
        phase = h["breath_phase"] + (2.0 * math.pi * BREATH_HZ * DT) * (1.0 + BREATH_JITTER / rate_std * breath_rate)
        phase = phase - (2.0 * math.pi) * torch.floor(phase * (0.5 / math.pi))
        breath = (torch.sin(phase) + 0.3 * torch.sin(2.0 * phase + 0.5)) * (  # a quicker inhale than exhale
            (1.0 - (1.0 - BREATH_TALKING) * activity) * torch.clamp(expr, min=ALIVE) / 1.04)

        follow = h["follow"].lerp(GAZE_FOLLOW * (target + wander) + AVERT_FOLLOW * avert, _alpha(FOLLOW_TAU))
        angles = nod_pos + controls_b[:, HEAD_OFFSET] + torch.cat([follow, zero], dim=1)  # (B, 3)
        head6 = drift + torch.cat([angles, zero, zero, zero], dim=1) + self.breath * breath + offsets[:, :6]

        # ---- brows: raised at accents and onsets, following pitch rises ----------------------------
        br = BROW.unpack(brow)
        brow_gain = c["brow_gain"] * expr
        brow_kick = ((BROW_STRESS[0] + BROW_STRESS[1] / BROW_STRESS_SHARE * n["brow"]) * strength
                     * (stress & (n["brow"] < BROW_STRESS_SHARE)) + BROW_ONSET * (onset & (n["brow"] > 0.4)))
        peak = torch.maximum(br["peak"] * torch.exp(-DT / (BROW_HOLD_TAU * c["smoothing"])), brow_kick * brow_gain)
        rise = BROW_PITCH * torch.relu(pitch_fast - pitch_avg - BROW_PITCH_DEADBAND) * voiced
        goal = torch.maximum(peak, rise * brow_gain)
        env = br["env"].lerp(goal, torch.where(goal > br["env"], A_BROW_UP, A_BROW_DOWN))

        # ---- blinks: a renewal process with a sampled shape ----------------------------------------
        b = BLINK.unpack(blink)
        rate = c["blink_rate"] * (1.0 + TALK_BLINK_GAIN * activity)  # per minute
        gap = (60.0 / rate.clamp(min=0.01) - (MEAN_BLINK_S + BLINK_REFRACTORY)).clamp(min=0.1)  # mean wait, s
        boost = 1.0 + SHIFT_BOOST * (since_shift < BOOST_S) + BOUNDARY_BOOST * (since_boundary < BOOST_S)
        boost_avg = p["boost_avg"].lerp(boost, _alpha(BOOST_AVG_TAU))
        hazard = (1.0 - torch.exp(-DT / gap * (boost / boost_avg))) * (rate > 0.01)
        ready = ages["blink"] > b["shape"][:, :3].sum(dim=1, keepdim=True) + BLINK_REFRACTORY
        start = ready & (n["blink_hazard"] < hazard)
        partial = n["blink_depth"] < PARTIAL_SHARE
        depth_new = torch.where(partial, PARTIAL_DEPTH[0] + PARTIAL_DEPTH[1] / PARTIAL_SHARE * n["blink_depth"],
                                FULL_DEPTH[0] + FULL_DEPTH[1] / (1 - PARTIAL_SHARE) * (n["blink_depth"] - PARTIAL_SHARE))
        t = torch.where(start, zero, ages["blink"])  # time since the blink started
        blink = torch.where(start, torch.cat([depth_new, self.blink_low + self.blink_span * n["blink_shape"]], dim=1),
                            blink)
        depth, close, hold, reopen, asym = blink.split(1, dim=1)
        lid = depth * torch.where(t < close, _smoothstep(t / close), 1.0 - _smoothstep((t - close - hold) / reopen))

        # ---- eyes in the head: counter-rotate against head motion; lids follow the gaze -----------
        eyes = eye - VOR_GAIN * head6[:, :2] + offsets[:, CH["gaze_yaw"]:CH["gaze_pitch"] + 1]
        base = (offsets[:, CH["blink_left"]:CH["blink_right"] + 1]
                + LID_FOLLOWS_GAZE * eyes[:, 1:2].clamp(min=0.0)).clamp(0.0, 0.5)
        lids = base + (1.0 - base) * (lid * torch.cat([torch.ones_like(asym), 1.0 - BLINK_ASYM * asym], dim=1))

        jaw_out = jaw + offsets[:, CH["jaw_open"]:CH["jaw_open"] + 1] * (1.0 - press)
        motion = torch.cat([head6, jaw_out, wide, round_, press, zero, zero, zero, zero, self.brow_shape * env,
                            lids, zero, zero, eyes], dim=1) + offsets * self.added_last
        motion = torch.minimum(torch.maximum(motion, self.low), self.high)

        prosody = PROSODY.pack(dict(
            started=torch.ones_like(zero), floor=floor, activity=activity, n_speech=n_speech, n_voiced=n_voiced,
            loud_fast=loud_fast, loud_avg=loud_avg, pitch_fast=pitch_fast, pitch_avg=pitch_avg, drive=drive,
            boost_avg=boost_avg))
        timers = TIMERS.pack(dict(silence=silence, since_boundary=since_boundary, since_stress=since_stress,
                                  since_saccade=since_saccade, since_shift=since_shift, blink=t))
        mouth = MOUTH.pack(dict(jaw=jaw, wide=wide, round=round_, press=press))
        head = HEAD.pack(dict(breath_phase=phase, breath_rate=breath_rate, follow=follow))
        gaze = GAZE.pack(dict(eye=eye, micro=micro, avert=avert, wander=wander, avert_left=avert_left))
        brow = BROW.pack(dict(peak=peak, env=env))
        nod = NOD.pack(dict(pos=nod_pos, vel=nod_vel, drive=nod_drive))
        return (motion, controls_a, controls_b, mouth, prosody, timers, drift_a, drift_b, nod, head, blink, gaze,
                brow)
