"""The portrait rig: everything the FaceDecoder needs about one portrait, as plain tensors.

Built once per portrait (`build_rig`, analysis time: numpy, scipy, OpenCV, float64 solves), cached
on disk by image hash (`load_rig`), and loaded without any analysis library (torch only), so the
GPU machine that runs the engines can load a rig saved elsewhere.

Shapes are fixed (engines/face_decoder.py RIG_INPUTS): one exported graph serves every portrait.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engines.face_decoder import RIG_INPUT_NAMES, RIG_INPUTS

RIG_VERSION = 1

__all__ = ["RIG_INPUT_NAMES", "RIG_VERSION", "Rig", "build_rig", "load_rig", "rig_cache_dir"]


@dataclass
class Rig:
    """One portrait's rig.

    image:     (FRAME_SIZE, FRAME_SIZE, 3) uint8 RGB, the framed photo (what neutral motion shows)
    landmarks: (478, 3) float32, face-mesh points in frame pixels (z toward the viewer negative)
    engine:    the decoder's inputs by name, exactly as RIG_INPUTS specifies
    """

    image: Tensor
    landmarks: Tensor
    engine: dict[str, Tensor] = field(default_factory=dict)

    def inputs(self) -> tuple[Tensor, ...]:
        """The decoder's rig inputs in RIG_INPUT_NAMES order."""
        return tuple(self.engine[name] for name in RIG_INPUT_NAMES)

    def save(self, path: str | os.PathLike) -> None:
        """torch.save of plain tensors, written atomically (temp file + os.replace)."""
        payload = {"version": RIG_VERSION, "image": self.image, "landmarks": self.landmarks,
                   **{f"engine.{k}": v for k, v in self.engine.items()}}
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Rig":
        """Load a saved rig (torch only). Raises ValueError for another RIG_VERSION or bad shapes."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != RIG_VERSION:
            raise ValueError(f"rig {path} has version {payload.get('version')}, expected {RIG_VERSION}")
        engine = {k[len("engine."):]: v for k, v in payload.items() if k.startswith("engine.")}
        rig = cls(image=payload["image"], landmarks=payload["landmarks"], engine=engine)
        rig.check()
        return rig

    def check(self) -> None:
        """Every engine input present with the contract's shape and dtype (ValueError otherwise)."""
        for name, shape, dtype in RIG_INPUTS:
            t = self.engine.get(name)
            if t is None:
                raise ValueError(f"rig is missing {name!r}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"rig tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")


def rig_cache_dir() -> Path:
    """$VASA_AVATAR_CACHE/rigs if set, else the user cache dir's vasa-avatar/rigs."""
    root = os.environ.get("VASA_AVATAR_CACHE")
    if root:
        return Path(root) / "rigs"
    import platformdirs

    return Path(platformdirs.user_cache_dir("vasa-avatar")) / "rigs"


def rig_cache_key(image_bytes: bytes, head_distance: float, face_index: int | None) -> str:
    h = hashlib.sha256(image_bytes)
    h.update(f"|head_distance={float(head_distance)!r}|face_index={face_index!r}|rig={RIG_VERSION}".encode())
    return h.hexdigest()


def load_rig(image_path: str | os.PathLike, *, head_distance: float = 1.0, face_index: int | None = None,
             cache_dir: str | os.PathLike | None = None) -> Rig:
    """The rig for a photo: from the cache when this exact file, framing and rig version were seen,
    else analysed (mediapipe), built and cached. A cache hit imports no analysis code."""
    from avatar.errors import AvatarError

    path = Path(image_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AvatarError(f"cannot read portrait {path}: {e.strerror or e}") from None
    folder = Path(cache_dir) if cache_dir is not None else rig_cache_dir()
    cached = folder / f"{rig_cache_key(data, head_distance, face_index)}.pt"
    if cached.is_file():
        try:
            return Rig.load(cached)
        except Exception:  # a stale or damaged cache entry is rebuilt, never fatal
            pass
    from avatar.portrait import analyze_portrait

    rig = build_rig(analyze_portrait(path, head_distance=head_distance, face_index=face_index))
    folder.mkdir(parents=True, exist_ok=True)
    rig.save(cached)
    return rig


# ---------------------------------------------------------------------------------------------
# Analysis time: everything below runs once per portrait (numpy / scipy / OpenCV, float64).
# mediapipe face-mesh topology. "right"/"left" are the subject's; the subject's right is on the
# viewer's left (smaller x).

LIPS_UPPER_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
EYE_RIGHT_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)  # outer corner -> inner corner
EYE_RIGHT_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
EYE_LEFT_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
EYE_LEFT_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
BROW_RIGHT = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)  # upper edge outer->inner, lower edge
BROW_LEFT = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
JAWLINE = (132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361)
# the upper face oval is not the head's silhouette: under yaw it overtakes the hair and folds
UPPER_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 93, 234, 127, 162, 21, 54, 103, 67, 109)
NOSE = (1, 2, 4, 5, 6, 19, 94, 98, 327, 129, 358, 168, 197, 195)
IRIS = tuple(range(468, 478))
MOUTH_CORNERS = (61, 291, 78, 308)
N_RING = 20  # hair/skull silhouette points
RING_DEPTH_FW = 0.1  # silhouette depth behind the ear landmarks, face widths
PIVOT_FW = (0.0, 0.3, 0.3)  # neck pivot from the ear midpoint: down, back (face widths)
HINGE_FW = (0.05, 0.4)  # jaw hinge from the ear midpoint: down, back (face widths)
CTRL_MIN_GAP_FW = 0.015  # control points closer than this are merged (TPS conditioning)
TPS_REGULARISATION = 1e-5


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass
class FaceFrame:
    """Face-local axes: u to the viewer's right along the ears, v down, both in face widths."""

    origin: np.ndarray  # (2,) px, the mouth centre
    ex: np.ndarray  # (2,) unit, viewer's right
    ey: np.ndarray  # (2,) unit, down
    fw: float  # face width, px (ear landmark to ear landmark)
    z0: float  # depth of the origin, px

    def local(self, p: np.ndarray) -> np.ndarray:
        """(N, 2|3) px -> (N, 2) u, v in face widths."""
        d = p[:, :2] - self.origin
        return np.stack([d @ self.ex, d @ self.ey], axis=1) / self.fw

    def to_px(self, duv: np.ndarray, dz: np.ndarray | float = 0.0) -> np.ndarray:
        """(N, 2) displacement in face widths (+ optional depth) -> (N, 3) px."""
        xy = (duv[:, :1] * self.ex + duv[:, 1:2] * self.ey) * self.fw
        z = np.broadcast_to(np.asarray(dz, dtype=np.float64), (len(duv),))[:, None] * self.fw
        return np.concatenate([xy, z], axis=1)


