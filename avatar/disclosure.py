"""The marks every output frame carries, live and offline: the visible "AI" badge and the
invisible watermark (ARCHITECTURE §7). One object per output stream, applied to each frame."""

from __future__ import annotations

import logging

import numpy as np

from avatar.badge import Badge
from avatar.watermark import Payload, Watermarker, load_install_id

log = logging.getLogger("avatar.disclosure")


class FrameMarker:
    """frame (512, 512, 3) uint8 RGB -> the same frame, watermarked and (by default) badged, in place.

    The watermark is always embedded; the badge can be turned off only explicitly, and that is
    logged, so a clip without a visible disclosure is a choice someone made on purpose.
    """

    def __init__(self, *, badge: bool = True, paused: bool = False):
        self.watermarker = Watermarker(Payload.now(load_install_id()))
        self.badge = Badge(paused=paused) if badge else None
        if not badge:
            log.warning("the visible AI disclosure badge is OFF (--no-badge); the invisible watermark stays on")

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        # watermark first: the badge's flat pill would otherwise carry a mark it cannot hide
        frame = self.watermarker.embed(frame)
        if self.badge is not None:
            frame = self.badge.apply(frame)
        return frame
