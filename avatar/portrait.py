"""Portrait analysis: a photo in, a framed 512x512 portrait with landmarks, masks and background out.

This is analysis-time code (mediapipe, OpenCV). The per-frame path never imports it: the rig
(`avatar/rig.py`) turns a `Portrait` into plain tensors once, and those are cached on disk.

Steps of `analyze_portrait`:
  1. load the photo (EXIF orientation, any mode, large photos reduced while decoding);
  2. find faces (mediapipe face detection, short- and full-range, then tiles for small faces);
  3. frame the chosen face head-and-shoulders in FRAME_SIZE x FRAME_SIZE (two passes: the first
     from the detection box, the second from the face mesh, whose size measure is steadier);
  4. face mesh on the framed image -> 478 landmarks; polygon masks from them;
  5. selfie segmentation -> person mask; the person removed and inpainted -> background.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatar.constants import FRAME_SIZE
from avatar.errors import AvatarError

DEFAULT_HEAD_DISTANCE = 1.0  # 1.0 = head-and-shoulders framing; < 1 closer, > 1 farther
HEAD_DISTANCE_RANGE = (0.5, 2.5)  # outside it the face is cropped or too small for the face mesh
MIN_FACE_PX = 64  # a face narrower than this in the source photo is refused
MAX_LOAD_SIDE = 4096  # photos are reduced to this longest side while loading (the frame is 512)
ALPHA_BACKGROUND = (200, 200, 200)  # transparent pixels are composited over a neutral light gray

# Framing at head_distance 1.0, in fractions of the frame side. The face width is the 3D distance
# between the face-oval extremes (landmarks 234 and 454, at the temples/ears), which barely changes
# with yaw; the eye line sits a bit above the middle so the hair has room and the shoulders show.
FACE_WIDTH_FRACTION = 0.40
EYE_LINE_FRACTION = 0.47

N_LANDMARKS = 478
log = logging.getLogger("avatar.portrait")

# Mediapipe face-mesh index rings, ordered around each contour. "Left" is the subject's left
# (the right side of a non-mirrored photo), as in mediapipe's FACEMESH_LEFT_* sets.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_IRIS = (473, 474, 475, 476, 477)  # centre first, then four points on the iris edge
RIGHT_IRIS = (468, 469, 470, 471, 472)
# inner-lip pairs facing each other across the mouth opening (upper, lower)
INNER_LIP_PAIRS = ((81, 178), (82, 87), (13, 14), (312, 317), (311, 402))
FACE_LEFT_EDGE, FACE_RIGHT_EDGE = 454, 234  # subject's left / right face-oval extremes


@dataclass
class Portrait:
    """A photo framed for rendering. All coordinates are pixels of the framed FRAME_SIZE image.

    image:        (H, W, 3) uint8 RGB, the framed photo, H = W = FRAME_SIZE
    landmarks:    (478, 3) float32 mediapipe face-mesh points (468 + 10 iris): x right, y down,
                  z toward the viewer is negative (mediapipe's convention), all in pixels
    face_box:     (4,) float32 x0, y0, x1, y1 of the face mesh's bounding box
    person_mask:  (H, W) float32 0..1 selfie segmentation of the person (head, hair, shoulders)
    face_mask:    (H, W) float32 0..1 inside the face oval
    lips_mask:    (H, W) float32 0..1 the lips (outer ring minus inner ring)
    mouth_mask:   (H, W) float32 0..1 the mouth opening inside the inner lip ring (0 when closed)
    eye_masks:    (2, H, W) float32 0..1 the eye openings, [subject's left, subject's right]
    iris_masks:   (2, H, W) float32 0..1 the visible irises, same order
    background:   (H, W, 3) uint8 RGB, the frame with the person removed and inpainted
    source_hash:  sha256 hex of the source file's bytes
    n_faces:      faces found in the photo; face_index: the one used (0 = largest)
    source_box:   (4,) float32 x0, y0, x1, y1 of the framed square in the source photo's pixels
                  (upright, full resolution); it may reach outside the photo, where the frame is filled
    head_distance: the framing used: the one asked for, or less where the photo is too tightly
                  cropped for it (never less than 1.0 on that account)
    """

    image: np.ndarray
    landmarks: np.ndarray
    face_box: np.ndarray
    person_mask: np.ndarray
    face_mask: np.ndarray
    lips_mask: np.ndarray
    mouth_mask: np.ndarray
    eye_masks: np.ndarray
    iris_masks: np.ndarray
    background: np.ndarray
    source_hash: str
    n_faces: int = 1
    face_index: int = 0
    source_box: np.ndarray | None = None
    head_distance: float = DEFAULT_HEAD_DISTANCE

    @property
    def size(self) -> int:
        return FRAME_SIZE


# --------------------------------------------------------------------------------------------
# Loading


def _to_rgb8(img) -> np.ndarray:
    """Any Pillow image mode -> (H, W, 3) uint8 RGB; alpha composited over ALPHA_BACKGROUND."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: Pillow's convert("L") clips at 255, so scale by the range.
        a = np.asarray(img).astype(np.float32)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        elif a.size and float(a.max()) > 255.0:
            a = a / (257.0 if float(a.max()) <= 65535.0 else float(a.max()) / 255.0)
        g = np.clip(a + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        bg = np.asarray(ALPHA_BACKGROUND, np.float32)
        return np.clip(rgba[:, :, :3] * alpha + bg * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _to_srgb(img):
    """Convert colour with an embedded ICC profile (Display P3 from phones, Adobe RGB, CMYK) to
    sRGB, which every later stage assumes. An unreadable profile leaves the pixels as they are."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
            return img  # already sRGB: skip a conversion that changes nothing
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                         outputMode="RGBA" if img.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img


def _read_image(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    """Decode `path` -> (RGB uint8 image, source pixels per returned pixel)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise AvatarError(f"photo not found: {path}: check the path")
    try:
        with Image.open(path) as img:
            full_w, full_h = img.size
            if img.format == "JPEG" and max(full_w, full_h) > max_side:
                # JPEG decodes at 1/2, 1/4, 1/8 scale in the DCT: the cheap way to shrink huge photos.
                # Ask for the largest such scale that fits max_side (draft never goes below the ask).
                r = 2
                while r < 8 and max(full_w, full_h) / r > max_side:
                    r *= 2
                img.draft(img.mode, (math.ceil(full_w / r), math.ceil(full_h / r)))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb8(_to_srgb(img))
    except UnidentifiedImageError:
        raise AvatarError(f"{path} is not an image Pillow can read: use a JPEG, PNG, WebP or BMP photo") from None
    except Image.DecompressionBombError:
        raise AvatarError(f"{path} is too large to decode safely: use a photo under 8000 px a side") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise AvatarError(f"{path} could not be decoded ({e}): the file may be truncated; "
                          "re-export or re-download the photo") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise AvatarError(f"{path} holds no pixels: use a photo of a face")
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        k = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    # orientation may have swapped the sides; the ratio of longest sides is orientation-free
    scale = max(full_w, full_h) / max(rgb.shape[:2])
    return np.ascontiguousarray(rgb), scale


def load_image(path, *, max_side: int = MAX_LOAD_SIDE) -> np.ndarray:
    """Read a photo -> (H, W, 3) uint8 RGB, upright (EXIF orientation applied).

    JPEG, PNG, WebP, BMP in any mode: grayscale and palette become RGB, 16-bit is scaled (not
    clipped), alpha is composited over a light gray. A photo longer than `max_side` is reduced
    to it (JPEGs already while decoding). Raises AvatarError for a missing or unreadable file.
    """
    return _read_image(Path(path), max_side)[0]


def _hash_source(source) -> str:
    if isinstance(source, np.ndarray):
        h = hashlib.sha256(np.ascontiguousarray(source).tobytes())
        h.update(str(source.shape).encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Face detection


@dataclass
class _Face:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in loaded-image pixels
    eyes: np.ndarray  # (2, 2) subject's right eye, subject's left eye (mediapipe keypoints 0, 1)
    score: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _detect(detector, image: np.ndarray, x0: float, y0: float, work_side: int) -> list[_Face]:
    """Run a mediapipe face detector on `image` (a region whose top-left is x0, y0)."""
    h, w = image.shape[:2]
    k = min(1.0, work_side / max(h, w))  # the models see 128 or 192 px: a large input only costs time
    small = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA) \
        if k < 1.0 else image
    result = detector.process(np.ascontiguousarray(small))
    faces = []
    for d in result.detections or []:
        b = d.location_data.relative_bounding_box
        kp = d.location_data.relative_keypoints
        box = np.array([b.xmin * w + x0, b.ymin * h + y0, (b.xmin + b.width) * w + x0,
                        (b.ymin + b.height) * h + y0], np.float32)
        eyes = np.array([[kp[0].x * w + x0, kp[0].y * h + y0], [kp[1].x * w + x0, kp[1].y * h + y0]],
                        np.float32)
        faces.append(_Face(box, eyes, float(d.score[0])))
    return faces


def _tiles(w: int, h: int, side: int):
    """Square tiles of `side` px with half-tile overlap covering a w x h image."""
    stride = side // 2
    xs = list(range(0, max(1, w - side) + 1, stride)) or [0]
    ys = list(range(0, max(1, h - side) + 1, stride)) or [0]
    if xs[-1] + side < w:
        xs.append(w - side)
    if ys[-1] + side < h:
        ys.append(h - side)
    return [(x, y) for y in ys for x in xs]


MIN_DETECTION_SCORE = 0.6  # real faces score 0.8-0.95; random noise reaches 0.52 with the short-range model
MAX_TILES_PER_LEVEL = 40  # bounds the small-face search on very large photos (~25 ms a tile)
MIN_TILE_SIDE = 384  # the full-range model finds faces down to ~10% of its input: ~40 px here


def _find_faces(image: np.ndarray, near, far) -> list[_Face]:
    """All faces in `image`, largest first. Whole image with both models, then finer tiles
    with the full-range model until something is found (small or distant faces)."""
    h, w = image.shape[:2]
    faces = _detect(near, image, 0, 0, 1024) + _detect(far, image, 0, 0, 1024)
    side = max(h, w) // 2
    while not faces and side >= MIN_TILE_SIDE:
        tiles = _tiles(w, h, side)
        if len(tiles) > MAX_TILES_PER_LEVEL:
            break
        for x, y in tiles:
            faces += _detect(far, image[y:y + side, x:x + side], x, y, 384)
        side //= 2
    # non-maximum suppression across models and tiles, keeping the most confident box
    faces.sort(key=lambda f: -f.score)
    kept: list[_Face] = []
    for f in faces:
        if f.score >= MIN_DETECTION_SCORE and all(_iou(f.box, k.box) < 0.3 for k in kept):
            kept.append(f)
    kept.sort(key=lambda f: -f.width)
    return kept


# --------------------------------------------------------------------------------------------
# Framing


@dataclass
class _Crop:
    """A square region of the source image: x0, y0 top-left corner, side in source pixels."""
    x0: float
    y0: float
    side: float

    def to_frame(self, pts: np.ndarray) -> np.ndarray:
        s = FRAME_SIZE / self.side
        out = pts.astype(np.float32).copy()
        out[..., 0] = (pts[..., 0] - self.x0) * s
        out[..., 1] = (pts[..., 1] - self.y0) * s
        if pts.shape[-1] > 2:
            out[..., 2] = pts[..., 2] * s
        return out

    def to_source(self, pts: np.ndarray) -> np.ndarray:
        s = self.side / FRAME_SIZE
        out = pts.astype(np.float32).copy()
        out[..., 0] = pts[..., 0] * s + self.x0
        out[..., 1] = pts[..., 1] * s + self.y0
        if pts.shape[-1] > 2:
            out[..., 2] = pts[..., 2] * s
        return out


def _framing(eye_mid: np.ndarray, face_center_x: float, face_width: float, head_distance: float) -> _Crop:
    """The crop that puts the face at FACE_WIDTH_FRACTION and the eyes at EYE_LINE_FRACTION,
    snapped to whole source pixels (resampling then needs no sub-pixel shift)."""
    side = max(1, round(face_width / FACE_WIDTH_FRACTION * head_distance))
    return _Crop(float(round(face_center_x - side / 2)), float(round(eye_mid[1] - EYE_LINE_FRACTION * side)),
                 float(side))


MIN_PHOTO_IN_FRAME = 0.5  # a farther framing may not make more than half the frame invented fill


def _photo_fraction(crop: _Crop, w: int, h: int) -> float:
    ix = max(0.0, min(crop.x0 + crop.side, w) - max(crop.x0, 0.0))
    iy = max(0.0, min(crop.y0 + crop.side, h) - max(crop.y0, 0.0))
    return ix * iy / crop.side**2


def _fit_distance(eye_mid: np.ndarray, center_x: float, face_width: float, head_distance: float,
                  w: int, h: int) -> float:
    """`head_distance`, or less where a farther framing would be mostly beyond the photo: a
    tightly cropped photo cannot show the shoulders and wall that a wide framing asks for.
    Never closer than 1.0 (or the request) on this account; closer framings are the user's."""
    d, floor = head_distance, min(head_distance, 1.0)
    while d > floor and _photo_fraction(_framing(eye_mid, center_x, face_width, d), w, h) < MIN_PHOTO_IN_FRAME:
        d = max(floor, d - 0.05)
    return d


def _push_pull(img: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Smoothly extrapolate `img` (H, W, 3) float32 from pixels where `weight` (H, W) is 1 into
    those where it is 0: a weighted image pyramid down to 1 px, then back up, each level
    keeping its own known pixels and taking the coarser level's colour where it has none."""
    levels = []
    v, w = img * weight[:, :, None], weight.astype(np.float32)
    while max(v.shape[:2]) > 1:
        levels.append((v, w))
        size = (max(1, v.shape[1] // 2), max(1, v.shape[0] // 2))
        v = cv2.resize(v, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], 3)
        w = cv2.resize(w, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0])
    cur = v / np.maximum(w, 1e-6)[:, :, None]
    for v, w in reversed(levels):
        up = cv2.resize(cur, (v.shape[1], v.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(v.shape)
        a = np.clip(w, 0, 1)[:, :, None]
        cur = np.where(a > 1e-6, v / np.maximum(a, 1e-6), 0) * a + up * (1 - a)
    return cur


EDGE_BAND = 16.0  # frame px beyond the photo's edge over which the mirror fades into a smooth fill


def _cut(image: np.ndarray, crop: _Crop) -> tuple[np.ndarray, np.ndarray]:
    """Resample `crop` of `image` to FRAME_SIZE^2 -> (frame, beyond). `beyond` (H, W) float32 is
    0 inside the photo and rises to 1 within EDGE_BAND px outside it. There the photo is
    mirrored at its edge, fading into a smooth extrapolation of its border colours: a mirror
    alone would repeat the face as ghosts beside a tightly cropped head."""
    h, w = image.shape[:2]
    x0, y0, side = int(crop.x0), int(crop.y0), int(crop.side)
    left, top = max(0, -x0), max(0, -y0)
    right, bottom = max(0, x0 + side - w), max(0, y0 + side - h)
    inside = image[max(0, y0):min(h, y0 + side), max(0, x0):min(w, x0 + side)]
    if inside.size == 0:
        raise AvatarError("the face lies outside the photo after framing: use a smaller head distance")
    region = cv2.copyMakeBorder(inside, top, bottom, left, right, cv2.BORDER_REFLECT_101) \
        if left or top or right or bottom else inside
    interp = cv2.INTER_AREA if side > FRAME_SIZE else cv2.INTER_CUBIC
    frame = cv2.resize(region, (FRAME_SIZE, FRAME_SIZE), interpolation=interp)
    if not (left or top or right or bottom):
        return frame, np.zeros((FRAME_SIZE, FRAME_SIZE), np.float32)
    # distance (frame px) outside the photo's footprint
    s = FRAME_SIZE / side
    u = (np.arange(FRAME_SIZE, dtype=np.float32) + 0.5) / s + x0  # source x of each frame column
    v = (np.arange(FRAME_SIZE, dtype=np.float32) + 0.5) / s + y0
    dx = np.maximum(np.maximum(0 - u, u - w), 0) * s
    dy = np.maximum(np.maximum(0 - v, v - h), 0) * s
    beyond = np.clip(np.hypot(dx[None, :], dy[:, None]) / EDGE_BAND, 0, 1).astype(np.float32)
    small = 128  # the smooth fill needs no detail
    f_small = cv2.resize(frame, (small, small), interpolation=cv2.INTER_AREA).astype(np.float32)
    known = (cv2.resize(beyond, (small, small), interpolation=cv2.INTER_AREA) == 0).astype(np.float32)
    smooth = cv2.GaussianBlur(_push_pull(f_small, known), (0, 0), 2.0)
    smooth = cv2.resize(smooth, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_CUBIC)
    mirror = cv2.GaussianBlur(frame, (0, 0), 3).astype(np.float32)
    a = beyond[:, :, None]
    near = np.clip(beyond * 4, 0, 1)[:, :, None]  # the mirror softens within a few px of the edge
    out = frame.astype(np.float32) * (1 - near) + mirror * near
    out = out * (1 - a) + smooth * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), beyond


# --------------------------------------------------------------------------------------------
# Face mesh


def _meshes(mesh, frame: np.ndarray) -> list[np.ndarray]:
    """All face meshes in a framed image: list of (478, 3) float32 in frame pixels."""
    result = mesh.process(frame)
    out = []
    for lm in result.multi_face_landmarks or []:
        a = np.array([(p.x, p.y, p.z) for p in lm.landmark], np.float32) * FRAME_SIZE
        if a.shape[0] == N_LANDMARKS:
            out.append(a)
    return out


def _pick_mesh(meshes: list[np.ndarray], expected_eyes: np.ndarray) -> np.ndarray | None:
    """The mesh whose eyes lie nearest the chosen face's eyes (frame px), if near enough."""
    best, best_d = None, float("inf")
    eye_dist = float(np.linalg.norm(expected_eyes[0] - expected_eyes[1])) + 1e-6
    for m in meshes:
        eyes = np.stack([m[RIGHT_IRIS[0], :2], m[LEFT_IRIS[0], :2]])
        d = float(np.linalg.norm(eyes - expected_eyes, axis=1).mean())
        if d < best_d:
            best, best_d = m, d
    return best if best is not None and best_d < 0.75 * eye_dist else None


def _face_width(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[FACE_LEFT_EDGE] - lm[FACE_RIGHT_EDGE]))


# --------------------------------------------------------------------------------------------
# Masks


def _poly_mask(pts: np.ndarray, soft: float = 0.7) -> np.ndarray:
    """Anti-aliased filled polygon (frame px, sub-pixel) -> (H, W) float32 0..1, softened."""
    m = np.zeros((FRAME_SIZE, FRAME_SIZE), np.uint8)
    cv2.fillPoly(m, [np.round(pts[:, :2] * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    m = m.astype(np.float32) / 255.0
    if soft > 0:
        m = cv2.GaussianBlur(m, (0, 0), soft)
    return m


def _masks(lm: np.ndarray) -> dict[str, np.ndarray]:
    ring = lambda idx: lm[list(idx)]  # noqa: E731
    face = _poly_mask(ring(FACE_OVAL), 1.0)
    inner = _poly_mask(ring(LIPS_INNER), 0.0)
    lips = np.clip(_poly_mask(ring(LIPS_OUTER), 0.0) - inner, 0, 1)
    lips = cv2.GaussianBlur(lips, (0, 0), 0.7)
    # A closed mouth still rasterises its collapsed inner ring as a hairline: call the mouth open
    # only when the inner lips are at least a pixel apart somewhere along the middle.
    gap = max(float(lm[lo, 1] - lm[up, 1]) for up, lo in INNER_LIP_PAIRS)
    mouth = cv2.GaussianBlur(inner, (0, 0), 0.7) if gap >= 1.0 else np.zeros_like(inner)
    eyes, irises = [], []
    for eye_idx, iris_idx in ((LEFT_EYE, LEFT_IRIS), (RIGHT_EYE, RIGHT_IRIS)):
        eye = _poly_mask(ring(eye_idx), 0.7)
        c = lm[iris_idx[0], :2]
        r = float(np.linalg.norm(lm[list(iris_idx[1:]), :2] - c, axis=1).mean())
        disc = np.zeros((FRAME_SIZE, FRAME_SIZE), np.uint8)
        cv2.circle(disc, tuple(np.round(c * 16).astype(int)), max(1, round(r * 16)), 255, -1,
                   lineType=cv2.LINE_AA, shift=4)
        iris = cv2.GaussianBlur(disc.astype(np.float32) / 255.0, (0, 0), 0.7) * eye
        eyes.append(eye)
        irises.append(iris)
    return dict(face_mask=face, lips_mask=lips, mouth_mask=mouth,
                eye_masks=np.stack(eyes), iris_masks=np.stack(irises))


# --------------------------------------------------------------------------------------------
# Person segmentation and background


def _person_mask(seg, frame: np.ndarray, face_mask: np.ndarray) -> np.ndarray:
    """Selfie segmentation, edge-aligned to the photo with a guided filter, face always included.

    `seg` is mediapipe's general model (model_selection=0, 256x256): on the test faces it keeps
    the whole head, where the landscape model (1) dropped the white crown of Grace Hopper's cap.
    """
    m = seg.process(frame).segmentation_mask.astype(np.float32)
    m = cv2.ximgproc.guidedFilter(frame, m, 4, 1e-3) if hasattr(cv2, "ximgproc") \
        else cv2.GaussianBlur(m, (0, 0), 1.5)
    m = np.clip(np.maximum(m, face_mask), 0, 1).astype(np.float32)
    # only the person whose face this is (and the soft edge around them): another person in the
    # photo is part of the room, kept as it is rather than removed and inpainted
    core = ((m > 0.5) | (face_mask > 0.5)).astype(np.uint8)
    _, labels = cv2.connectedComponents(core, connectivity=8)
    ours = np.isin(labels, np.unique(labels[(face_mask > 0.5) & (labels > 0)]))
    edge = cv2.dilate(ours.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))) > 0
    return np.where(edge, m, 0.0).astype(np.float32)


INPAINT_SIDE = 64  # the hole is filled at this resolution: a wall needs no fine detail, and it is fast
# of the frame side (10 px): the hole covers the person and the fringe the mask misses (hair, halo),
# no more. The wall beyond stays the photo's own, sharp while the head moves (the head layer shows
# the background only where the moved person's mask is below 1); only the strip the head uncovers
# shows the inpainting. (0.08, 41 px, blurred the wall around the head from the first moved pixel.)
HOLE_DILATE = 0.02


def _background(frame: np.ndarray, person: np.ndarray, beyond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What replaces the person: an inpainted continuation of what surrounds it (H, W, 3) float32
    (beyond the photo too), and where it replaces the person (H, W, 1) float32 0..1 (the dilated
    person, feathered).

    Compared by eye on the astronaut (wall, flag, shuttle model) and Grace Hopper (flag, blue
    backdrop): Telea and Navier-Stokes smear radial streaks of the border colours into the hole;
    shift-map clones whole objects (a second shuttle); FSR-fast continues structure and colour
    plausibly, at ~0.3-0.5 s for a 64 px square.
    """
    r = max(1, round(HOLE_DILATE * FRAME_SIZE))
    person_hole = (person > 0.2).astype(np.uint8)
    person_hole = cv2.dilate(person_hole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    outside = (beyond > 0).astype(np.uint8)  # beyond the photo there is no real wall to keep
    hole = person_hole | outside
    small = cv2.resize(frame, (INPAINT_SIDE, INPAINT_SIDE), interpolation=cv2.INTER_AREA)
    small_hole = cv2.resize(hole.astype(np.float32), (INPAINT_SIDE, INPAINT_SIDE),
                            interpolation=cv2.INTER_AREA) > 0.0
    known = (~small_hole).astype(np.uint8)
    filled = np.zeros_like(small)
    if known.any():
        cv2.xphoto.inpaint(small, known, filled, cv2.xphoto.INPAINT_FSR_FAST)
    else:  # the person fills the frame: nothing to continue, use the frame's mean colour
        filled[:] = small.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    filled = cv2.GaussianBlur(filled, (0, 0), 0.75)
    filled = cv2.resize(filled, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_CUBIC)
    # feather the person's seam a few pixels so no edge outlines the old silhouette
    return filled.astype(np.float32), cv2.GaussianBlur(person_hole.astype(np.float32), (0, 0), 4)[:, :, None]


def _over(frame: np.ndarray, fill: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.clip(frame * (1 - weight) + fill * weight + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Analysis


# what mediapipe 0.10.21's native code writes to stderr on every graph: absl logs before its
# logging is initialised (GLOG_minloglevel does not reach them) and TF Lite's delegate notice
_NATIVE_NOISE = re.compile(r"^(?:[WIEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |INFO: Created TensorFlow Lite |"
                           r"WARNING: All log messages before absl::InitializeLog)")


@contextlib.contextmanager
def _quiet_mediapipe():
    """Keeps mediapipe's native log lines off the terminal: on the main thread, stderr (fd 2) goes
    to a temporary file while mediapipe runs, and what was not mediapipe noise (our own log lines,
    any real error) is written back to stderr afterwards, in order."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # the rest of its logging (before first import)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not _NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def analyze_portrait(source, *, head_distance: float = DEFAULT_HEAD_DISTANCE,
                     face_index: int | None = None) -> Portrait:
    """Frame the face in `source` (a path or an (H, W, 3) uint8 RGB array) and analyse it.

    head_distance: 1.0 frames head and shoulders like a webcam; smaller is closer.
    face_index:    which face, largest first (None = the largest).
    Raises AvatarError for unreadable photos, no face, a face under MIN_FACE_PX, a bad index.
    """
    if not (HEAD_DISTANCE_RANGE[0] <= head_distance <= HEAD_DISTANCE_RANGE[1]):
        raise AvatarError(f"head distance {head_distance} is out of range: use "
                          f"{HEAD_DISTANCE_RANGE[0]} to {HEAD_DISTANCE_RANGE[1]} (1.0 = head and shoulders)")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise AvatarError(f"portrait array must be (H, W, 3) uint8 RGB, got {source.shape} {source.dtype}")
        name, image, src_scale = "the image", np.ascontiguousarray(source), 1.0
    else:
        path = Path(source)
        name = str(path)
        image, src_scale = _read_image(path, MAX_LOAD_SIDE)
    source_hash = _hash_source(source)

    with _quiet_mediapipe():
        return _analyze(image, name, src_scale, source_hash, head_distance, face_index)


def _analyze(image: np.ndarray, name: str, src_scale: float, source_hash: str, head_distance: float,
             face_index: int | None) -> Portrait:
    import mediapipe as mp

    sol = mp.solutions
    with sol.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5) as near, \
            sol.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5) as far:
        faces = _find_faces(image, near, far)
    if not faces:
        raise AvatarError(f"no face found in {name}: use a photo where one face is clearly visible, "
                          f"frontal, well lit and at least {MIN_FACE_PX} px wide")
    if face_index is None:
        face_index = 0
        if len(faces) > 1:
            log.warning("found %d faces in %s, using the largest; --face-index N picks another", len(faces), name)
    if not (0 <= face_index < len(faces)):
        raise AvatarError(f"face index {face_index} is out of range: found {len(faces)} "
                          f"face{'s' if len(faces) != 1 else ''} in {name} (use 0 to {len(faces) - 1})")
    face = faces[face_index]
    if face.width * src_scale < MIN_FACE_PX:
        raise AvatarError(f"the face in {name} is only {face.width * src_scale:.0f} px wide: use a photo "
                          f"where the face is at least {MIN_FACE_PX} px wide")

    with sol.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=8, refine_landmarks=True,
                                min_detection_confidence=0.5) as mesh:
        # pass 1: frame from the detection box (its width is 1.04-1.12x the mesh's face width,
        # measured on the astronaut, Grace Hopper and a 12 MP photo)
        eye_mid = face.eyes.mean(axis=0)
        crop = _framing(eye_mid, float(eye_mid[0]), face.width / 1.05, 1.0)
        frame, _ = _cut(image, crop)
        lm = _pick_mesh(_meshes(mesh, frame), crop.to_frame(face.eyes[[0, 1]]))
        if lm is None:
            raise AvatarError(f"no face could be measured in {name} (the face mesh found none where the "
                              "detector saw one): use a photo where one face is clearly visible, frontal and well lit")
        # pass 2: frame from the mesh (steadier size and centre), at the requested distance
        src = crop.to_source(lm)
        eyes_src = np.stack([src[RIGHT_IRIS[0], :2], src[LEFT_IRIS[0], :2]])
        center_x = float(src[list(FACE_OVAL), 0].mean())
        used = _fit_distance(eyes_src.mean(axis=0), center_x, _face_width(src), head_distance,
                             image.shape[1], image.shape[0])
        if used < head_distance:
            log.warning("head distance %.2f would frame mostly beyond the edges of %s; using %.2f",
                     head_distance, name, used)
        crop = _framing(eyes_src.mean(axis=0), center_x, _face_width(src), used)
        frame, beyond = _cut(image, crop)
        lm = _pick_mesh(_meshes(mesh, frame), crop.to_frame(eyes_src))
        if lm is None:
            raise AvatarError(f"the face in {name} could not be measured at head distance "
                              f"{head_distance}: try a value nearer 1.0")

    masks = _masks(lm)
    with sol.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        person = _person_mask(seg, frame, masks["face_mask"])
    fill, hole = _background(frame, person, beyond)
    # the wall: the photo's, continued beyond its edges. The background is the wall with the person
    # inpainted, and the frame shows the wall wherever no person is, so the two agree everywhere
    # but under the person (else the frame would change there as soon as the head moves)
    wall = _over(frame, fill, beyond[:, :, None])
    background = _over(wall, fill, hole)
    if beyond.any():
        frame = _over(frame, wall, (beyond * (1 - person))[:, :, None])
    xy = lm[:, :2]
    face_box = np.array([*xy.min(axis=0), *xy.max(axis=0)], np.float32)
    return Portrait(image=frame, landmarks=lm.astype(np.float32), face_box=face_box, person_mask=person,
                    background=background, source_hash=source_hash, n_faces=len(faces),
                    face_index=face_index, head_distance=used,
                    source_box=np.array([crop.x0, crop.y0, crop.x0 + crop.side, crop.y0 + crop.side],
                                        np.float32) * np.float32(src_scale), **masks)
