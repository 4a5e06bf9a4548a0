"""FaceDecoder on the bundled astronaut and the test faces (tests/data/faces): the neutral frame is
the photo, and each motion channel moves the right part of the face, measured by running the face
mesh on rendered frames.

Thresholds are in face widths (fw, ear landmark to ear landmark, ~205 px at the default framing)
with the measured value noted beside each, so a regression shows as a number, not a look.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.cli import DEFAULT_PORTRAIT
from avatar.constants import FRAME_SIZE
from avatar.motion import N_CHANNELS, vector
from engines.face_decoder import RIG_INPUT_NAMES, RIG_INPUTS, FaceDecoder

mp = pytest.importorskip("mediapipe")


FACES = [DEFAULT_PORTRAIT] + sorted((Path(__file__).parent / "data" / "faces").glob("*.jpg"))

# Measured defects on the other faces, open in issue #3 (eyes behind glasses or under hooded lids,
# an open-mouth photo's own mouth interior). Strict: a fixed one fails here until it is taken off.
KNOWN_GAPS = {
    "test_blink_closes_its_own_eye[barack_obama-right-left]": "right eye aspect -31 %, not -35 %",
    "test_squint_narrows_and_eyes_wide_opens[barack_obama]": "squint -11 %, not -15 %",
    "test_gaze_pitch_moves_both_irises_up_and_down[barack_obama-1]": "iris moves 0.35 px, not 0.41",
    "test_gaze_pitch_moves_both_irises_up_and_down[barack_obama--1]": "iris moves 0.09 px, not 0.41",
    "test_the_room_stays_still_when_the_head_moves[barack_obama_speaking]": "99.9th pct 13 levels at yaw 15, not 8",
    "test_jaw_open_opens_the_mouth[barack_obama_speaking]": "jaw 1 measures less open than 0.5 (broken interior)",
    "test_smile_raises_its_own_corner[barack_obama_speaking-right-left]": "corner rises 0.010 fw, not 0.02",
    "test_squint_narrows_and_eyes_wide_opens[barack_obama_speaking]": "eyes_wide narrows the eye",
    "test_gaze_yaw_moves_both_irises_sideways[barack_obama_speaking--1]": "iris moves 1.56 px, not 1.60",
    "test_gaze_pitch_moves_both_irises_up_and_down[barack_obama_speaking--1]": "iris moves 0.02 px, not 0.40",
    "test_brows_go_up_and_down[barack_obama_speaking]": "brow_down -0.008 fw, not -0.01",
    "test_lips_press_closes_the_smiling_mouth[grace_hopper]": "closed-mouth photo: no smile to close",
    "test_lips_press_closes_the_smiling_mouth[joe_biden]": "closed-mouth photo: no smile to close",
    "test_blink_closes_its_own_eye[grace_hopper-left-right]": "behind glasses: eye aspect -20 %, not -35 %",
    "test_blink_closes_its_own_eye[grace_hopper-right-left]": "behind glasses: eye aspect -23 %, not -35 %",
    "test_squint_narrows_and_eyes_wide_opens[grace_hopper]": "behind glasses: squint -13 %, not -15 %",
    "test_gaze_yaw_moves_both_irises_sideways[grace_hopper-1]": "iris moves 1.47-1.68 px, not 1.64 both",
    "test_gaze_pitch_moves_both_irises_up_and_down[grace_hopper-1]": "iris moves 0.01 px, not 0.41",
    "test_gaze_pitch_moves_both_irises_up_and_down[grace_hopper--1]": "iris moves the wrong way",
    "test_brows_go_up_and_down[grace_hopper]": "brow_inner_up 0.013 fw, not 0.015",
}


@pytest.fixture(autouse=True)
def _known_gap(request):
    reason = KNOWN_GAPS.get(request.node.name)
    if reason:
        request.node.add_marker(pytest.mark.xfail(reason=f"known gap (#3): {reason}", strict=True))


@pytest.fixture(scope="module", params=FACES, ids=lambda p: Path(p).stem)
def portrait(request):
    from avatar.portrait import analyze_portrait

    return analyze_portrait(request.param)


@pytest.fixture(scope="module")
def rig(portrait):
    from avatar.rig import build_rig

    return build_rig(portrait)


@pytest.fixture(scope="module")
def decoder():
    return FaceDecoder().eval()


@pytest.fixture(scope="module")
def mesh():
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as m:
        yield m


@pytest.fixture(scope="module")
def fw(portrait):
    return float(np.linalg.norm(portrait.landmarks[234, :2] - portrait.landmarks[454, :2]))


def render(decoder, rig, **channels) -> np.ndarray:
    with torch.inference_mode():
        return decoder(torch.from_numpy(vector(**channels))[None], *rig.inputs())[0].numpy()


def landmarks(mesh, frame: np.ndarray) -> np.ndarray:
    found = mesh.process(frame).multi_face_landmarks
    assert found, "the face mesh found no face in the rendered frame"
    return np.array([[p.x * FRAME_SIZE, p.y * FRAME_SIZE] for p in found[0].landmark])


def measure(mesh, frame: np.ndarray) -> dict[str, float]:
    """Face-mesh measures of a frame, px. Subject's right eye is 33/133 (viewer's left)."""
    p = landmarks(mesh, frame)
    d = lambda a, b: float(np.linalg.norm(p[a] - p[b]))  # noqa: E731
    return {
        "aperture": d(13, 14),
        "ear_right": d(159, 145) / d(33, 133),
        "ear_left": d(386, 374) / d(263, 362),
        "nose_x": p[1, 0], "nose_y": p[1, 1],
        "iris_right_x": p[468, 0] - (p[33, 0] + p[133, 0]) / 2,
        "iris_left_x": p[473, 0] - (p[263, 0] + p[362, 0]) / 2,
        "iris_right_y": p[468, 1] - (p[33, 1] + p[133, 1]) / 2,
        "iris_left_y": p[473, 1] - (p[263, 1] + p[362, 1]) / 2,
        "mouth_width": d(61, 291),
        "corner_left_up": p[13, 1] - p[291, 1],
        "corner_right_up": p[13, 1] - p[61, 1],
        "brow_inner": ((p[159, 1] - p[107, 1]) + (p[386, 1] - p[336, 1])) / 2,
        "brow_outer_left": p[263, 1] - p[300, 1],
        "brow_outer_right": p[33, 1] - p[70, 1],
    }


@pytest.fixture(scope="module")
def base(decoder, rig, mesh):
    return measure(mesh, render(decoder, rig))


def change(decoder, rig, mesh, base, **channels) -> dict[str, float]:
    m = measure(mesh, render(decoder, rig, **channels))
    return {k: m[k] - base[k] for k in m}


# ---- contract --------------------------------------------------------------------------------------

def test_rig_inputs_follow_the_contract(rig):
    assert len(rig.inputs()) == len(RIG_INPUT_NAMES)
    for t, (name, shape, dtype) in zip(rig.inputs(), RIG_INPUTS):
        assert tuple(t.shape) == shape and t.dtype == dtype, name


def test_output_is_one_uint8_rgb_frame_and_deterministic(decoder, rig):
    motion = torch.from_numpy(vector(yaw=5.0, jaw_open=0.4, blink_left=0.3, gaze_yaw=4.0))[None]
    assert motion.shape == (1, N_CHANNELS)
    with torch.inference_mode():
        a = decoder(motion, *rig.inputs())
        b = decoder(motion, *rig.inputs())
    assert a.shape == (1, FRAME_SIZE, FRAME_SIZE, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)


def test_neutral_motion_reproduces_the_photo_exactly(decoder, rig, portrait):
    frame = render(decoder, rig).astype(np.int64)
    photo = portrait.image.astype(np.int64)
    mse = float(np.mean((frame - photo) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
    assert psnr >= 40.0
    assert int(np.abs(frame - photo).max()) == 0, f"{int((frame != photo).any(-1).sum())} pixels differ"


def test_eager_cpu_samples_only_what_shows_and_gives_the_traced_pixels(decoder, rig, monkeypatch):
    """Eager on the CPU the decoder samples the head window only in tiles that can show the person
    and the teeth and cavity only where the lips part; traced (what ONNX and TensorRT get) it
    samples everything. On every face, at rest, talking and at the channels' extremes, the frames
    must be the traced graph's exactly, with measurably less sampled."""
    import torch.nn.functional as F

    from engines.face_decoder import MOUTH_H, MOUTH_W, N_WIN

    motions = [vector(), vector(yaw=12.0, pitch=-8.0, jaw_open=0.6, lips_round=0.5, blink_right=1.0, gaze_yaw=10.0),
               vector(roll=-10.0, tx=0.1, ty=-0.1, scale=0.1, jaw_open=1.0, upper_lip_up=1.0, brow_inner_up=1.0),
               vector(yaw=-15.0, pitch=12.0, lips_press=1.0, smile_left=1.0, smile_right=1.0, squint=1.0),
               vector(yaw=3.0, jaw_open=0.25, lips_wide=1.0, frown=1.0, eyes_wide=1.0, gaze_pitch=-10.0)]
    motions = [torch.from_numpy(m)[None] for m in motions]
    with torch.no_grad():
        traced = torch.jit.trace(FaceDecoder().eval(), (motions[1], *rig.inputs()), check_trace=False)
        expected = [traced(m, *rig.inputs()) for m in motions]
    sampled = []  # (layers x channels of the source, output pixels) per grid_sample call
    real = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda x, grid, **kw: sampled.append(
        (tuple(x.shape[:2]), grid.shape[:-1].numel())) or real(x, grid, **kw))
    for motion, want in zip(motions, expected):
        sampled.clear()
        with torch.inference_mode():
            assert torch.equal(decoder(motion, *rig.inputs()), want)
        head = sum(n for shape, n in sampled if shape == (1, 4) and n > 4 * 96 * 64)
        teeth = sum(n for shape, n in sampled if shape == (2, 5))
        assert head < 0.9 * N_WIN  # measured 0.5-0.7 on the astronaut while the head moves
        assert teeth < 0.25 * 2 * MOUTH_W * MOUTH_H  # measured at most 0.1 of the window


