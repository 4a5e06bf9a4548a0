"""Face measurement on rendered frames with the mediapipe face mesh (the evaluation's eyes).

    with FaceMeter() as meter:          # video tracking; FaceMeter(video=False) for unrelated stills
        for frame in frames:            # (512, 512, 3) uint8 RGB
            meter.add(frame)            # measures the frame, keeps what the clip summaries need
    track = meter.track()               # per-frame arrays: aperture, EAR, head pose, iris, jitter

Measures, per frame (landmark indices are mediapipe's 478-point mesh; "right"/"left" are the
subject's, so the subject's right eye 33/133 is on the viewer's left):
- aperture: inner-lip gap 13-14 over face width 234-454 (2D, image plane). The astronaut's rest
  mouth is slightly open (about 0.075); pressed lips measure about 0.002.
- mouth_width: lip corners 61-291 over face width.
- ear_right / ear_left: eye aspect ratio (|p2-p6| + |p3-p5|) / (2 |p1-p4|) on the usual six points.
  The mesh under-reads closed lids on rendered frames: a fully shut lid reads about half the open
  EAR, a half blink about 0.7 of it, so blink thresholds are relative to the clip's open EAR.
- yaw / pitch / roll (degrees, avatar/motion.py's signs: yaw + faces the viewer's right, pitch +
  chin down, roll + clockwise on screen), relative to a reference frame (the clip's first face
  unless one is given): a weak-perspective fit, in the manner of solvePnP, of the frame's 2D
  points to the reference frame's 3D points on the parts of the head that the renderer's
  expressions move least (eye corners and sockets, nose bridge, cheekbones, the ear-side face
  oval: RIGID); the 2x3 affine camera is projected onto the nearest scaled rotation. Only the
  reference's mesh depth is used (the mesh's per-frame depth wanders by ~7 px with
  expressions). The angle read is the one the picture shows, which a 2.5D warp of a photo
  understates: on the astronaut with the FaceDecoder of 2025-11-27, a rendered yaw of +-8 deg
  reads +6.0/-5.3, pitch +-8 reads +3.7/-5.0, roll 8 reads 7.2 (an earlier rig: yaw +-10 read
  +9.6/-8.7). Expressions alone (jaw, smile, brows, blinks) read as at most about 1.5 deg.
- iris_right / iris_left: iris centre (468 / 473) in the eye's own frame, in half eye widths from
  the midpoint of the two corners: x along the corner axis (+1 is the corner on the viewer's
  right, so gaze_yaw + moves it +), y perpendicular to it (+ down).
- jitter (px at the frame size): for each consecutive pair, the mean residual displacement of the
  rigid points after the best 2D affine map from one frame to the next; the affine map takes
  out the global head motion (small rotations, translation, scale), what is left is wobble of
  the renderer plus the mesh's own tracking noise.

Blinks are found on the mean EAR of both eyes with hysteresis (`detect_blinks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar.constants import FPS

N_LANDMARKS = 478  # the face mesh with refine_landmarks=True (iris points 468-477)

LIP_INNER_TOP, LIP_INNER_BOTTOM = 13, 14
MOUTH_CORNERS = (61, 291)
FACE_WIDTH = (234, 454)  # the ear-side face-oval points: a face width, as the rig uses
# p1..p6 for the eye aspect ratio: outer corner, two upper lid, inner corner, two lower lid points
EYE_RIGHT = (33, 160, 158, 133, 153, 144)
EYE_LEFT = (263, 387, 385, 362, 380, 373)
IRIS_RIGHT, IRIS_LEFT = 468, 473
# points the renderer's expressions move least (each under 2.5 px across jaw, smile, rounding,
# brows, blinks, squint; measured on the astronaut): eye corners and sockets, nose bridge,
# cheekbones, the ear-side face oval. Forehead points are out: the mesh lifts them with the brows.
RIGID = (33, 133, 263, 362, 246, 466, 130, 359, 25, 255, 31, 261, 228, 448, 110, 339, 226, 446, 143, 372,
         34, 264, 162, 389, 6, 197, 196, 419, 122, 351, 188, 412, 128, 357, 174, 399, 245, 465, 244, 464,
         233, 453, 232, 452, 7, 249, 163, 390, 116, 345, 111, 340, 127, 356, 234, 454)

BLINK_CLOSE_RATIO = 0.78  # EAR below this fraction of the open level starts a blink (>= ~40% shut)
BLINK_OPEN_RATIO = 0.88  # and above this fraction ends it
BLINK_MAX_S = 1.0  # longer closures are eyes kept shut, not blinks


# ---------------------------------------------------------------------------------------------
# Per-frame measures on one (478, 3) landmark array in pixels (x right, y down, z away)
# ---------------------------------------------------------------------------------------------

def _dist(p: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(p[a, :2] - p[b, :2]))


def face_width(p: np.ndarray) -> float:
    return _dist(p, *FACE_WIDTH)


def mouth_aperture(p: np.ndarray) -> float:
    """Inner-lip gap over face width (unitless)."""
    return _dist(p, LIP_INNER_TOP, LIP_INNER_BOTTOM) / face_width(p)


def mouth_width(p: np.ndarray) -> float:
    """Lip-corner distance over face width (unitless)."""
    return _dist(p, *MOUTH_CORNERS) / face_width(p)


def eye_aspect_ratio(p: np.ndarray, eye: tuple[int, ...]) -> float:
    p1, p2, p3, p4, p5, p6 = eye
    return (_dist(p, p2, p6) + _dist(p, p3, p5)) / (2.0 * _dist(p, p1, p4))


def iris_position(p: np.ndarray, iris: int, outer: int, inner: int) -> tuple[float, float]:
    """Iris centre in the eye's frame: (x, y) in half eye widths from the corners' midpoint;
    x + toward the viewer's right, y + down (perpendicular to the corner axis)."""
    a, b = p[outer, :2], p[inner, :2]
    if a[0] > b[0]:  # orient the axis left -> right on screen
        a, b = b, a
    axis = b - a
    half = np.linalg.norm(axis) / 2.0
    u = axis / (2.0 * half)
    v = np.array([-u[1], u[0]])  # u rotated +90 deg in image coordinates: points down
    d = p[iris, :2] - (a + b) / 2.0
    return float(d @ u / half), float(d @ v / half)


