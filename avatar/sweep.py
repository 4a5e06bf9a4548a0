"""Contact sheet of the motion channels: one row per channel, that channel across its range.

The quickest way to see what the renderer does with a portrait (`vasa-avatar sweep`).
"""

from __future__ import annotations

import numpy as np
import torch

from avatar.motion import CHANNELS, vector

TILE = 160  # px, each rendered frame is downscaled to this side
LABEL_COLOUR = (255, 255, 0)


def channel_values(low: float, high: float, neutral: float, count: int) -> list[float]:
    """`count` values spanning [low, high]; the neutral value is among them when count is odd."""
    if count <= 1:
        return [neutral]
    return [float(v) for v in np.linspace(low, high, count)]


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    import cv2

    tile = np.ascontiguousarray(tile)
    # dark outline under a bright label: readable on hair, skin and wall alike
    for colour, thickness in (((0, 0, 0), 3), (LABEL_COLOUR, 1)):
        cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, thickness, cv2.LINE_AA)
    return tile


def render_sweep(rig, *, decoder=None, values: int = 5, tile: int = TILE) -> np.ndarray:
    """(H, W, 3) uint8 RGB sheet: one row per motion channel (avatar/motion.py order), `values`
    tiles per row from the channel's low to its high value with every other channel neutral,
    each tile labelled "name=value". `decoder` defaults to a fresh FaceDecoder."""
    import cv2

    if decoder is None:
        from engines.face_decoder import FaceDecoder

        decoder = FaceDecoder().eval()
    inputs = rig.inputs()
    rows = []
    with torch.inference_mode():
        for ch in CHANNELS:
            tiles = []
            for v in channel_values(ch.low, ch.high, ch.neutral, values):
                motion = torch.from_numpy(vector(**{ch.name: v}))[None]
                frame = decoder(motion, *inputs)[0].numpy()
                small = cv2.resize(frame, (tile, tile), interpolation=cv2.INTER_AREA)
                tiles.append(_label(small, f"{ch.name}={v:g}"))
            rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