# ---- head -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_yaw_moves_the_nose_sideways(decoder, rig, mesh, base, fw, sign):
    c = change(decoder, rig, mesh, base, yaw=10.0 * sign)
    assert sign * c["nose_x"] >= 0.08 * fw  # measured 0.16 fw
    assert abs(c["nose_y"]) <= 0.03 * fw


@pytest.mark.parametrize("sign", [1, -1])
def test_pitch_moves_the_nose_up_and_down(decoder, rig, mesh, base, fw, sign):
    c = change(decoder, rig, mesh, base, pitch=10.0 * sign)
    assert sign * c["nose_y"] >= 0.08 * fw  # + tips the chin down; measured 0.16 fw
    assert abs(c["nose_x"]) <= 0.03 * fw


def test_the_room_stays_still_when_the_head_moves(decoder, rig, portrait, fw):
    import cv2

    # background well away from the person: exactly the photo, however the head moves
    away = cv2.distanceTransform((portrait.person_mask < 0.05).astype(np.uint8), cv2.DIST_L2, 5) > 0.35 * fw
    photo = portrait.image.astype(np.int64)
    for motion in ({"yaw": 15.0}, {"tx": 0.15, "roll": 10.0}, {"pitch": -12.0, "scale": 0.1}):
        frame = render(decoder, rig, **motion).astype(np.int64)
        diff = np.abs(frame - photo)[away]
        assert diff.mean() <= 0.5 and np.percentile(diff, 99.9) <= 8, motion