def head_pose(p: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of the head in `p` relative to `reference`, both (478, 3) px.
    Weak perspective: p[:, :2] ~ s R[:2] reference + t on the RIGID points."""
    idx = list(RIGID)
    x = reference[idx] - reference[idx].mean(0)  # (N, 3)
    y = p[idx, :2] - p[idx, :2].mean(0)  # (N, 2)
    camera, *_ = np.linalg.lstsq(x, y, rcond=None)  # (3, 2): x @ camera ~ y
    u, _, vt = np.linalg.svd(camera.T, full_matrices=False)  # nearest scaled 2x3 with orthonormal rows
    rows = u @ vt
    rot = np.vstack([rows, np.cross(rows[0], rows[1])])
    forward = rot @ np.array([0.0, 0.0, -1.0])  # the face looks toward the camera (-z)
    right = rot @ np.array([1.0, 0.0, 0.0])  # the viewer's right in the reference
    yaw = np.degrees(np.arctan2(forward[0], -forward[2]))
    pitch = np.degrees(np.arctan2(forward[1], np.hypot(forward[0], forward[2])))
    roll = np.degrees(np.arctan2(right[1], right[0]))
    return float(yaw), float(pitch), float(roll)


def affine_residual(src: np.ndarray, dst: np.ndarray) -> float:
    """Mean distance (px) left between dst and the least-squares 2D affine image of src. (N, 2) each."""
    a = np.hstack([src, np.ones((len(src), 1))])
    coef, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return float(np.linalg.norm(a @ coef - dst, axis=1).mean())


# ---------------------------------------------------------------------------------------------
# Blinks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blink:
    start: int  # first frame below the close threshold
    end: int  # first frame back above the open threshold (exclusive)
    depth: float  # 1 - min EAR / open EAR

    @property
    def frames(self) -> int:
        return self.end - self.start


def open_eye_level(ear: np.ndarray) -> float:
    """The clip's open-eye EAR: the median of the valid frames (eyes are open most of the time)."""
    valid = ear[np.isfinite(ear)]
    return float(np.median(valid)) if len(valid) else float("nan")


def detect_blinks(ear: np.ndarray, *, open_level: float | None = None, close_ratio: float = BLINK_CLOSE_RATIO,
                  open_ratio: float = BLINK_OPEN_RATIO, max_frames: int = round(BLINK_MAX_S * FPS)) -> list[Blink]:
    """Blinks in an EAR series (frames, NaN where no face): hysteresis on the EAR relative to
    the open-eye level. Closures longer than `max_frames` are not counted as blinks; a NaN
    frame neither starts nor ends one."""
    ear = np.asarray(ear, dtype=np.float64)
    level = open_eye_level(ear) if open_level is None else float(open_level)
    close, reopen = close_ratio * level, open_ratio * level
    blinks: list[Blink] = []
    start, low = None, np.inf
    for i, e in enumerate(ear):
        if not np.isfinite(e):
            continue
        if start is None:
            if e < close:
                start, low = i, e
        else:
            low = min(low, e)
            if e > reopen:
                if i - start <= max_frames:
                    blinks.append(Blink(start, i, float(1.0 - low / level)))
                start = None
    return blinks


# ---------------------------------------------------------------------------------------------
# The meter
# ---------------------------------------------------------------------------------------------

@dataclass
class FaceTrack:
    """Per-frame measures of a clip; NaN where the mesh found no face. Angles in degrees,
    jitter in pixels (jitter[0] and any frame after a miss are NaN)."""

    found: np.ndarray
    aperture: np.ndarray
    mouth_width: np.ndarray
    ear_right: np.ndarray
    ear_left: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    iris_right: np.ndarray  # (T, 2)
    iris_left: np.ndarray  # (T, 2)
    jitter: np.ndarray

    @property
    def ear(self) -> np.ndarray:
        return (self.ear_right + self.ear_left) / 2.0

    def __len__(self) -> int:
        return len(self.found)


class FaceMeter:
    """The mediapipe face mesh as a context manager, measuring frames as they come.

    video=True tracks across frames (mediapipe's static_image_mode=False): consecutive frames of
    one clip. `reference` (478, 3) px sets the head-pose reference; otherwise the first frame with
    a face is the reference. Keeps only the per-frame measures (memory ~100 B/frame), never frames.
    """

    def __init__(self, *, video: bool = True, reference: np.ndarray | None = None):
        self.video = video
        self.reference = None if reference is None else np.asarray(reference, dtype=np.float64)
        self._mesh = None
        self._rows: list[tuple] = []
        self._previous: np.ndarray | None = None

    def __enter__(self) -> "FaceMeter":
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=not self.video, refine_landmarks=True,
                                                     max_num_faces=1, min_detection_confidence=0.5,
                                                     min_tracking_confidence=0.5)
        self._mesh.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mesh is not None:
            self._mesh.__exit__(*exc)
            self._mesh = None

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 RGB -> (478, 3) float64 px (z scaled like x), or None without a face."""
        if self._mesh is None:
            raise RuntimeError("FaceMeter is used outside its `with` block")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}")
        found = self._mesh.process(frame).multi_face_landmarks
        if not found:
            return None
        h, w = frame.shape[:2]
        return np.array([[q.x * w, q.y * h, q.z * w] for q in found[0].landmark], dtype=np.float64)

    def add(self, frame: np.ndarray) -> np.ndarray | None:
        """Measure one frame of the clip; returns its landmarks (or None)."""
        p = self.landmarks(frame)
        if p is None:
            self._rows.append(None)
            self._previous = None
            return None
        if self.reference is None:
            self.reference = p
        jitter = np.nan
        if self._previous is not None:
            jitter = affine_residual(self._previous[list(RIGID), :2], p[list(RIGID), :2])
        self._previous = p
        self._rows.append((mouth_aperture(p), mouth_width(p), eye_aspect_ratio(p, EYE_RIGHT),
                           eye_aspect_ratio(p, EYE_LEFT), *head_pose(p, self.reference),
                           *iris_position(p, IRIS_RIGHT, EYE_RIGHT[0], EYE_RIGHT[3]),
                           *iris_position(p, IRIS_LEFT, EYE_LEFT[0], EYE_LEFT[3]), jitter))
        return p

    def track(self) -> FaceTrack:
        """Everything measured so far, as arrays."""
        rows = np.array([r if r is not None else (np.nan,) * 12 for r in self._rows], dtype=np.float64).reshape(-1, 12)
        return FaceTrack(found=np.array([r is not None for r in self._rows], dtype=bool),
                         aperture=rows[:, 0], mouth_width=rows[:, 1], ear_right=rows[:, 2], ear_left=rows[:, 3],
                         yaw=rows[:, 4], pitch=rows[:, 5], roll=rows[:, 6], iris_right=rows[:, 7:9],
                         iris_left=rows[:, 9:11], jitter=rows[:, 11])
