"""Controls: defaults, the numeric layout the generator reads, mood presets, and validation messages."""

import dataclasses
import math

import pytest
import torch

from avatar.controls import (CONTROL_INDEX, CONTROL_NAMES, GAZE_TARGETS, MOODS, N_CONTROLS, Controls, Mood,
                             controls_tensor, parse_gaze)
from avatar.errors import AvatarError
from avatar.motion import BY_NAME, NAMES, N_CHANNELS


def _value(tensor, name):
    return float(tensor[0, CONTROL_INDEX[name]])


def test_layout_covers_every_channel_offset_and_each_control_once():
    assert len(set(CONTROL_NAMES)) == N_CONTROLS
    assert CONTROL_NAMES[:N_CHANNELS] == tuple(f"offset_{n}" for n in NAMES)
    for name in ("head_energy", "nod_gain", "blink_rate", "saccade_rate", "brow_gain", "smoothing", "gaze_yaw",
                 "gaze_pitch", "gaze_wander", "head_yaw", "head_pitch", "head_roll", "expressiveness"):
        assert name in CONTROL_INDEX


def test_default_controls_are_neutral_camera_and_the_tensor_is_1_by_n_float32():
    t = controls_tensor(Controls())
    assert t.shape == (1, N_CONTROLS) and t.dtype == torch.float32
    assert torch.all(t[0, :N_CHANNELS] == 0.0)  # neutral has no offsets
    assert _value(t, "expressiveness") == 1.0
    assert _value(t, "blink_rate") == MOODS["neutral"].blink_rate == 17.0
    assert (_value(t, "gaze_yaw"), _value(t, "gaze_pitch"), _value(t, "gaze_wander")) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("mood", sorted(MOODS))
def test_each_mood_is_documented_and_its_offsets_stay_inside_channel_ranges(mood):
    preset = MOODS[mood]
    assert len(preset.doc) > 20
    t = controls_tensor(Controls(mood=mood))
    for name, offset in preset.offsets.items():
        assert _value(t, f"offset_{name}") == pytest.approx(offset)
        channel = BY_NAME[name]
        assert channel.low <= offset <= channel.high
    for name in ("head_energy", "nod_gain", "saccade_rate", "brow_gain", "smoothing"):
        assert 0.3 <= getattr(preset, name) <= 2.0
    assert 5.0 <= preset.blink_rate <= 30.0


def test_moods_differ_the_way_their_names_say():
    t = {m: controls_tensor(Controls(mood=m)) for m in MOODS}
    assert _value(t["happy"], "offset_smile_left") >= 0.3
    assert _value(t["surprised"], "offset_eyes_wide") >= 0.3
    assert _value(t["surprised"], "offset_brow_outer_up_left") >= 0.3
    assert _value(t["sad"], "offset_frown") >= 0.3 and _value(t["sad"], "offset_brow_inner_up") >= 0.3
    assert _value(t["serious"], "offset_brow_down") >= 0.2
    assert _value(t["chill"], "head_energy") < 1.0 and _value(t["chill"], "smoothing") > 1.0
    assert _value(t["surprised"], "blink_rate") < _value(t["neutral"], "blink_rate")


def test_blink_rate_overrides_the_moods_default():
    assert _value(controls_tensor(Controls(mood="sad", blink_rate=30.0)), "blink_rate") == 30.0
    assert _value(controls_tensor(Controls(mood="sad")), "blink_rate") == MOODS["sad"].blink_rate


def test_gaze_targets_named_and_explicit():
    for name, (yaw, pitch) in GAZE_TARGETS.items():
        t = controls_tensor(Controls(gaze=name))
        assert (_value(t, "gaze_yaw"), _value(t, "gaze_pitch")) == (yaw, pitch)
        assert _value(t, "gaze_wander") == (1.0 if name == "wander" else 0.0)
    assert GAZE_TARGETS["left"][0] < 0 < GAZE_TARGETS["right"][0]  # viewer's left is yaw < 0
    assert GAZE_TARGETS["up"][1] < 0 < GAZE_TARGETS["down"][1]  # pitch + looks down
    t = controls_tensor(Controls(gaze=(4.5, -2)))
    assert (_value(t, "gaze_yaw"), _value(t, "gaze_pitch")) == (4.5, -2.0)


def test_head_offsets_and_expressiveness_are_carried():
    t = controls_tensor(Controls(head_yaw=5, head_pitch=-3, head_roll=2.5, expressiveness=1.5))
    assert [_value(t, n) for n in ("head_yaw", "head_pitch", "head_roll", "expressiveness")] == [5, -3, 2.5, 1.5]


def test_unit_fields_are_keyword_only():
    with pytest.raises(TypeError):
        Controls("happy", "camera", 3.0)


def test_parse_gaze_reads_names_and_yaw_pitch_pairs():
    assert parse_gaze("Left") == "left"
    assert parse_gaze(" 5,-3 ") == (5.0, -3.0)
    with pytest.raises(AvatarError, match="sideways.*camera, wander, left"):
        parse_gaze("sideways")
    with pytest.raises(AvatarError):
        parse_gaze("1,2,3")


@pytest.mark.parametrize("kwargs, message", [
    ({"mood": "angry"}, r"unknown mood 'angry': use one of neutral, happy, surprised, chill, serious, sad"),
    ({"gaze": "sideways"}, r"unknown gaze target 'sideways'.*camera, wander, left, right, up, down"),
    ({"gaze": (20.0, 0.0)}, r"gaze yaw 20 is out of range: allowed -15 to 15"),
    ({"gaze": (0.0, math.nan)}, r"gaze pitch must be a number"),
    ({"gaze": (1.0,)}, r"gaze must be one of"),
    ({"head_yaw": 30.0}, r"head yaw 30 is out of range: allowed -10 to 10"),
    ({"head_roll": "a lot"}, r"head roll must be a number from -8 to 8, got 'a lot'"),
    ({"head_distance": 3.0}, r"head distance 3 is out of range: allowed 0.6 to 1.6"),
    ({"expressiveness": 2.5}, r"expressiveness 2.5 is out of range: allowed 0 to 2"),
    ({"blink_rate": -1.0}, r"blink rate \(per minute\) -1 is out of range: allowed 0 to 60"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"seed": -1}, r"seed must be an integer from 0"),
])
def test_bad_controls_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(AvatarError, match=message):
        Controls(**kwargs)


def test_replace_revalidates():
    c = Controls()
    assert dataclasses.replace(c, mood="chill").mood == "chill"
    with pytest.raises(AvatarError):
        dataclasses.replace(c, expressiveness=-1.0)


def test_a_mood_with_an_unknown_channel_is_a_bug_caught_at_definition():
    with pytest.raises(ValueError, match="smirk"):
        Mood("odd", "a mood with a typo", offsets={"smirk": 1.0})
