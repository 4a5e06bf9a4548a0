"""User controls for the motion generator: mood presets, gaze target, head offsets, intensity, blinks.

`Controls` is what the CLI and the tray edit; `controls_tensor(controls)` turns it into the fixed
numeric layout (`CONTROL_NAMES`) that `MotionGenerator` takes every frame. A control never bypasses
the generator: it conditions it, so switching mood mid-stream only changes that tensor and the
generator glides to the new offsets.

Sign conventions follow avatar/motion.py: yaw + turns the face/eyes to the viewer's right, pitch +
tips the chin/eyes down. Named gaze targets are seen from the viewer: "left" looks toward the
left of the screen (gaze_yaw < 0), "up" looks up (gaze_pitch < 0).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field

import torch

from avatar.errors import AvatarError
from avatar.motion import BY_NAME, NAMES, N_CHANNELS


@dataclass(frozen=True)
class Mood:
    """A mood: static offsets on motion channels plus the dynamics of the motion around them.

    offsets: motion channel -> value added to the generated motion (units of that channel).
    head_energy: multiplier on head drift amplitude (1 = a calm person on a call).
    nod_gain: multiplier on nods/turns on stressed syllables and phrase onsets.
    blink_rate: blinks per minute at rest (talking raises it by about half, as people do).
    saccade_rate: multiplier on the rate of small gaze jumps (about 0.8/s at 1).
    brow_gain: multiplier on speech-driven brow raises.
    smoothing: multiplier on the time constants of head drift and brow decay (> 1 slower, calmer).
    """

    name: str
    doc: str
    offsets: dict[str, float] = field(default_factory=dict)
    head_energy: float = 1.0
    nod_gain: float = 1.0
    blink_rate: float = 17.0
    saccade_rate: float = 1.0
    brow_gain: float = 1.0
    smoothing: float = 1.0

    def __post_init__(self):
        for name in self.offsets:
            if name not in BY_NAME:
                raise ValueError(f"mood {self.name!r}: unknown motion channel {name!r}")


MOODS: dict[str, Mood] = {
    m.name: m
    for m in (
        Mood("neutral", "attentive and relaxed; the reference the others are measured from"),
        Mood(
            "happy",
            "a warm smile with crinkled eyes (Duchenne squint), chin slightly up, livelier head and brows",
            offsets={"smile_left": 0.45, "smile_right": 0.42, "squint": 0.18, "brow_outer_up_left": 0.08,
                     "brow_outer_up_right": 0.08, "pitch": -1.0},
            head_energy=1.2, nod_gain=1.2, blink_rate=18.0, saccade_rate=1.1, brow_gain=1.2, smoothing=0.9,
        ),
        Mood(
            "surprised",
            "brows high, upper lids raised, lips slightly parted, head drawn back; blinks less",
            offsets={"brow_inner_up": 0.45, "brow_outer_up_left": 0.55, "brow_outer_up_right": 0.55,
                     "eyes_wide": 0.55, "jaw_open": 0.08, "pitch": -1.5, "scale": -0.015},
            head_energy=1.1, nod_gain=0.8, blink_rate=12.0, saccade_rate=1.2, brow_gain=1.3, smoothing=0.8,
        ),
        Mood(
            "chill",
            "relaxed: lids a little lowered, a faint smile, a slight head tilt, slow and small motion",
            offsets={"blink_left": 0.12, "blink_right": 0.12, "smile_left": 0.12, "smile_right": 0.12,
                     "roll": 2.0},
            head_energy=0.7, nod_gain=0.7, blink_rate=15.0, saccade_rate=0.7, brow_gain=0.6, smoothing=1.6,
        ),
        Mood(
            "serious",
            "focused: brows lowered, eyes a little narrowed, chin slightly down, firm nods, still brows",
            offsets={"brow_down": 0.35, "squint": 0.12, "frown": 0.08, "pitch": 1.0},
            head_energy=0.6, nod_gain=1.0, blink_rate=15.0, saccade_rate=0.8, brow_gain=0.5, smoothing=1.2,
        ),
        Mood(
            "sad",
            "mouth corners down, inner brows up, lids heavy, head and eyes lowered, slow small motion",
            offsets={"frown": 0.45, "brow_inner_up": 0.5, "blink_left": 0.15, "blink_right": 0.15,
                     "pitch": 3.0, "gaze_pitch": 5.0},
            head_energy=0.5, nod_gain=0.6, blink_rate=15.0, saccade_rate=0.6, brow_gain=0.7, smoothing=1.5,
        ),
    )
}

# Named gaze targets in degrees (yaw, pitch) of the line of sight, viewer's frame.
GAZE_TARGETS: dict[str, tuple[float, float]] = {
    "camera": (0.0, 0.0),
    "wander": (0.0, 0.0),  # plus a slowly jumping random target, see `gaze_wander`
    "left": (-10.0, 0.0),
    "right": (10.0, 0.0),
    "up": (0.0, -7.0),
    "down": (0.0, 7.0),
}
GAZE_LIMITS = (15.0, 10.0)  # |yaw|, |pitch| of an explicit gaze target: the gaze channels' range

# Head offsets keep headroom inside the channel ranges so motion around them is not clipped flat.
HEAD_OFFSET_LIMITS = {"head_yaw": 10.0, "head_pitch": 8.0, "head_roll": 8.0}
HEAD_DISTANCE_RANGE = (0.6, 1.6)
EXPRESSIVENESS_RANGE = (0.0, 2.0)
BLINK_RATE_RANGE = (0.0, 60.0)

DYNAMICS = ("head_energy", "nod_gain", "saccade_rate", "brow_gain", "smoothing", "blink_rate")

# The numeric layout the generator reads. Offsets cover every motion channel so a mood can set any.
CONTROL_NAMES: tuple[str, ...] = (
    *(f"offset_{name}" for name in NAMES),
    *DYNAMICS,
    "gaze_yaw", "gaze_pitch", "gaze_wander",  # target of the line of sight (deg) and wander on/off
    "head_yaw", "head_pitch", "head_roll",  # user head angle offsets (deg)
    "expressiveness",
)
N_CONTROLS = len(CONTROL_NAMES)
CONTROL_INDEX: dict[str, int] = {name: i for i, name in enumerate(CONTROL_NAMES)}
OFFSETS = slice(0, N_CHANNELS)  # where the per-channel mood offsets sit in the controls tensor


def _finite_number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AvatarError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise AvatarError(f"{name} {value:g} is out of range: allowed {low:g} to {high:g}")
    return float(value)


@dataclass
class Controls:
    """What the user chose. Validated on construction (and by dataclasses.replace)."""

    mood: str = "neutral"
    gaze: str | tuple[float, float] = "camera"  # a GAZE_TARGETS name or (yaw_deg, pitch_deg)
    _: KW_ONLY  # everything with a unit is passed by keyword
    head_yaw: float = 0.0  # degrees, + = face turns to the viewer's right
    head_pitch: float = 0.0  # degrees, + = chin down
    head_roll: float = 0.0  # degrees, + = clockwise on screen
    head_distance: float = 1.0  # framing, applied when the portrait is framed (not a per-frame input)
    # scales the motion (head, brows, gaze movements), not the mood's expression or the lips:
    # 0 = still but alive (blinks, faint breathing, small eye movements), 1 = natural, 2 = animated
    expressiveness: float = 1.0
    blink_rate: float | None = None  # blinks per minute at rest; None = the mood's default
    seed: int = 0

    def __post_init__(self):
        if self.mood not in MOODS:
            raise AvatarError(f"unknown mood {self.mood!r}: use one of {', '.join(MOODS)}")
        if isinstance(self.gaze, str):
            if self.gaze not in GAZE_TARGETS:
                raise AvatarError(f"unknown gaze target {self.gaze!r}: use one of {', '.join(GAZE_TARGETS)} "
                                  f"or (yaw_deg, pitch_deg)")
        else:
            try:
                yaw, pitch = self.gaze
            except (TypeError, ValueError):
                raise AvatarError(f"gaze must be one of {', '.join(GAZE_TARGETS)} or (yaw_deg, pitch_deg), "
                                  f"got {self.gaze!r}") from None
            self.gaze = (_finite_number("gaze yaw", yaw, -GAZE_LIMITS[0], GAZE_LIMITS[0]),
                         _finite_number("gaze pitch", pitch, -GAZE_LIMITS[1], GAZE_LIMITS[1]))
        for name, limit in HEAD_OFFSET_LIMITS.items():
            setattr(self, name, _finite_number(name.replace("_", " "), getattr(self, name), -limit, limit))
        self.head_distance = _finite_number("head distance", self.head_distance, *HEAD_DISTANCE_RANGE)
        self.expressiveness = _finite_number("expressiveness", self.expressiveness, *EXPRESSIVENESS_RANGE)
        if self.blink_rate is not None:
            self.blink_rate = _finite_number("blink rate (per minute)", self.blink_rate, *BLINK_RATE_RANGE)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise AvatarError(f"seed must be an integer from 0 to 2**63-1, got {self.seed!r}")

    @property
    def gaze_target(self) -> tuple[float, float]:
        """The gaze target in degrees (yaw, pitch)."""
        return GAZE_TARGETS[self.gaze] if isinstance(self.gaze, str) else self.gaze


def parse_gaze(text: str) -> str | tuple[float, float]:
    """A gaze flag as typed on the command line: a target name, or "YAW,PITCH" in degrees."""
    name = text.strip().lower()
    if name in GAZE_TARGETS:
        return name
    parts = name.split(",")
    if len(parts) == 2:
        try:
            return float(parts[0]), float(parts[1])
        except ValueError:
            pass
    raise AvatarError(f"gaze {text!r} is not understood: use one of {', '.join(GAZE_TARGETS)} "
                      f"or YAW,PITCH in degrees (e.g. 5,-3)")


def controls_tensor(controls: Controls) -> torch.Tensor:
    """The generator's control input: (1, N_CONTROLS) float32 in CONTROL_NAMES order."""
    mood = MOODS[controls.mood]
    values = dict.fromkeys(CONTROL_NAMES, 0.0)
    for name, offset in mood.offsets.items():
        values[f"offset_{name}"] = offset
    for name in DYNAMICS:
        values[name] = getattr(mood, name)
    if controls.blink_rate is not None:
        values["blink_rate"] = controls.blink_rate
    values["gaze_yaw"], values["gaze_pitch"] = controls.gaze_target
    values["gaze_wander"] = 1.0 if controls.gaze == "wander" else 0.0
    values["head_yaw"], values["head_pitch"], values["head_roll"] = (controls.head_yaw, controls.head_pitch,
                                                                     controls.head_roll)
    values["expressiveness"] = controls.expressiveness
    return torch.tensor([[values[name] for name in CONTROL_NAMES]], dtype=torch.float32)