# ---- mouth ----------------------------------------------------------------------------------------

def test_jaw_open_opens_the_mouth(decoder, rig, mesh, base, fw):
    half = change(decoder, rig, mesh, base, jaw_open=0.5)
    full = change(decoder, rig, mesh, base, jaw_open=1.0)
    assert half["aperture"] >= 0.05 * fw  # measured 0.096 fw
    assert full["aperture"] >= half["aperture"] + 0.05 * fw  # measured 0.195 fw


def test_lips_press_closes_the_smiling_mouth(decoder, rig, mesh, base):
    c = change(decoder, rig, mesh, base, lips_press=1.0)
    assert base["aperture"] + c["aperture"] <= 0.4 * base["aperture"]  # measured ~0.02 of it


def test_lips_wide_and_round_change_the_mouth_width(decoder, rig, mesh, base, fw):
    assert change(decoder, rig, mesh, base, lips_wide=1.0)["mouth_width"] >= 0.02 * fw  # 0.041 fw
    assert change(decoder, rig, mesh, base, lips_round=1.0)["mouth_width"] <= -0.06 * fw  # -0.10 fw


@pytest.mark.parametrize("side,other", [("left", "right"), ("right", "left")])
def test_smile_raises_its_own_corner(decoder, rig, mesh, base, fw, side, other):
    c = change(decoder, rig, mesh, base, **{f"smile_{side}": 1.0})
    assert c[f"corner_{side}_up"] >= 0.02 * fw  # measured 0.03-0.045 fw
    assert c[f"corner_{side}_up"] >= 2.0 * abs(c[f"corner_{other}_up"])
    assert c["mouth_width"] > 0.0


