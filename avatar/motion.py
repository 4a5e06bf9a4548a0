"""The motion vector: the project's explicit face latent, one named channel each.

Every stage addresses channels by name through this table; the order here is the tensor layout.
Units: degrees for angles, face widths for translation, natural log for scale, and a unitless
0..1 (or -1..1) activation for expression channels, where 1 is a strong but natural expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Channel:
    name: str
    unit: str
    low: float  # smallest value a renderer must handle
    high: float  # largest value a renderer must handle
    neutral: float  # the value that reproduces the photo
    group: str
    doc: str


CHANNELS: tuple[Channel, ...] = (
    # head (rigid), about a pivot in the neck
    Channel("yaw", "deg", -15.0, 15.0, 0.0, "head", "turn left/right; + turns the face to the viewer's right"),
    Channel("pitch", "deg", -12.0, 12.0, 0.0, "head", "nod; + tips the chin down"),
    Channel("roll", "deg", -10.0, 10.0, 0.0, "head", "tilt; + tilts the head clockwise on screen"),
    Channel("tx", "face widths", -0.15, 0.15, 0.0, "head", "shift right on screen"),
    Channel("ty", "face widths", -0.15, 0.15, 0.0, "head", "shift down on screen"),
    Channel("scale", "log", -0.1, 0.1, 0.0, "head", "log of the head's size; + is closer"),
    # mouth
    Channel("jaw_open", "0..1", 0.0, 1.0, 0.0, "mouth", "jaw drops, lips part (1 = wide 'ah')"),
    Channel("lips_wide", "0..1", 0.0, 1.0, 0.0, "mouth", "lip corners pulled apart ('ee')"),
    Channel("lips_round", "0..1", 0.0, 1.0, 0.0, "mouth", "lips narrowed and pushed forward ('oo')"),
    Channel("lips_press", "0..1", 0.0, 1.0, 0.0, "mouth", "lips pressed closed ('m', 'b', 'p')"),
    Channel("upper_lip_up", "0..1", 0.0, 1.0, 0.0, "mouth", "upper lip raised, upper teeth show"),
    Channel("smile_left", "0..1", 0.0, 1.0, 0.0, "mouth", "left mouth corner (the subject's left) up and out"),
    Channel("smile_right", "0..1", 0.0, 1.0, 0.0, "mouth", "right mouth corner (the subject's right) up and out"),
    Channel("frown", "0..1", 0.0, 1.0, 0.0, "mouth", "mouth corners down"),
    # brows
    Channel("brow_inner_up", "0..1", 0.0, 1.0, 0.0, "brows", "inner brows raised (worry, interest)"),
    Channel("brow_outer_up_left", "0..1", 0.0, 1.0, 0.0, "brows", "outer left brow raised"),
    Channel("brow_outer_up_right", "0..1", 0.0, 1.0, 0.0, "brows", "outer right brow raised"),
    Channel("brow_down", "0..1", 0.0, 1.0, 0.0, "brows", "brows lowered and drawn together"),
    # eyes
    Channel("blink_left", "0..1", 0.0, 1.0, 0.0, "eyes", "left eyelid closed fraction (1 = fully shut)"),
    Channel("blink_right", "0..1", 0.0, 1.0, 0.0, "eyes", "right eyelid closed fraction (1 = fully shut)"),
    Channel("squint", "0..1", 0.0, 1.0, 0.0, "eyes", "lower lids raised, eyes narrowed"),
    Channel("eyes_wide", "0..1", 0.0, 1.0, 0.0, "eyes", "upper lids raised, eyes opened wide"),
    Channel("gaze_yaw", "deg", -15.0, 15.0, 0.0, "eyes", "eyes turn; + looks to the viewer's right"),
    Channel("gaze_pitch", "deg", -10.0, 10.0, 0.0, "eyes", "eyes turn; + looks down"),
)

NAMES: tuple[str, ...] = tuple(c.name for c in CHANNELS)
N_CHANNELS = len(CHANNELS)
INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}
BY_NAME: dict[str, Channel] = {c.name: c for c in CHANNELS}

HEAD_CHANNELS = tuple(c.name for c in CHANNELS if c.group == "head")
EXPRESSION_CHANNELS = tuple(c.name for c in CHANNELS if c.group != "head")


def index(name: str) -> int:
    """Position of a channel in the motion vector; a KeyError names the unknown channel."""
    try:
        return INDEX[name]
    except KeyError:
        raise KeyError(f"unknown motion channel {name!r}; known: {', '.join(NAMES)}") from None


def neutral() -> np.ndarray:
    """The motion vector that reproduces the photo: (N_CHANNELS,) float32."""
    return np.array([c.neutral for c in CHANNELS], dtype=np.float32)


def vector(**values: float) -> np.ndarray:
    """A motion vector with the named channels set and the rest neutral: vector(jaw_open=0.5)."""
    v = neutral()
    for name, value in values.items():
        v[index(name)] = value
    return v


def clamp(v: np.ndarray) -> np.ndarray:
    """Clip every channel to its renderable range (works on (..., N_CHANNELS))."""
    low = np.array([c.low for c in CHANNELS], dtype=np.float32)
    high = np.array([c.high for c in CHANNELS], dtype=np.float32)
    return np.clip(v, low, high)
