"""The marks every output frame carries, live and offline: the visible "AI" badge and the
invisible watermark (ARCHITECTURE §7). One object per output stream, applied to each frame."""

from __future__ import annotations

import logging
import threading

import numpy as np

from avatar.badge import Badge
from avatar.constants import FPS
from avatar.memory import release_free
from avatar.watermark import Payload, Watermarker, hour_bucket, load_install_id

HOUR_CHECK_FRAMES = 60 * FPS  # how often a long stream checks whether its mark's hour is stale

log = logging.getLogger("avatar.disclosure")


class FrameMarker:
    """frame (512, 512, 3) uint8 RGB -> the same frame, watermarked and (by default) badged, in place.

    The watermark is always embedded; the badge can be turned off only explicitly, and that is
    logged, so a clip without a visible disclosure is a choice someone made on purpose.
    """

    def __init__(self, *, badge: bool = True, paused: bool = False):
        self.install_id = load_install_id()
        self.watermarker = Watermarker(Payload.now(self.install_id))
        self._frames = 0
        self._renewing = False
        self.badge = Badge(paused=paused) if badge else None
        if not badge:
            log.warning("the visible AI disclosure badge is OFF (--no-badge); the invisible watermark stays on")

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        # watermark first: the badge's flat pill would otherwise carry a mark it cannot hide
        self._frames += 1
        if self._frames % HOUR_CHECK_FRAMES == 0:
            self._renew_if_stale()
        frame = self.watermarker.embed(frame)
        if self.badge is not None:
            frame = self.badge.apply(frame)
        return frame

    def _renew_if_stale(self) -> None:
        """A live stream runs for hours: re-stamp the mark's hour. Building a Watermarker takes
        ~100 ms, so it is built on a side thread and swapped in whole (one reference assignment)."""
        if self._renewing or self.watermarker.payload.hour == hour_bucket():
            return
        self._renewing = True

        def build() -> None:
            try:
                self.watermarker = Watermarker(Payload.now(self.install_id))
            finally:
                self._renewing = False
                release_free()  # the build's temporaries, kept in this thread's arena otherwise

        threading.Thread(target=build, name="watermark-renew", daemon=True).start()
