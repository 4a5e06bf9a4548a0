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

RIG_VERSION = 6

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
    from avatar.settings import cache_dir

    return cache_dir("rigs")


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
RING_DEPTH_FW = 0.0  # silhouette depth behind the ear landmarks, face widths
PIVOT_FW = (0.0, 0.3, 0.3)  # neck pivot from the ear midpoint: down, back (face widths)
HINGE_FW = (0.05, 0.4)  # jaw hinge from the ear midpoint: down, back (face widths)
DEEP_POINT_FW = 0.25  # mesh points this far behind the mouth are left out of the warp (they fold)
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
    d[:, 0] += -0.035 * np.clip(u / a, -1.3, 1.3) * mouth_zone  # the mouth narrows as it opens
    out["jaw_open"] = frame.to_px(d, dz)
    return out


def jaw_weights(lm: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """How much each landmark follows the mandible (478,): lower lip and chin fully, the corners
    half, cheeks beside the mouth partly, everything above the mouth not at all."""
    uv = frame.local(lm)
    u, v = uv[:, 0], uv[:, 1]
    w = _smoothstep((v + 0.02) / 0.12)  # ramps in from just above the mouth line to below it
    # the upper lip stays with the skull in the middle and is drawn down toward the corners
    upper_lip = list(LIPS_UPPER_OUTER + LIPS_UPPER_INNER)
    a = abs(uv[291, 0] - uv[61, 0]) / 2
    w[upper_lip] = 0.5 * _smoothstep((np.abs(u[upper_lip]) / a - 0.3) / 0.7)
    # along the lower lip from half at the corners to all of it in the middle, so the opening
    # tapers into the corners instead of tearing there
    lower_lip = list(LIPS_LOWER_OUTER[1:-1] + LIPS_LOWER_INNER[1:-1])
    w[lower_lip] = 0.5 + 0.5 * np.clip(1.0 - (u[lower_lip] / a) ** 2, 0.0, 1.0) ** 0.5
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


def _still_region(person: np.ndarray, lm: np.ndarray, frame: FaceFrame, x0: int, y0: int, win: int) -> np.ndarray:
    """Where the person must not move (bool, frame-sized): the body below the neck, and the
    person where it crosses the head window's border (outside the window the photo is shown as is)."""
    size = person.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    chin = lm[152, :2]
    below_neck = (ys - chin[1]) * frame.ey[1] + (xs - chin[0]) * frame.ey[0] > 0.3 * frame.fw
    jaw_x = lm[list(JAWLINE), 0]
    beside_neck = (xs < jaw_x.min() - 0.1 * frame.fw) | (xs > jaw_x.max() + 0.1 * frame.fw)
    below_chin = ys > chin[1]  # above it, beside the face, is hair that turns with the head
    body = (person > 0.5) & (below_neck | (beside_neck & below_chin))
    band = 6
    inside = (ys >= y0 + band) & (ys < y0 + win - band) & (xs >= x0 + band) & (xs < x0 + win - band)
    return body | (~inside & (person > 0.05))


def _motion_weight(still: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """0 on the still region, 1 a third of a face width away from it, smooth in between."""
    import cv2

    dist = cv2.distanceTransform((~still).astype(np.uint8), cv2.DIST_L2, 5)
    return _smoothstep(dist / (0.35 * frame.fw))


IRIS_EDGE_PX = 2.0  # the iris layer reaches this far past the fitted iris radius (over the limbus)
TEETH_EDGES_FW = (0.0, 0.06, 0.105, 0.14, 0.17, 0.2, 0.23)  # tooth boundaries from the midline, frontal
UPPER_TOOTH_SHOW_FW = 0.025  # upper incisors hang this far below the upper lip's inner line
LOWER_TOOTH_SHOW_FW = 0.008  # lower incisors reach this far above the lower lip's inner line
LUMA = np.array([0.299, 0.587, 0.114])


def _polyline_distance(p: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of points (N, 2) to a polyline (M, 2), vectorised over segments."""
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.clip(((p[:, None, :] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    closest = a + t[..., None] * ab
    return np.sqrt(((p[:, None, :] - closest) ** 2).sum(-1)).min(1)


def _lip_line(uv: np.ndarray, ids, reach: float) -> np.ndarray:
    """An inner lip line in face coordinates, extended straight beyond the corners by `reach`."""
    pts = uv[list(ids)]
    pts = pts[np.argsort(pts[:, 0])]
    return np.concatenate([pts[:1] - [reach, 0.0], pts, pts[-1:] + [reach, 0.0]])


CAVITY_CHROMA = 0.75  # most (max - min) / max of the cavity colour; the test photos measured 0.38-0.74 and 0.95


def mouth_layers(img: np.ndarray, lm: np.ndarray, frame: FaceFrame, origin: tuple[int, int],
                 width: int, height: int) -> dict[str, np.ndarray]:
    """The mouth's layers on a source crop (height, width) at `origin` (frame px).

    Returns lip_upper / lip_lower (H, W, 4): the mouth-inpainted photo + signed distance (px, + on
    that lip's side) to the inner lip line; teeth_upper (H, W, 5) and teeth_lower (H, W, 4):
    premultiplied RGBA (+ the cavity's shading factor for the upper); cavity (3,) RGB.
    """
    import cv2

    fw = frame.fw
    ys, xs = np.mgrid[origin[1]:origin[1] + height, origin[0]:origin[0] + width]
    p = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    uv = frame.local(p)
    luv = frame.local(lm)
    upper = _lip_line(luv, LIPS_UPPER_INNER, 0.5)
    lower = _lip_line(luv, LIPS_LOWER_INNER, 0.5)
    v_up = np.interp(uv[:, 0], upper[:, 0], upper[:, 1])
    v_low = np.interp(uv[:, 0], lower[:, 0], lower[:, 1])
    sd_up = _polyline_distance(uv, upper) * np.where(uv[:, 1] < v_up, 1.0, -1.0) * fw
    sd_low = _polyline_distance(uv, lower) * np.where(uv[:, 1] > v_low, 1.0, -1.0) * fw
    shape = (height, width)
    sd_up, sd_low = sd_up.reshape(shape), sd_low.reshape(shape)
    u = uv[:, 0].reshape(shape)
    crop = img[origin[1]:origin[1] + height, origin[0]:origin[0] + width].astype(np.float64)
    interior = (sd_up < 0) & (sd_low < 0)
    depth_up, depth_low = np.maximum(-sd_up, 0), np.maximum(-sd_low, 0)
    t = depth_up / np.maximum(depth_up + depth_low, 1e-6)  # 0 at the upper lip, 1 at the lower

    # the photo with the inside of the mouth filled by the lips' own colour, stretched across from
    # a few pixels inside each lip, so a moving lip never drags the teeth along
    a_corner = np.abs(luv[[78, 308], 0]).max()
    on_up = np.stack([u.ravel(), np.interp(u.ravel(), upper[:, 0], upper[:, 1]) - 3.0 / fw], 1)
    on_low = np.stack([u.ravel(), np.interp(u.ravel(), lower[:, 0], lower[:, 1]) + 3.0 / fw], 1)

    def to_crop(q):
        px = frame.origin + q[:, :1] * frame.ex * fw + q[:, 1:2] * frame.ey * fw
        return (px - origin).astype(np.float32).reshape(height, width, 2)

    src = crop.astype(np.float32)
    col_up = cv2.remap(src, to_crop(on_up), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    col_low = cv2.remap(src, to_crop(on_low), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    fill = col_up * (1 - t[..., None]) + col_low * t[..., None]
    inpainted = np.where(interior[..., None], fill, crop)

    # colours: the cavity from the photo's darkest mouth pixels, the teeth from its brightest
    lum = crop @ LUMA
    inside_px = crop[interior]
    lip_colour = np.median(crop[(sd_up > 1) & (sd_up < 0.03 * fw) & (np.abs(u) < a_corner * 0.6)], axis=0)
    skin_lum = float(np.median(lum[(sd_up > 0.05 * fw) & (sd_up < 0.12 * fw) & (np.abs(u) < a_corner)]))
    default_teeth = np.array([240.0, 232.0, 214.0]) * np.clip(skin_lum / 160.0, 0.85, 1.05)
    if len(inside_px) >= 30:
        order = np.argsort(lum[interior])
        cavity = np.median(inside_px[order[:max(len(order) // 7, 5)]], axis=0)
        bright = inside_px[order[-max(len(order) // 3, 5):]]
        teeth_colour = np.median(bright, axis=0)
    else:  # a closed mouth: a dark, lip-tinted inside
        cavity = lip_colour * 0.35
        teeth_colour = default_teeth
    # dark, but not a black hole: a mouth's inside keeps some of the lips' warmth
    cavity_lum = max(float(cavity @ LUMA), 1e-3)
    cavity = cavity * float(np.clip(cavity_lum, 32.0, 55.0)) / cavity_lum
    # nor a painted one: a shadowed tongue can read as pure red ([95, 5, 5] on a photo taken
    # mid-word); keep at most CAVITY_CHROMA of the colour around its luminance
    grey = float(cavity @ LUMA)
    chroma = (cavity.max() - cavity.min()) / max(cavity.max(), 1e-3)
    if chroma > CAVITY_CHROMA:  # toward the grey, to exactly that chroma
        high, low = cavity.max(), cavity.min()
        keep = CAVITY_CHROMA * grey / (high - low - CAVITY_CHROMA * (high - grey))
        cavity = grey + (cavity - grey) * keep
    if teeth_colour @ LUMA < 120:  # dark "teeth" were a shadow: use the default
        teeth_colour = default_teeth

    au = np.abs(u)
    # the photo's visible upper teeth: bright pixels inside the mouth. Per column, everything down
    # to their biting edge rides the skull; what lies below it (lower teeth, the gap, the lower
    # lip's inner edge) rides the jaw
    lum_cav, lum_teeth = cavity @ LUMA, teeth_colour @ LUMA
    chroma = (crop.max(-1) - crop.min(-1)) / np.maximum(crop.max(-1), 1.0)
    is_teeth = interior & (lum > 0.5 * (lum_cav + lum_teeth)) & (chroma < 0.22)  # whitish, not lip pink
    # per column, the cut between what rides the skull and what rides the jaw: at the darkest point
    # of the opening (the gap between the rows of teeth, or the cavity under the upper teeth), and
    # never above the biting edge of upper teeth that show from the top (the first run of teeth
    # starting in the upper half). A column with no opening rides the skull whole. Per column
    # detection alone mixed rules from column to column on a photo taken mid-word (upper teeth in
    # shadow, lower teeth bright): a dark wedge or hanging bits of teeth as the jaw opened.
    lum_v = cv2.GaussianBlur(lum.astype(np.float32), (0, 0), sigmaX=0.1, sigmaY=1.5)
    t_split = np.ones(width)
    for x in range(width):
        rows = np.nonzero(interior[:, x] & (t[:, x] >= 0.15) & (t[:, x] <= 0.9))[0]
        if len(rows) < 2:
            continue
        t_split[x] = t[rows[np.argmin(lum_v[rows, x])], x]
        col = is_teeth[:, x]
        teeth_rows = np.nonzero(col)[0]
        if len(teeth_rows) >= 2 and t[teeth_rows[0], x] < 0.5:
            end = teeth_rows[0]
            while end + 1 < height and (col[end + 1] or (end + 2 < height and col[end + 2])):
                end += 1
            gap_here = max(depth_up[end, x] + depth_low[end, x], 1.0)
            t_split[x] = max(t_split[x], t[end, x] + 0.5 / gap_here)
    # a column's edge never sits above its neighbours' (a stray dark pixel must not cut a tooth),
    # and the edge runs smoothly from column to column (no stair steps when the jaw drops)
    t_split = np.max(np.stack([np.roll(np.pad(t_split, 2, mode="edge"), k)[2:-2] for k in range(-2, 3)]), 0)
    t_split = np.convolve(np.pad(t_split, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    t_split = np.clip(t_split, 0.3, 1.0)
    gap_px = depth_up + depth_low

    # synthetic teeth for what the photo does not show: stripes per tooth, darker as they recede;
    # the upper ones continue the photo's own teeth upward where it shows any
    edges = np.array(TEETH_EDGES_FW)
    k = np.clip(np.searchsorted(edges, au) - 1, 0, len(edges) - 2)
    tooth_w = edges[k + 1] - edges[k]
    pos = (au - edges[k]) / tooth_w  # 0..1 across a tooth
    gap_line = np.exp(-((np.minimum(pos, 1 - pos) * tooth_w * fw) ** 2) / (2 * 0.6 ** 2))
    recede = np.clip(1.0 - (au / (a_corner * 1.05)) ** 2, 0.0, 1.0)
    rounding = 0.15 * (2 * pos - 1) ** 2 * tooth_w * fw  # each biting edge slightly rounded

    def teeth(sd, show_px, root_px, arch):
        tip = show_px * (0.6 + 0.4 * recede) - rounding
        body = _smoothstep((sd + tip) / 1.0) * _smoothstep((root_px - sd) / 2.0)
        body = body * _smoothstep((arch - au) / 0.02)
        shade = (0.5 + 0.5 * recede ** 0.7) * (1.0 - 0.08 * gap_line)
        return body, shade

    up_body, up_shade = teeth(sd_up, UPPER_TOOTH_SHOW_FW * fw, 0.08 * fw, a_corner * 1.05)
    # the cut stays 2 px below the synthetic upper teeth: where the photo fades out under it, the
    # lower layer's photo shows through exactly, so the resting mouth is the photo's to the bit
    for x in np.nonzero((up_body > 0).any(0))[0]:
        rows = np.nonzero(interior[:, x] & (up_body[:, x] > 0))[0]
        if len(rows):
            last = rows[-1]
            t_split[x] = max(t_split[x], t[last, x] + 2.0 / max(gap_px[last, x], 1.0))
    below = (t - t_split[None, :]) * gap_px  # px below the split line
    photo_up = interior * _smoothstep(1.0 - below)  # 1 down to the split, fading over 1 px below it
    photo_low = interior * _smoothstep(below + 1.0)  # opaque from the split line down (exactness)
    up_rgb = teeth_colour * up_shade[..., None]
    # where the photo shows teeth right under the lip, continue that column of teeth upward
    probe = np.stack([u.ravel(), np.interp(u.ravel(), upper[:, 0], upper[:, 1]) + 4.0 / fw], 1)
    column = cv2.remap(src, to_crop(probe), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    column_is_teeth = cv2.remap(is_teeth.astype(np.float32), to_crop(probe), None, cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT)
    column_is_teeth = cv2.GaussianBlur(column_is_teeth, (0, 0), 1.5)[..., None]
    up_rgb = column * column_is_teeth + up_rgb * (1 - column_is_teeth)
    up_rgb *= (1.0 - 0.15 * _smoothstep(sd_up / (0.06 * fw)))[..., None]  # toward the gums
    gum = _smoothstep((sd_up - 0.055 * fw) / (0.01 * fw))[..., None]
    up_rgb = up_rgb * (1 - gum) + lip_colour * 0.85 * gum
    low_body, low_shade = teeth(sd_low, LOWER_TOOTH_SHOW_FW * fw, 0.06 * fw, a_corner * 0.75)
    low_rgb = teeth_colour * (0.78 * low_shade)[..., None]  # in the upper teeth's shadow

    # tongue: a soft mound behind the lower teeth, lip-coloured, darker toward the throat
    tv = (sd_low - 0.01 * fw) / (0.06 * fw)
    tongue = _smoothstep((1.0 - np.sqrt((u / (0.75 * a_corner)) ** 2 + tv ** 2)) / 0.3)
    tongue_rgb = lip_colour * (0.5 + 0.3 * _smoothstep(tv + 0.5))[..., None]

    def over(fg_rgb, fg_a, bg_rgb, bg_a):
        """Straight-alpha foreground over a premultiplied background -> premultiplied."""
        return fg_rgb * fg_a[..., None] + bg_rgb * (1 - fg_a[..., None]), fg_a + bg_a * (1 - fg_a)

    tu_rgb, tu_a = over(crop, photo_up, up_rgb * up_body[..., None], up_body)
    tl_rgb, tl_a = over(low_rgb, low_body, tongue_rgb * tongue[..., None], tongue)
    tl_rgb, tl_a = over(crop, photo_low, tl_rgb, tl_a)
    # the cavity: darkest high up under the upper teeth and deep in the middle
    cav_shade = 0.85 + 0.15 * _smoothstep((au / a_corner - 0.4) / 0.6) - 0.2 * _smoothstep(-sd_up / (0.06 * fw))
    return {
        "lip_upper": np.dstack([inpainted, sd_up]),
        "lip_lower": np.dstack([inpainted, sd_low]),
        "teeth_upper": np.dstack([tu_rgb, tu_a, cav_shade]),
        "teeth_lower": np.dstack([tl_rgb, tl_a]),
        "cavity": cavity,
        "mouth_half_width": a_corner,
    }


EYES = (  # per eye: outer->inner corner order is per side; irises: centre then four edge points
    {"upper": EYE_RIGHT_UPPER, "lower": EYE_RIGHT_LOWER, "iris": (468, 469, 470, 471, 472)},
    {"upper": EYE_LEFT_UPPER, "lower": EYE_LEFT_LOWER, "iris": (473, 474, 475, 476, 477)},
)


def refine_iris(lum: np.ndarray, centre: np.ndarray, radius: float, opening: np.ndarray) -> tuple[np.ndarray, float]:
    """The iris circle fitted to the photo: the dark disc's left and right edges row by row
    (the lids hide its top and bottom), a least-squares circle through them. Falls back to
    the face mesh's estimate when the fit is implausible. lum, opening: frame-sized."""
    import cv2

    dark = cv2.erode(lum.astype(np.float32), np.ones((3, 3), np.uint8))  # catchlights shrink away
    dark = cv2.GaussianBlur(dark, (0, 0), 0.7)
    r0 = int(np.ceil(radius * 1.6))
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    box = (slice(max(cy - r0, 0), cy + r0 + 1), slice(max(cx - 2 * r0, 0), cx + 2 * r0 + 1))
    inside = opening[box]
    if inside.sum() < 20:
        return centre, radius
    vals = dark[box][inside]
    sclera, iris = np.percentile(vals, 90), np.percentile(vals, 10)
    if sclera - iris < 25:
        return centre, radius
    thr = (sclera + iris) / 2
    pts = []
    for y in range(cy - int(0.7 * radius), cy + int(0.7 * radius) + 1):
        if not (0 <= y < lum.shape[0]) or not opening[y, cx]:
            continue
        row, ok = dark[y], opening[y]
        for step in (-1, 1):
            x = cx
            while ok[x] and row[x] < thr and abs(x - cx) < 2 * radius:
                x += step
            if not ok[x] or abs(x - cx) >= 2 * radius:
                continue  # ran into a lid corner: not the iris's own edge
            a, b = row[x - step], row[x]
            pts.append((x - step + step * (thr - a) / max(b - a, 1e-6), y))
    if len(pts) < 6:
        return centre, radius
    p = np.array(pts, np.float64)
    a = np.c_[2 * p, np.ones(len(p))]
    sol = np.linalg.lstsq(a, (p ** 2).sum(1), rcond=None)[0]
    c = sol[:2]
    r = float(np.sqrt(max(sol[2] + c @ c, 0.0)))
    if not (0.6 * radius < r < 1.4 * radius) or np.linalg.norm(c - centre) > 0.6 * radius:
        return centre, radius
    return c, r


def eye_geometry(lm: np.ndarray, fw: float, irises) -> tuple[np.ndarray, np.ndarray]:
    """Per eye [subject's right, subject's left]: frame (10,) = centre x, y, axis x, y, half-width,
    crease above, crease below, iris radius, lid margin bands above and below; lids (2, 5) = upper and lower margins as quartics in
    sigma = u / half-width (v in px, down the eye's normal)."""
    frames, lids = [], []
    for eye in EYES:
        c0, c1 = lm[eye["upper"][0], :2], lm[eye["upper"][-1], :2]
        left, right = (c0, c1) if c0[0] < c1[0] else (c1, c0)
        centre = (left + right) / 2
        axis = (right - left) / np.linalg.norm(right - left)
        normal = np.array([-axis[1], axis[0]])
        half = np.linalg.norm(right - left) / 2

        def local(ids):
            q = lm[list(ids), :2] - centre
            return q @ axis / half, q @ normal

        fits = []
        for ids in (eye["upper"], eye["lower"]):
            sig, v = local(ids)
            a = np.stack([sig ** k for k in range(5)], 1)
            w = np.ones(len(sig))
            w[[0, -1]] = 4.0  # the corners pin the curve's ends
            fits.append(np.linalg.lstsq(a * w[:, None], v * w, rcond=None)[0])
        grid = np.linspace(-1, 1, 41)
        powers = np.stack([grid ** k for k in range(5)], 1)
        up, low = powers @ fits[0], powers @ fits[1]
        if (low < up).any():  # a closed or squinting eye: the lower margin never above the upper
            fits[1] = np.linalg.lstsq(powers, np.maximum(low, up), rcond=None)[0]
        height = float(np.max(powers @ fits[1] - powers @ fits[0]))
        iris_c, radius = irises[len(frames)]
        band_up = float(np.clip(0.12 * height, 1.0, 3.0))
        band_low = float(np.clip(0.06 * height, 0.5, 1.5))
        frames.append([*centre, *axis, half, max(1.1 * height, 0.04 * fw), max(0.8 * height, 0.03 * fw), radius,
                       band_up, band_low])
        lids.append(fits)
    return np.array(frames), np.array(lids)


def eye_layers(img: np.ndarray, iris_centres: np.ndarray, frames: np.ndarray, lids: np.ndarray,
               origin: tuple[int, int], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The eyeballs (sclera where the irises are, the sclera continued past the lids) and the
    irises as full discs (their hidden parts from their own radial profile), on a source crop.
    Both equal the photo inside the visible openings, so neutral motion shows the photo exactly."""
    import cv2

    ys, xs = np.mgrid[origin[1]:origin[1] + height, origin[0]:origin[0] + width].astype(np.float64)
    crop = img[origin[1]:origin[1] + height, origin[0]:origin[0] + width].astype(np.float32)
    ball = crop.copy()
    iris_rgba = np.zeros((height, width, 4), np.float32)
    iris_rgba[..., 3] = -100.0  # signed distance: far outside every iris
    nearest = np.argmin(np.stack([np.hypot(xs - f[0], ys - f[1]) for f in frames]), axis=0)
    for e, (f, fit) in enumerate(zip(frames, lids)):
        centre, axis, half, radius = f[0:2], f[2:4], f[4], f[7]
        normal = np.array([-axis[1], axis[0]])
        u = (xs - centre[0]) * axis[0] + (ys - centre[1]) * axis[1]
        v = (xs - centre[0]) * normal[0] + (ys - centre[1]) * normal[1]
        sig = np.clip(u / half, -1, 1)
        powers = np.stack([sig ** k for k in range(5)], -1)
        up, low = powers @ fit[0], powers @ fit[1]
        band_up, band_low = f[8], f[9]
        clean_up, clean_low = up + band_up, low - band_low  # the eyeball free of lid shadow
        opening = (v > clean_up) & (v < clean_low) & (np.abs(u) < half)
        visible = (v > clean_up + 1) & (v < clean_low - 1) & (np.abs(u) < half)
        ic = iris_centres[e]
        d = np.hypot(xs - ic[0], ys - ic[1])
        mine = nearest == e

        # iris disc: visible pixels as they are, hidden ones from the mean colour at their radius
        bins = np.clip((d / 0.5).astype(int), 0, 400)
        profile = np.zeros((401, 3), np.float32)
        known = np.zeros(401, bool)
        sel = visible & (d <= radius + 2)
        for b in np.unique(bins[sel]):
            profile[b] = crop[sel & (bins == b)].mean(0)
            known[b] = True
        if known.any():
            idx = np.arange(401)
            for ch in range(3):
                profile[:, ch] = np.interp(idx, idx[known], profile[known, ch])
        else:  # no iris visible at all (closed eye): a dark brown default
            profile[:] = (70, 50, 40)
        # the disc reaches IRIS_EDGE_PX past the fitted radius, over the dark limbus; its 4th
        # channel is the signed distance to that edge (the decoder softens it only once it moves)
        edge = radius + IRIS_EDGE_PX
        disc = mine & (d <= edge + 2.0)
        rgb = np.where(opening[..., None], crop, profile[bins])
        iris_rgba[disc] = np.concatenate([rgb, (edge - d)[..., None]], -1)[disc].astype(np.float32)

        # eyeball: the sclera inpainted over the iris's disc and past the clean opening (under the
        # lids and their shadow), from the visible sclera only, a little shaded beyond the lids
        top_y, bottom_y = up - f[5], low + f[6]
        region = mine & (np.abs(u) < half * 1.15) & (v > top_y - 2) & (v < bottom_y + 2)
        unknown = region & (~opening | (d <= edge))
        known_sclera = region & opening & (d > edge + 0.5)
        if known_sclera.sum() >= 8:
            lo = cv2.inpaint(np.clip(crop, 0, 255).astype(np.uint8), (unknown | ~region).astype(np.uint8), 4,
                             cv2.INPAINT_TELEA).astype(np.float32)
            shade = np.where(opening, 1.0, 0.9)[..., None]
            ball[unknown] = (lo * shade)[unknown]
        else:  # no sclera to speak of (a closed eye): a plain light sclera, shaded
            ball[unknown] = np.array([225.0, 215.0, 205.0]) * 0.85
    return ball, iris_rgba


def build_rig(portrait) -> Rig:
    """Portrait (avatar/portrait.py) -> Rig. Deterministic; takes well under a second."""
    import cv2

    from engines import face_decoder as fd
    from avatar.motion import INDEX, N_CHANNELS

    img = np.ascontiguousarray(portrait.image)
    size = img.shape[0]
    lm = portrait.landmarks.astype(np.float64)
    frame = face_frame(lm)
    fw = frame.fw
    person = portrait.person_mask.astype(np.float32)

    # -- the head window: a fixed-size square over the head (hair top first), inside the frame
    ring = hair_ring(person, lm, frame)
    top = min(ring[:, 1].min(), lm[:, 1].min()) - 0.2 * fw
    cx = (ring[:, 0].min() + ring[:, 0].max()) / 2
    x0 = int(np.clip(round(cx - fd.WIN / 2), 0, size - fd.WIN))
    y0 = int(np.clip(round(top), 0, size - fd.WIN))

    # -- control points: face landmarks (merged when too close), hair ring, fixed anchors
    face_ids = [i for i in range(468) if i not in UPPER_OVAL]
    priority = list(dict.fromkeys(LIPS_UPPER_INNER + LIPS_LOWER_INNER + LIPS_UPPER_OUTER + LIPS_LOWER_OUTER
                                  + EYE_RIGHT_UPPER + EYE_RIGHT_LOWER + EYE_LEFT_UPPER + EYE_LEFT_LOWER
                                  + BROW_RIGHT + BROW_LEFT + JAWLINE + NOSE))
    order = priority + [i for i in face_ids if i not in priority]
    ear_mid = (lm[234] + lm[454]) / 2
    ring_z = ear_mid[2] + RING_DEPTH_FW * fw
    still = _still_region(person, lm, frame, x0, y0, fd.WIN)
    # anchors on the still body hold the spline at zero there
    step = max(int(0.2 * fw), 8)
    gy, gx = np.mgrid[y0 + step // 2:y0 + fd.WIN:step, x0 + step // 2:x0 + fd.WIN:step]
    fixed = np.stack([gx.ravel(), gy.ravel()], 1)
    fixed = fixed[still[np.clip(gy.ravel(), 0, size - 1), np.clip(gx.ravel(), 0, size - 1)]]
    if len(fixed) > 40:
        fixed = fixed[np.linspace(0, len(fixed) - 1, 40).round().astype(int)]
    fixed = fixed.astype(np.float64)
    n_fixed, n_ring = len(fixed), len(ring)
    budget = fd.N_CTRL - fd.N_ANCHORS - n_fixed - n_ring
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
        if is_lip:
            # the two inner lip lines may coincide (a closed mouth) but never share a field (each
            # lip's field leaves the other lip out), so only other points count against them
            others = [c for c in chosen if c not in LIPS_UPPER_INNER and c not in LIPS_LOWER_INNER]
            gap = np.min(np.linalg.norm(lm[others, :2] - lm[i, :2], axis=1)) if others else np.inf
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
    # mesh points far back toward the silhouette (the jaw's and temples' outline) are overtaken by
    # the cheek in front of them when the head turns: leave them out, or the warp folds there
    deep = lm[chosen, 2] > (lm[13, 2] + lm[14, 2]) / 2 + DEEP_POINT_FW * fw
    tps_mask[:k_face] &= ~deep
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

    # -- which control points each field leaves out where the lips part: the main field both inner
    # lips, the upper lip's field the lower lip, the lower lip's field the upper lip
    def rows(ids):
        return [k for k, lid in enumerate(chosen) if lid in ids]

    inner = rows(LIPS_UPPER_INNER[1:-1] + LIPS_LOWER_INNER[1:-1])
    lower_lip = rows(LIPS_LOWER_INNER[1:-1] + LIPS_LOWER_OUTER[1:-1])
    upper_lip = rows(LIPS_UPPER_INNER[1:-1] + LIPS_UPPER_OUTER[1:-1])

    def operator(targets, leave_out):
        use = tps_mask.copy()
        use[leave_out] = False
        cols = np.nonzero(use)[0]
        op = np.zeros((len(targets), fd.N_CTRL))
        op[:, cols] = tps_operator(xyz[cols, :2] - centre_px, targets - centre_px, fw)
        # fixed anchors shape the spline but never move: dropping their columns pins them at zero
        op[:, ~follows] = 0.0
        return op

    # -- pivots
    pivot = ear_mid + np.r_[0.0, PIVOT_FW[1] * fw, PIVOT_FW[2] * fw]
    hinge = ear_mid + np.r_[0.0, HINGE_FW[0] * fw, HINGE_FW[1] * fw]

    # -- main window operator: TPS from the used control points to the coarse grid, faded by the
    # head weight so nothing outside the head moves
    k = (np.arange(fd.GRID) * fd.STEP + (fd.STEP - 1) / 2)
    gy, gx = np.meshgrid(k + y0, k + x0, indexing="ij")
    nodes = np.stack([gx.ravel(), gy.ravel()], 1)
    centre_px = lm[:, :2].mean(0)
    op = operator(nodes, inner)
    head_w = _motion_weight(still, frame)
    head_w[head_w < 1e-3] = 0.0  # no vanishing weights: subnormal floats are slow on CPUs
    op *= head_w[np.clip(np.round(gy).astype(int), 0, size - 1), np.clip(np.round(gx).astype(int), 0, size - 1)].ravel()[:, None]

    # -- anchors: mouth centre (places the mouth window), skull and mandible triangles (carry the
    # teeth rigidly), between the eyes
    mc = (lm[13] + lm[14]) / 2
    # the teeth ride big triangles on a frontal plane through the front teeth (a little behind the
    # lips): small or slanted triangles would turn head pitch into a squash of the teeth
    z_teeth = lm[13, 2] + 0.03 * fw
    left, right = np.r_[lm[78, :2], z_teeth], np.r_[lm[308, :2], z_teeth]
    above = np.r_[mc[:2] - 0.3 * fw * frame.ey, z_teeth]
    below = np.r_[mc[:2] + 0.3 * fw * frame.ey, z_teeth]
    eye_r = lm[[33, 133]].mean(0)
    eye_l = lm[[263, 362]].mean(0)
    anchor_xyz = np.stack([mc, left, right, above, left, right, below, eye_r, eye_l])
    anchor_jaw = np.array([0.5, 0, 0, 0, 1, 1, 1, 0, 0], dtype=np.float64)
    assert len(anchor_xyz) == fd.N_ANCHORS
    # anchors are the control set's last rows: moved like the rest, outside every operator
    xyz[fd.N_CTRL - fd.N_ANCHORS:] = anchor_xyz
    jaw[fd.N_CTRL - fd.N_ANCHORS:] = anchor_jaw

    # -- mouth: source crop, its TPS operator, layers, and where upper/lower may differ
    mx0 = int(round(mc[0] - fd.MOUTH_SRC_W / 2))
    my0 = int(round(mc[1] - fd.MOUTH_ANCHOR_AT[1] * fd.MOUTH_SRC_H))
    pad = max(0, -mx0, -my0, mx0 + fd.MOUTH_SRC_W - size, my0 + fd.MOUTH_SRC_H - size)
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else img
    ms = fd.MOUTH_SRC_STEP
    gy, gx = np.mgrid[0:fd.MOUTH_SRC_H // ms, 0:fd.MOUTH_SRC_W // ms] * ms + (ms - 1) / 2
    mnodes = np.stack([gx.ravel() + mx0, gy.ravel() + my0], 1)
    mouth_op = np.stack([operator(mnodes, lower_lip), operator(mnodes, upper_lip)])
    layers = mouth_layers(padded, lm + [pad, pad, 0], FaceFrame(frame.origin + pad, frame.ex, frame.ey, fw, frame.z0),
                          (mx0 + pad, my0 + pad), fd.MOUTH_SRC_W, fd.MOUTH_SRC_H)
    a = layers["mouth_half_width"]
    blend = 1.0 - _smoothstep((np.abs(frame.local(mnodes)[:, 0]) - a) / 0.06)

    # -- eyes: geometry and layers on a source crop around both
    lum = img.astype(np.float64) @ LUMA
    irises = []
    for e, eye in enumerate(EYES):
        ring = lm[list(eye["upper"]) + list(eye["lower"])[::-1], :2]
        opening = np.zeros(lum.shape, np.uint8)
        cv2.fillPoly(opening, [np.round(ring).astype(np.int32)], 1)
        iris = lm[list(eye["iris"]), :2]
        irises.append(refine_iris(lum, iris[0], float(np.mean(np.linalg.norm(iris[1:] - iris[0], axis=1))),
                                  opening.astype(bool)))
    eye_frame, eye_lids = eye_geometry(lm, fw, irises)
    ec = (eye_r[:2] + eye_l[:2]) / 2
    ex0 = int(round(ec[0] - fd.EYES_SRC_W / 2))
    ey0 = int(round(ec[1] - fd.EYES_SRC_H / 2))
    epad = max(0, -ex0, -ey0, ex0 + fd.EYES_SRC_W - size, ey0 + fd.EYES_SRC_H - size)
    epadded = np.pad(img, ((epad, epad), (epad, epad), (0, 0)), mode="edge") if epad else img
    shifted = eye_frame.copy()
    shifted[:, 0:2] += epad
    eye_ball, eye_iris = eye_layers(epadded, np.array([c for c, _ in irises]) + epad, shifted, eye_lids,
                                    (ex0 + epad, ey0 + epad), fd.EYES_SRC_W, fd.EYES_SRC_H)

    # -- images
    photo = torch.from_numpy(img)
    rgbm = np.concatenate([img.astype(np.float32), person[..., None]], axis=2)
    # at the window's border the background layer blends back into the photo, which is what the
    # frame shows just outside the window
    bg = portrait.background[y0:y0 + fd.WIN, x0:x0 + fd.WIN].astype(np.float32)
    wy, wx = np.mgrid[0:fd.WIN, 0:fd.WIN]
    edge = np.minimum(np.minimum(wy, fd.WIN - 1 - wy), np.minimum(wx, fd.WIN - 1 - wx))
    taper = _smoothstep(edge / 16.0)[..., None]
    bg = img[y0:y0 + fd.WIN, x0:x0 + fd.WIN] * (1 - taper) + bg * taper
    ys, xs = np.mgrid[0:size, 0:size]
    inside = (ys >= y0) & (ys < y0 + fd.WIN) & (xs >= x0) & (xs < x0 + fd.WIN)
    # the frame is gathered from cat(photo pixels outside the window, window pixels)
    source = np.zeros((size, size), np.int32)
    source[~inside] = np.arange(int((~inside).sum()))
    source[inside] = fd.N_PIX - fd.N_WIN + ((ys - y0) * fd.WIN + (xs - x0))[inside]
    outside = img[~inside]

    def f32(a) -> Tensor:
        a = np.array(a, dtype=np.float32)
        a[np.abs(a) < 1e-20] = 0.0  # no subnormal floats: they are slow on CPUs
        return torch.from_numpy(np.ascontiguousarray(a))

    engine = {
        "photo_rgbm": f32(rgbm.transpose(2, 0, 1)[None]),
        "photo_u8": torch.from_numpy(np.ascontiguousarray(outside)),
        "window_background": f32(bg.transpose(2, 0, 1)[None]),
        "frame_source": torch.from_numpy(source.ravel()),
        "ctrl_xyz": f32(xyz),
        "ctrl_basis": f32(basis),
        "ctrl_jaw": f32(jaw),
        "jaw_hinge": f32(hinge),
        "head_pivot": f32(pivot),
        "face_width": f32([fw]),
        "main_operator": f32(op),
        "window_origin": f32([x0, y0]),
        "mouth_operator": f32(mouth_op),
        "mouth_src_origin": f32([mx0, my0]),
        "mouth_layers": f32(np.stack([
            np.dstack([layers["lip_upper"], np.zeros(layers["lip_upper"].shape[:2])]),
            np.dstack([layers["lip_lower"], np.zeros(layers["lip_lower"].shape[:2])]),
            layers["teeth_upper"],
            np.dstack([layers["teeth_lower"], np.zeros(layers["teeth_lower"].shape[:2])]),
        ]).transpose(0, 3, 1, 2)),
        "mouth_blend": f32(blend.reshape(1, 1, fd.MOUTH_SRC_H // ms, fd.MOUTH_SRC_W // ms)),
        "cavity_rgb": f32(layers["cavity"]),
        "eye_frame": f32(eye_frame),
        "eye_lids": f32(eye_lids),
        "eye_src_origin": f32([ex0, ey0]),
        "eye_ball": f32(eye_ball.transpose(2, 0, 1)[None]),
        "eye_iris": f32(eye_iris.transpose(2, 0, 1)[None]),
    }
    rig = Rig(image=photo.clone(), landmarks=f32(portrait.landmarks), engine=engine)
    rig.check()
    return rig
