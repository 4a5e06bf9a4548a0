"""Portrait analysis: a photo in, a framed 512x512 portrait with landmarks, masks and background out.

This is analysis-time code (mediapipe, OpenCV). The per-frame path never imports it: the rig
(`avatar/rig.py`) turns a `Portrait` into plain tensors once, and those are cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar.constants import FRAME_SIZE

DEFAULT_HEAD_DISTANCE = 1.0  # 1.0 = head-and-shoulders framing; < 1 closer, > 1 farther
MIN_FACE_PX = 64  # a face narrower than this in the source photo is refused


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

    @property
    def size(self) -> int:
        return FRAME_SIZE
