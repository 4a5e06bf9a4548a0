"""The visible "AI" disclosure badge: a small translucent pill in a corner of every frame.

The pill is rendered once (4x supersampled, then area-downsampled, so its edges and the text are
anti-aliased) as premultiplied RGB plus alpha; per frame only its corner is blended, a few
thousand pixels, far under 0.5 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
SUPERSAMPLE = 4
# Bold sans fonts that are common per platform; Pillow's own scalable font if none is found.
FONT_CANDIDATES = ("DejaVuSans-Bold.ttf", "Arial Bold.ttf", "arialbd.ttf", "Helvetica-Bold.ttf",
                   "LiberationSans-Bold.ttf", "NotoSans-Bold.ttf")


@dataclass(frozen=True)
class BadgeStyle:
    """Sizes in output pixels for a 512 x 512 frame; they scale with the frame."""

    height: int = 22
    margin: int = 10  # from the frame's edges
    padding: int = 9  # text to pill edge, horizontally
    text_height: float = 0.55  # cap height as a fraction of the pill height
    background: tuple[int, int, int] = (16, 16, 20)
    background_alpha: float = 0.6
    text: tuple[int, int, int] = (255, 255, 255)
    text_alpha: float = 0.95


def _font(pixels: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """A font for `pixels` px and whether it is bold already."""
    for name in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, pixels), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=pixels), False  # Pillow >= 10.1 ships a scalable font
    except TypeError:  # older Pillow: a small bitmap font, still legible
        return ImageFont.load_default(), False


def render_badge(label: str, style: BadgeStyle = BadgeStyle(), *, scale: float = 1.0) -> np.ndarray:
    """(h, w, 4) uint8 RGBA tile of the pill with `label`, anti-aliased."""
    ss = SUPERSAMPLE
    h = max(8, round(style.height * scale)) * ss
    pad = round(style.padding * scale) * ss
    font, bold = _font(round(h * style.text_height / 0.72))  # 0.72: cap height / em of typical sans fonts
    stroke = 0 if bold else max(1, h // 28)  # embolden a regular fallback font
    left, top, right, bottom = font.getbbox(label, anchor="ls", stroke_width=stroke)
    w_text = right - left
    w = max(h, w_text + 2 * pad)
    w += -w % ss  # whole output pixels
    # Two layers: a pill mask and a text mask, combined into colour and alpha afterwards.
    pill = Image.new("L", (w, h), 0)
    ImageDraw.Draw(pill).rounded_rectangle((0, 0, w - 1, h - 1), radius=h // 2, fill=255)
    text = Image.new("L", (w, h), 0)
    cap = -font.getbbox("I", anchor="ls")[1]  # baseline to cap top
    baseline = (h + cap) // 2
    ImageDraw.Draw(text).text(((w - w_text) // 2 - left, baseline), label, fill=255, font=font, anchor="ls",
                              stroke_width=stroke, stroke_fill=255)
    size = (w // ss, h // ss)
    pill_a = np.asarray(pill.resize(size, Image.Resampling.BOX), np.float32) / 255.0
    text_a = np.asarray(text.resize(size, Image.Resampling.BOX), np.float32) / 255.0
    bg_a = pill_a * style.background_alpha
    tx_a = text_a * style.text_alpha
    alpha = tx_a + bg_a * (1.0 - tx_a)  # text over background ("over" operator)
    rgb = (np.asarray(style.text, np.float32) * tx_a[..., None]
           + np.asarray(style.background, np.float32) * (bg_a * (1.0 - tx_a))[..., None])
    rgb = np.where(alpha[..., None] > 0, rgb / np.maximum(alpha[..., None], 1e-6), 0.0)
    return np.dstack([np.clip(np.rint(rgb), 0, 255), np.clip(np.rint(alpha * 255), 0, 255)]).astype(np.uint8)


class Badge:
    """Blends the disclosure pill into a corner of (H, W, 3) uint8 RGB frames.

    badge = Badge(corner="bottom-right")           # "AI"
    paused = Badge(corner="bottom-right", paused=True)  # "AI · PAUSED", for the paused still frame
    frame = badge.apply(frame)                      # in place
    """

    def __init__(self, corner: str = "bottom-right", *, paused: bool = False, frame_size: int = 512,
                 style: BadgeStyle = BadgeStyle()):
        if corner not in CORNERS:
            raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
        self.corner = corner
        self.label = "AI \u00b7 PAUSED" if paused else "AI"
        self.style = style
        self._scale = frame_size / 512
        tile = render_badge(self.label, style, scale=self._scale)
        alpha = tile[..., 3:].astype(np.float32) / 255.0
        self._premultiplied = tile[..., :3].astype(np.float32) * alpha + 0.5  # + 0.5: round on truncation
        self._keep = 1.0 - alpha
        self.height, self.width = tile.shape[:2]
        self.tile = tile

    def region(self, frame_shape: tuple[int, ...]) -> tuple[slice, slice]:
        """The rows and columns of a frame of `frame_shape` that the badge covers."""
        fh, fw = frame_shape[:2]
        m = round(self.style.margin * self._scale)
        if self.height + m > fh or self.width + m > fw:
            raise ValueError(f"frame {fw}x{fh} is too small for a {self.width}x{self.height} badge")
        top = m if self.corner.startswith("top") else fh - m - self.height
        left = m if self.corner.endswith("left") else fw - m - self.width
        return slice(top, top + self.height), slice(left, left + self.width)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Blends the badge into `frame` (H, W, 3) uint8 RGB in place and returns it."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"Badge.apply expects an (H, W, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}")
        rows, cols = self.region(frame.shape)
        patch = frame[rows, cols]
        patch[...] = patch * self._keep + self._premultiplied
        return frame