def face_frame(lm: np.ndarray) -> FaceFrame:
    right, left = lm[234, :2], lm[454, :2]
    ex = (left - right) / np.linalg.norm(left - right)
    ey = np.array([-ex[1], ex[0]])
    origin = (lm[13, :2] + lm[14, :2]) / 2
    return FaceFrame(origin=origin, ex=ex, ey=ey, fw=float(np.linalg.norm(left - right)),
                     z0=float((lm[13, 2] + lm[14, 2]) / 2))


def _gauss(d2: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-d2 / (2.0 * sigma * sigma))


def _dist2_to(uv: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Squared distance of each point to the nearest anchor: (N, 2), (A, 2) -> (N,)."""
    return ((uv[:, None, :] - anchors[None, :, :]) ** 2).sum(-1).min(1)


def expression_basis(lm: np.ndarray, frame: FaceFrame) -> dict[str, np.ndarray]:
    """Per channel, each landmark's 3D displacement (478, 3) px at channel value 1.

    Hand-authored from the mesh topology in face-width units, so they scale with the face.
    Eyelid margins are left to the decoder's eye layer; jaw_open's rotation is in ctrl_jaw.
    """
    uv = frame.local(lm)
    n = len(lm)
    u, v = uv[:, 0], uv[:, 1]
    a = abs(uv[291, 0] - uv[61, 0]) / 2  # mouth half-width
    idx = lambda ids: np.array(ids, dtype=np.int64)  # noqa: E731
    upper_out, lower_out = idx(LIPS_UPPER_OUTER[1:-1]), idx(LIPS_LOWER_OUTER[1:-1])
    upper_in, lower_in = idx(LIPS_UPPER_INNER[1:-1]), idx(LIPS_LOWER_INNER[1:-1])
    lips = np.r_[idx(LIPS_UPPER_OUTER), idx(LIPS_LOWER_OUTER), upper_in, lower_in, idx((78, 308))]
    lid_margins = idx(EYE_RIGHT_UPPER + EYE_RIGHT_LOWER + EYE_LEFT_UPPER + EYE_LEFT_LOWER)
    brows = {"right": idx(BROW_RIGHT), "left": idx(BROW_LEFT)}
    centre_weight = np.clip(1.0 - (u / a) ** 2, 0.0, 1.0)  # 1 mid-mouth, 0 at the corners
    mouth_zone = _gauss(np.maximum(np.abs(u) - a, 0.0) ** 2, 0.12) * _gauss(v ** 2, 0.16)
    out: dict[str, np.ndarray] = {}

    def new():
        return np.zeros((n, 2)), np.zeros(n)

    # lips_wide ("ee"): corners out, a little up; lips part slightly
    d, dz = new()
    d[:, 0] = 0.035 * np.clip(u / a, -1.3, 1.3) * mouth_zone
    d[:, 1] = -0.006 * mouth_zone * np.clip(np.abs(u) / a, 0, 1)
    d[upper_in, 1] -= 0.006 * centre_weight[upper_in]
    d[lower_in, 1] += 0.010 * centre_weight[lower_in]
    out["lips_wide"] = frame.to_px(d, dz)

    # lips_round ("oo"): corners in by a third, lips pout forward and thicken, a small opening
    d, dz = new()
    d[:, 0] = -0.075 * np.clip(u / a, -1.3, 1.3) * mouth_zone
    d[upper_out, 1] -= 0.014 * centre_weight[upper_out] ** 0.5
    d[lower_out, 1] += 0.018 * centre_weight[lower_out] ** 0.5
    d[upper_in, 1] -= 0.005 * centre_weight[upper_in]
    d[lower_in, 1] += 0.010 * centre_weight[lower_in]
    dz[lips] = -0.05
    out["lips_round"] = frame.to_px(d, dz)

    # lips_press ("m b p"): the inner lips meet slightly below the middle, the red of the lips rolls in
    d, dz = new()
    gap = uv[lower_in, 1] - uv[upper_in, 1]
    d[upper_in, 1] = 0.55 * gap
    d[lower_in, 1] = -0.45 * gap
    upper_thick = np.maximum(uv[upper_in, 1] - uv[upper_out, 1], 0)
    lower_thick = np.maximum(uv[lower_out, 1] - uv[lower_in, 1], 0)
    d[upper_out, 1] = 0.55 * gap + 0.2 * upper_thick
    d[lower_out, 1] = -0.45 * gap - 0.2 * lower_thick
    d[:, 0] += -0.01 * np.clip(u / a, -1.3, 1.3) * mouth_zone
    out["lips_press"] = frame.to_px(d, dz)

    # upper_lip_up: upper lip raised most beside the middle, the nose wings follow a little
    d, dz = new()
    profile = 0.3 + 0.7 * _smoothstep((1.0 - np.abs(u) / a) / 0.5)
    for ring in (upper_out, upper_in, idx((0, 37, 267))):
        d[ring, 1] = -0.035 * profile[ring]
    philtrum = (v < uv[0, 1]) & (v > uv[2, 1] - 0.02) & (np.abs(u) < a)
    d[philtrum, 1] = -0.02
    d[idx((98, 327, 129, 358, 64, 294, 2, 94)), 1] = -0.008
    out["upper_lip_up"] = frame.to_px(d, dz)

    # smiles: one corner up and out, the lips near it follow, the cheek rises
    for name, corner, cheek, side in (("smile_left", 291, 425, 1.0), ("smile_right", 61, 205, -1.0)):
        d, dz = new()
        near = _gauss(_dist2_to(uv, uv[[corner]]), 0.11)
        near[(v < uv[2, 1]) | (side * u < -a * 0.2)] *= 0.0  # nose and the far half stay
        d[:, 0] = side * 0.030 * near
        d[:, 1] = -0.040 * near
        bulge = _gauss(_dist2_to(uv, uv[[cheek]]), 0.12) * (side * u > 0)
        d[:, 1] -= 0.022 * bulge
        d[:, 0] += side * 0.008 * bulge
        d[lid_margins] = 0.0
        out[name] = frame.to_px(d, dz)

    # frown: corners down, the chin pushes the lower lip up
    d, dz = new()
    corners = _gauss(_dist2_to(uv, uv[[61, 291]]), 0.09) * (v > -0.08)
    d[:, 1] = 0.035 * corners
    d[:, 0] = -0.006 * np.sign(u) * corners
    chin = _gauss(_dist2_to(uv, uv[[152, 175, 199]]), 0.1)
    d[:, 1] -= 0.008 * chin * (v > uv[17, 1])
    out["frown"] = frame.to_px(d, dz)

    # brows: raised or lowered; skin above follows less, the eyelid fold a little
    brow_all = np.r_[brows["right"], brows["left"]]
    above_eyes = v < max(uv[[159, 386], 1]) - 0.01  # above the upper lid margins

    def brow_motion(anchor_ids, amount, sigma=0.09, inward=0.0):
        d, dz = new()
        w = _gauss(_dist2_to(uv, uv[list(anchor_ids)]), sigma) * above_eyes
        d[:, 1] = amount * w
        d[:, 0] = -inward * np.sign(u) * w
        d[lid_margins] = 0.0
        return frame.to_px(d, dz)

    out["brow_inner_up"] = brow_motion((107, 66, 55, 65, 336, 296, 285, 295), -0.05)
    out["brow_outer_up_left"] = brow_motion((300, 293, 276, 283), -0.045)
    out["brow_outer_up_right"] = brow_motion((70, 63, 46, 53), -0.045)
    out["brow_down"] = brow_motion(tuple(brow_all), 0.03, sigma=0.08, inward=0.012)
    out["eyes_wide"] = brow_motion(tuple(brow_all), -0.015, sigma=0.1)

    # squint: the cheek under each eye rises (the lids themselves are the eye layer's)
    d, dz = new()
    under = _gauss(_dist2_to(uv, uv[list(EYE_RIGHT_LOWER[2:-2] + EYE_LEFT_LOWER[2:-2])] + [0, 0.05]), 0.06)
    d[:, 1] = -0.012 * under * (v > uv[145, 1] - 0.01)
    d[lid_margins] = 0.0
    out["squint"] = frame.to_px(d, dz)

    # jaw_open beyond the rigid rotation: the lower lip drops a little more (the lower teeth show),
    # the corners come in, the upper lip lifts a hair
    d, dz = new()
    d[lower_in, 1] = 0.02 * centre_weight[lower_in]
    d[lower_out, 1] = 0.01 * centre_weight[lower_out]
    d[upper_in, 1] = -0.006 * centre_weight[upper_in]
    d[idx(MOUTH_CORNERS), 0] = -0.02 * np.sign(u[idx(MOUTH_CORNERS)])
    out["jaw_open"] = frame.to_px(d, dz)
    return out


def jaw_weights(lm: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """How much each landmark follows the mandible (478,): lower lip and chin fully, the corners
    half, cheeks beside the mouth partly, everything above the mouth not at all."""
    uv = frame.local(lm)
    u, v = uv[:, 0], uv[:, 1]
    w = _smoothstep((v + 0.02) / 0.12)  # ramps in from just above the mouth line to below it
    w[list(LIPS_UPPER_OUTER + LIPS_UPPER_INNER)] = 0.0
    w[list(LIPS_LOWER_OUTER[1:-1] + LIPS_LOWER_INNER[1:-1])] = 1.0
    w[list(MOUTH_CORNERS)] = 0.5
    w[list(IRIS)] = 0.0
    return w


def hair_ring(person: np.ndarray, lm: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """Points on the head's silhouette (hair or skull), found along rays from inside the head.
    (N_RING, 2) px. Where the mask runs to the frame's edge the ray's end is used."""
    size = person.shape[0]
    ear_mid = (lm[234, :2] + lm[454, :2]) / 2
    centre = ear_mid - 0.1 * frame.fw * frame.ey
    angles = np.linspace(np.deg2rad(-20), np.deg2rad(200), N_RING)
    pts = []
    for t in angles:
        direction = np.cos(t) * frame.ex - np.sin(t) * frame.ey
        radii = np.arange(0.3, 1.4, 0.005) * frame.fw
        xy = centre + radii[:, None] * direction
        inside = (xy >= 0).all(1) & (xy <= size - 1).all(1)
        xi = np.clip(np.round(xy).astype(int), 0, size - 1)
        m = person[xi[:, 1], xi[:, 0]] * inside
        out = np.nonzero(m < 0.5)[0]
        k = out[0] if len(out) else int(inside.sum()) - 1
        pts.append(xy[max(k - 1, 0)])
    return np.array(pts)


def tps_operator(ctrl: np.ndarray, targets: np.ndarray, scale: float) -> np.ndarray:
    """Thin-plate-spline interpolation as a linear operator: (G, K) mapping the K control points'
    displacements to the G targets'. float64, coordinates normalised by `scale`."""
    c = ctrl / scale
    t = targets / scale

    def kernel(p, q):
        r2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        return 0.5 * r2 * np.log(np.maximum(r2, 1e-300))

    k = len(c)
    system = np.zeros((k + 3, k + 3))
    system[:k, :k] = kernel(c, c) + TPS_REGULARISATION * np.eye(k)
    system[:k, k] = 1.0
    system[:k, k + 1:] = c
    system[k, :k] = 1.0
    system[k + 1:, :k] = c.T
    rows = np.concatenate([kernel(t, c), np.ones((len(t), 1)), t], axis=1)
    inv = np.linalg.solve(system.T, rows.T).T  # rows @ system^-1
    return inv[:, :k]


def _head_weight(shape, ring: np.ndarray, lm: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """1 on the head (inside the silhouette ring and the jaw), fading to 0 a third of a face
    width outside, so the warp leaves the shoulders and the room alone."""
    import cv2

    jaw = lm[list(JAWLINE), :2]
    poly = np.concatenate([ring, jaw[::-1]])
    head = np.zeros(shape, np.uint8)
    cv2.fillPoly(head, [np.round(poly).astype(np.int32)], 1)
    dist = cv2.distanceTransform(1 - head, cv2.DIST_L2, 5)
    return 1.0 - _smoothstep(dist / (0.35 * frame.fw))


def build_rig(portrait) -> Rig:
    """Portrait (avatar/portrait.py) -> Rig. Deterministic; takes well under a second."""
    from engines import face_decoder as fd
    from avatar.motion import INDEX, N_CHANNELS

    img = np.ascontiguousarray(portrait.image)
    size = img.shape[0]
    lm = portrait.landmarks.astype(np.float64)
    frame = face_frame(lm)
    fw = frame.fw
    person = portrait.person_mask.astype(np.float32)

    # -- the head window: a fixed-size square over the head, kept inside the frame
    ring = hair_ring(person, lm, frame)
    chin = lm[152, :2]
    top = min(ring[:, 1].min(), lm[:, 1].min())
    bottom = chin[1] + 0.45 * fw
    cx = (lm[234, 0] + lm[454, 0]) / 2
    cy = (top + bottom) / 2
    x0 = int(np.clip(round(cx - fd.WIN / 2), 0, size - fd.WIN))
    y0 = int(np.clip(round(cy - fd.WIN / 2), 0, size - fd.WIN))

    # -- control points: face landmarks (merged when too close), hair ring, fixed anchors
    face_ids = [i for i in range(468) if i not in UPPER_OVAL]
    priority = list(dict.fromkeys(LIPS_UPPER_INNER + LIPS_LOWER_INNER + LIPS_UPPER_OUTER + LIPS_LOWER_OUTER
                                  + EYE_RIGHT_UPPER + EYE_RIGHT_LOWER + EYE_LEFT_UPPER + EYE_LEFT_LOWER
                                  + BROW_RIGHT + BROW_LEFT + JAWLINE + NOSE))
    order = priority + [i for i in face_ids if i not in priority]
    ear_mid = (lm[234] + lm[454]) / 2
    ring_z = ear_mid[2] + RING_DEPTH_FW * fw
    fixed = []
    for t in np.linspace(0, 1, 9)[:-1]:
        for p in ((t, 0), (1, t), (1 - t, 1), (0, 1 - t)):
            fixed.append((x0 + p[0] * (fd.WIN - 1), y0 + p[1] * (fd.WIN - 1)))
    centre = ear_mid[:2] - 0.1 * fw * frame.ey
    for p in ring:  # a second ring in the room, still
        out = centre + (p - centre) * (1 + 0.45 * fw / max(np.linalg.norm(p - centre), 1.0))
        fixed.append(tuple(out))
    for x in np.linspace(x0 + 24, x0 + fd.WIN - 24, 8):  # across the neck, still
        fixed.append((x, chin[1] + 0.5 * fw))
    fixed = np.array(fixed)
    fixed = fixed[(fixed[:, 0] >= x0 - 1) & (fixed[:, 0] <= x0 + fd.WIN) & (fixed[:, 1] >= y0 - 1)
                  & (fixed[:, 1] <= y0 + fd.WIN)]

    n_fixed, n_ring = len(fixed), len(ring)
    budget = fd.N_CTRL - n_fixed - n_ring
    min_gap = CTRL_MIN_GAP_FW * fw
    # every landmark row we keep, and whether it enters the TPS (coincident points do not)
    chosen: list[int] = []
    in_tps: list[bool] = []
    for i in order:
        if len(chosen) >= budget:
            break
        gap = np.min(np.linalg.norm(lm[chosen, :2] - lm[i, :2], axis=1)) if chosen else np.inf
        is_lip = i in LIPS_LOWER_INNER or i in LIPS_UPPER_INNER
        if gap < 3 * min_gap and not is_lip and i not in priority:
            continue  # fill-in points keep a wider spacing
        if gap < min_gap and not is_lip:
            continue
        chosen.append(i)
        in_tps.append(gap >= min_gap)
    k_face = len(chosen)
    xyz = np.zeros((fd.N_CTRL, 3))
    xyz[:k_face] = lm[chosen]
    xyz[k_face:k_face + n_ring, :2] = ring
    xyz[k_face:k_face + n_ring, 2] = ring_z
    xyz[k_face + n_ring:k_face + n_ring + n_fixed, :2] = fixed
    n_used = k_face + n_ring + n_fixed
    tps_mask = np.zeros(fd.N_CTRL, bool)
    tps_mask[:k_face] = in_tps
    tps_mask[k_face:n_used] = True
    # a head-following flag: ring moves with the head, fixed anchors never move
    follows = np.zeros(fd.N_CTRL, bool)
    follows[:k_face + n_ring] = True

    # -- per-channel displacement patterns at the control points
    basis = np.zeros((N_CHANNELS, fd.N_CTRL, 3))
    for name, disp in expression_basis(lm, frame).items():
        basis[INDEX[name], :k_face] = disp[chosen]
    jaw = np.zeros(fd.N_CTRL)
    jaw[:k_face] = jaw_weights(lm, frame)[chosen]

    # -- field routes: upper field, the lower lip follows its upper partner; lower field, the
    # reverse; main field, both inner lips take their average (no fold where the lips part)
    pos = {lid: k for k, lid in enumerate(chosen)}
    ident = np.arange(fd.N_CTRL)
    routes = np.stack([np.stack([ident, ident]) for _ in range(fd.N_FIELDS)])
    pairs = list(zip(LIPS_UPPER_INNER[1:-1], LIPS_LOWER_INNER[1:-1])) + \
        list(zip(LIPS_UPPER_OUTER[1:-1], LIPS_LOWER_OUTER[1:-1]))
    for up, low in pairs:
        if up in pos and low in pos:
            ku, kl = pos[up], pos[low]
            routes[1, :, kl] = ku  # upper field
            routes[2, :, ku] = kl  # lower field
            if (up, low) in pairs[:9]:
                routes[0, 0, ku], routes[0, 1, ku] = ku, kl
                routes[0, 0, kl], routes[0, 1, kl] = ku, kl

    # -- pivots
    pivot = ear_mid + np.r_[0.0, PIVOT_FW[1] * fw, PIVOT_FW[2] * fw]
    hinge = ear_mid + np.r_[0.0, HINGE_FW[0] * fw, HINGE_FW[1] * fw]

    # -- main window operator: TPS from the used control points to the coarse grid, faded by the
    # head weight so nothing outside the head moves
    k = (np.arange(fd.GRID) * fd.STEP + (fd.STEP - 1) / 2)
    gy, gx = np.meshgrid(k + y0, k + x0, indexing="ij")
    nodes = np.stack([gx.ravel(), gy.ravel()], 1)
    op = np.zeros((len(nodes), fd.N_CTRL))
    cols = np.nonzero(tps_mask)[0]
    centre_px = lm[:, :2].mean(0)
    op[:, cols] = tps_operator(xyz[cols, :2] - centre_px, nodes - centre_px, fw)
    head_w = _head_weight(person.shape, ring, lm, frame)
    op *= head_w[np.clip(np.round(gy).astype(int), 0, size - 1), np.clip(np.round(gx).astype(int), 0, size - 1)].ravel()[:, None]
    # fixed anchors shape the spline but never move: dropping their columns pins them at zero
    op[:, ~follows] = 0.0

    # -- images
    photo = torch.from_numpy(img)
    rgbm = np.concatenate([img.astype(np.float32), person[..., None]], axis=2)
    bg = portrait.background[y0:y0 + fd.WIN, x0:x0 + fd.WIN].astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size]
    inside = (ys >= y0) & (ys < y0 + fd.WIN) & (xs >= x0) & (xs < x0 + fd.WIN)
    source = (ys * size + xs).astype(np.int64)
    source[inside] = size * size + ((ys - y0) * fd.WIN + (xs - x0))[inside]
    wy, wx = np.mgrid[0:fd.WIN, 0:fd.WIN].astype(np.float64)
    grid = np.stack([(2 * (wx + x0) + 1) / size - 1, (2 * (wy + y0) + 1) / size - 1], axis=-1)

    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    engine = {
        "photo_rgbm": f32(rgbm.transpose(2, 0, 1)[None]),
        "photo_u8": photo.reshape(-1, 3).clone(),
        "window_background": f32(bg.transpose(2, 0, 1)[None]),
        "frame_source": torch.from_numpy(source.ravel()),
        "window_grid": f32(grid[None]),
        "ctrl_xyz": f32(xyz),
        "ctrl_basis": f32(basis),
        "ctrl_jaw": f32(jaw),
        "field_routes": torch.from_numpy(routes.astype(np.int64)),
        "jaw_hinge": f32(hinge),
        "head_pivot": f32(pivot),
        "face_width": f32([fw]),
        "main_operator": f32(op),
    }
    rig = Rig(image=photo.clone(), landmarks=f32(portrait.landmarks), engine=engine)
    rig.check()
    return rig
