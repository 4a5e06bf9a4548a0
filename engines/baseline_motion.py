"""The loudness baseline for motion: jaw from the loudness envelope, random blinks, nothing else.

It exists as the floor that the MotionGenerator is measured against (and as the Foundation's
motion source before the generator landed). It has the MotionGenerator's contract, so the
pipeline runs either one unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from avatar.constants import FPS
from avatar.motion import N_CHANNELS, index

LOUDNESS = 5  # position of "loudness" in the audio encoder's ARTICULATION tuple
BLINKS_PER_MINUTE = 20.0
BLINK_FRAMES = 10  # 250 ms: closing, closed and reopening together


class LoudnessBaseline(nn.Module):
    """features (B, 7), controls (B, C), noise (B, N_NOISE) uniform(0,1), jaw (B, 1), blink_t (B, 1)
    -> motion (B, N_CHANNELS), jaw (B, 1), blink_t (B, 1).

    State: `jaw` is the smoothed jaw opening; `blink_t` counts frames since the current blink
    started (>= BLINK_FRAMES when the eyes are open).
    """

    N_NOISE = 1

    def __init__(self):
        super().__init__()
        self.jaw_index = index("jaw_open")
        self.blink_indices = (index("blink_left"), index("blink_right"))

    def initial_state(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return torch.zeros(batch, 1), torch.full((batch, 1), float(BLINK_FRAMES))

    def forward(self, features, controls, noise, jaw, blink_t):
        target = (features[:, LOUDNESS : LOUDNESS + 1] * 0.7).clamp(0.0, 0.7)
        # fast attack, slow release: mouths open with the sound and close a little after it
        rate = torch.where(target > jaw, torch.full_like(jaw, 0.6), torch.full_like(jaw, 0.3))
        jaw = jaw + rate * (target - jaw)

        start = (noise[:, :1] < BLINKS_PER_MINUTE / (60.0 * FPS)) & (blink_t >= BLINK_FRAMES)
        blink_t = torch.where(start, torch.zeros_like(blink_t), blink_t + 1.0)
        # a triangle: 4 frames closing, then 6 reopening
        closed = torch.where(blink_t < 4, (blink_t + 1) / 4, 1.0 - (blink_t - 3) / 6).clamp(0.0, 1.0)

        motion = torch.zeros(features.shape[0], N_CHANNELS, dtype=features.dtype)
        motion[:, self.jaw_index] = jaw[:, 0]
        motion[:, self.blink_indices[0]] = closed[:, 0]
        motion[:, self.blink_indices[1]] = closed[:, 0]
        return motion, jaw, blink_t