def test_frown_lowers_both_corners(decoder, rig, mesh, base, fw):
    c = change(decoder, rig, mesh, base, frown=1.0)
    assert c["corner_left_up"] <= -0.01 * fw and c["corner_right_up"] <= -0.01 * fw  # ~-0.024 fw


# ---- eyes and brows -------------------------------------------------------------------------------

@pytest.mark.parametrize("side,other", [("left", "right"), ("right", "left")])
def test_blink_closes_its_own_eye(decoder, rig, mesh, base, side, other):
    c = change(decoder, rig, mesh, base, **{f"blink_{side}": 1.0})
    assert c[f"ear_{side}"] <= -0.35 * base[f"ear_{side}"]  # measured -47% .. -57%
    assert abs(c[f"ear_{other}"]) <= 0.1 * base[f"ear_{other}"]  # measured <= 3%
    partial = change(decoder, rig, mesh, base, **{f"blink_{side}": 0.5})
    assert c[f"ear_{side}"] < partial[f"ear_{side}"] < 0.0


def test_squint_narrows_and_eyes_wide_opens(decoder, rig, mesh, base):
    assert change(decoder, rig, mesh, base, squint=1.0)["ear_left"] <= -0.15 * base["ear_left"]  # -27%
    assert change(decoder, rig, mesh, base, eyes_wide=1.0)["ear_left"] >= 0.05 * base["ear_left"]  # +23%


@pytest.mark.parametrize("sign", [1, -1])
def test_gaze_yaw_moves_both_irises_sideways(decoder, rig, mesh, base, fw, sign):
    c = change(decoder, rig, mesh, base, gaze_yaw=15.0 * sign)
    assert sign * c["iris_right_x"] >= 0.008 * fw and sign * c["iris_left_x"] >= 0.008 * fw  # ~0.017 fw


@pytest.mark.parametrize("sign", [1, -1])
def test_gaze_pitch_moves_both_irises_up_and_down(decoder, rig, mesh, base, fw, sign):
    c = change(decoder, rig, mesh, base, gaze_pitch=10.0 * sign)
    assert sign * (c["iris_right_y"] + c["iris_left_y"]) / 2 >= 0.002 * fw


def test_brows_go_up_and_down(decoder, rig, mesh, base, fw):
    assert change(decoder, rig, mesh, base, brow_inner_up=1.0)["brow_inner"] >= 0.015 * fw  # 0.036 fw
    assert change(decoder, rig, mesh, base, brow_down=1.0)["brow_inner"] <= -0.01 * fw  # -0.02 fw
    for side, other in (("left", "right"), ("right", "left")):
        c = change(decoder, rig, mesh, base, **{f"brow_outer_up_{side}": 1.0})
        assert c[f"brow_outer_{side}"] >= 0.01 * fw  # 0.02 fw
        assert abs(c[f"brow_outer_{other}"]) <= 0.5 * c[f"brow_outer_{side}"]
