"""avatar/facemeasure.py: the evaluation's measures on frames rendered by the FaceDecoder.

Rendered frames of the bundled astronaut, measured with the face mesh in still-image mode. The
numbers beside each threshold are what was measured when the test was written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.facemeasure import (EYE_LEFT, EYE_RIGHT, IRIS_LEFT, IRIS_RIGHT, FaceMeter, affine_residual,
                                detect_blinks, eye_aspect_ratio, head_pose, iris_position, mouth_aperture,
                                open_eye_level)
from avatar.motion import vector

pytest.importorskip("mediapipe")


@pytest.fixture(scope="module")
def rig(rig_cache):
    from avatar.cli import DEFAULT_PORTRAIT
    from avatar.rig import load_rig

    return load_rig(DEFAULT_PORTRAIT)


@pytest.fixture(scope="module")
def decoder():
    from engines.face_decoder import FaceDecoder

    return FaceDecoder().eval()


@pytest.fixture(scope="module")
def meter():
    with FaceMeter(video=False) as m:
        yield m


def measure(meter, decoder, rig, **channels) -> np.ndarray:
    with torch.inference_mode():
        frame = decoder(torch.from_numpy(vector(**channels))[None], *rig.inputs())[0].numpy()
    p = meter.landmarks(frame)
    assert p is not None, f"no face found in the frame rendered with {channels}"
    assert p.shape == (478, 3)
    return p


@pytest.fixture(scope="module")
def neutral(meter, decoder, rig):
    return measure(meter, decoder, rig)


def test_open_jaw_measures_a_larger_aperture(meter, decoder, rig, neutral):
    rest = mouth_aperture(neutral)  # 0.075: the astronaut smiles with parted lips
    opened = mouth_aperture(measure(meter, decoder, rig, jaw_open=0.6))  # 0.19
    pressed = mouth_aperture(measure(meter, decoder, rig, lips_press=1.0))  # 0.002
    assert opened > rest + 0.06
    assert pressed < 0.3 * rest


def test_blink_frame_has_a_lower_eye_aspect_ratio(meter, decoder, rig, neutral):
    shut = measure(meter, decoder, rig, blink_left=1.0, blink_right=1.0)
    for eye in (EYE_RIGHT, EYE_LEFT):
        open_ear = eye_aspect_ratio(neutral, eye)  # 0.33 / 0.32
        assert 0.2 < open_ear < 0.45
        assert eye_aspect_ratio(shut, eye) < 0.7 * open_ear  # 0.18 / 0.14


def test_head_pose_signs_follow_the_motion_channels(meter, decoder, rig, neutral):
    """Signs exact; magnitudes are what the mesh reads from a warped photo, below the rendered
    angle (measured: yaw +-8 -> +6.0/-5.3, pitch +-8 -> +3.7/-5.0, roll 8 -> 7.2)."""
    yaw, pitch, roll = head_pose(neutral, neutral)
    assert max(abs(yaw), abs(pitch), abs(roll)) < 1e-6
    yaw, pitch, roll = head_pose(measure(meter, decoder, rig, yaw=8.0), neutral)
    assert 3.5 < yaw < 11.0 and abs(pitch) < 1.5 and abs(roll) < 1.5
    yaw, _, _ = head_pose(measure(meter, decoder, rig, yaw=-8.0), neutral)
    assert -11.0 < yaw < -3.5
    yaw, pitch, _ = head_pose(measure(meter, decoder, rig, pitch=8.0), neutral)  # chin down is +
    assert 2.0 < pitch < 10.0 and abs(yaw) < 1.5
    _, _, roll = head_pose(measure(meter, decoder, rig, roll=8.0), neutral)  # clockwise on screen is +
    assert 5.0 < roll < 10.0


def test_iris_follows_gaze(meter, decoder, rig, neutral):
    looked = measure(meter, decoder, rig, gaze_yaw=10.0)  # iris x +0.08 / +0.13 half eye widths
    for iris, eye in ((IRIS_RIGHT, EYE_RIGHT), (IRIS_LEFT, EYE_LEFT)):
        x0, _ = iris_position(neutral, iris, eye[0], eye[3])
        x1, _ = iris_position(looked, iris, eye[0], eye[3])
        assert x1 > x0 + 0.04


def test_blink_detection_on_a_synthetic_ear_series():
    rng = np.random.default_rng(0)
    ear = 0.30 + 0.006 * rng.standard_normal(400)
    dip = np.array([0.27, 0.21, 0.16, 0.15, 0.17, 0.21, 0.25, 0.28])  # ~8 frames, 50% down
    for start in (40, 150, 300):
        ear[start:start + len(dip)] = dip
    ear[100:104] = [0.28, 0.27, 0.27, 0.28]  # a twitch: 10% down, not a blink
    ear[200:300] = 0.14  # eyes kept shut 2.5 s: not a blink
    ear[302] = np.nan  # a frame without a face inside a blink
    ear[360:365] = np.nan
    level = open_eye_level(ear)
    assert level == pytest.approx(0.30, abs=0.01)
    blinks = detect_blinks(ear)
    assert [b.start for b in blinks] == [41, 151, 301]
    assert all(5 <= b.frames <= 7 for b in blinks)
    assert all(0.45 < b.depth < 0.55 for b in blinks)
    assert detect_blinks(np.full(50, np.nan)) == []


def test_affine_residual_ignores_head_motion_and_sees_wobble():
    rng = np.random.default_rng(1)
    src = rng.uniform(100, 400, (40, 2))
    angle = np.radians(3.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 1.02 * src @ rot.T + [4.0, -2.0]
    assert affine_residual(src, moved) < 1e-9
    wobble = rng.standard_normal((40, 2)) * 0.5
    assert affine_residual(src, moved + wobble) == pytest.approx(np.linalg.norm(wobble, axis=1).mean(), rel=0.25)


def test_meter_tracks_a_clip(rig, decoder):
    frames = []
    with torch.inference_mode():
        for jaw in (0.0, 0.3, 0.6):
            frames.append(decoder(torch.from_numpy(vector(jaw_open=jaw))[None], *rig.inputs())[0].numpy())
    with FaceMeter(video=True) as meter:
        for frame in frames + [np.zeros_like(frames[0])]:
            meter.add(frame)
        track = meter.track()
    assert track.found.tolist() == [True, True, True, False]
    assert np.all(np.diff(track.aperture[:3]) > 0.03)
    assert np.isnan(track.jitter[0]) and np.all(track.jitter[1:3] < 1.5)
    assert np.isnan(track.aperture[3]) and abs(track.yaw[0]) < 1e-6
    with pytest.raises(ValueError):
        with FaceMeter() as meter:
            meter.add(np.zeros((512, 512), np.uint8))
