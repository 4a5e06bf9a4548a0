"""The visible "AI" disclosure badge: where it goes, that it is legible, and that it touches nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatar.badge import CORNERS, Badge

ASTRONAUT = Path(__file__).resolve().parents[1] / "avatar" / "assets" / "astronaut.png"


def luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of sRGB uint8 colours."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return lin @ np.array([0.2126, 0.7152, 0.0722])


def contrast(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return (hi + 0.05) / (lo + 0.05)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(ASTRONAUT).convert("RGB")).copy()


@pytest.mark.parametrize("corner", CORNERS)
def test_badge_changes_only_its_corner(astronaut, corner):
    badge = Badge(corner=corner)
    out = badge.apply(astronaut.copy())
    changed = np.argwhere((out != astronaut).any(axis=2))
    assert len(changed) > 300  # the pill is there
    rows, cols = changed[:, 0], changed[:, 1]
    # Everything that changed lies in a 40 x 60 px box at the named corner of the 512 x 512 frame.
    top, left = corner.startswith("top"), corner.endswith("left")
    assert (rows < 40).all() if top else (rows >= 512 - 40).all()
    assert (cols < 60).all() if left else (cols >= 512 - 60).all()
    r, c = badge.region(out.shape)
    assert rows.min() >= r.start and rows.max() < r.stop and cols.min() >= c.start and cols.max() < c.stop


@pytest.mark.parametrize("background", [(255, 255, 255), (128, 128, 128), (0, 0, 0), (200, 150, 120)])
@pytest.mark.parametrize("paused", [False, True])
def test_badge_text_is_legible_on_any_background(background, paused):
    badge = Badge(paused=paused)
    frame = np.empty((512, 512, 3), np.uint8)
    frame[:] = background
    out = badge.apply(frame)
    r, c = badge.region(out.shape)
    patch = out[r, c].reshape(-1, 3)
    alpha = badge.tile[..., 3].reshape(-1)
    tile_luma = luminance(badge.tile[..., :3].reshape(-1, 3))
    text = (tile_luma > 0.8) & (alpha > 230)  # solid glyph pixels
    pill = (tile_luma < 0.05) & (alpha > 140)  # solid pill background pixels
    assert text.sum() > 40 and pill.sum() > 100
    text_l, pill_l = luminance(patch[text]).mean(), luminance(patch[pill]).mean()
    # WCAG asks 3:1 for large text; measured 4.5:1 on white, 17:1 on black.
    assert contrast(text_l, pill_l) >= 3.0, (text_l, pill_l)
    # The pill itself stands out from a bright background (darkened at least by a third).
    bg_l = luminance(np.array(background, np.uint8)[None])[0]
    if bg_l > 0.5:
        assert pill_l < 0.67 * bg_l


def test_badge_is_anti_aliased_and_translucent():
    alpha = Badge().tile[..., 3]
    inside = alpha[alpha > 0]
    assert 0.55 * 255 <= np.median(inside) <= 0.65 * 255  # the pill: 60% opaque, the frame shows through
    edge = ((alpha > 10) & (alpha < 140)).sum()
    assert edge > 20  # soft rounded ends and glyph edges, not a hard 0/1 stencil
    assert alpha[0, 0] < 40 and alpha[-1, -1] < 40  # rounded corners


def test_paused_variant_says_more_and_is_wider():
    plain, paused = Badge(), Badge(paused=True)
    assert paused.label.startswith("AI") and "PAUSED" in paused.label
    assert paused.width > 2 * plain.width and paused.height == plain.height


def test_apply_is_in_place_and_cheap_in_footprint(astronaut):
    frame = astronaut.copy()
    assert Badge().apply(frame) is frame
    assert Badge().height <= 24 and Badge().width <= 48  # small: about 0.3% of the frame


def test_badge_scales_with_frame_and_rejects_bad_input():
    big = Badge(frame_size=1024)
    assert big.height == 2 * Badge().height
    with pytest.raises(ValueError, match="corner"):
        Badge(corner="middle")
    with pytest.raises(ValueError, match="uint8"):
        Badge().apply(np.zeros((512, 512, 3), np.float32))
    with pytest.raises(ValueError, match="too small"):
        Badge().apply(np.zeros((20, 20, 3), np.uint8))
