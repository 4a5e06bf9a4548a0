"""FaceDecoder: motion vector + portrait rig -> one 512x512 RGB frame. Training-free 2.5D renderer.

    frame = FaceDecoder()(motion, *rig.inputs())
    motion: (1, N_CHANNELS) float32, channels as in avatar/motion.py
    frame:  (1, FRAME_SIZE, FRAME_SIZE, 3) uint8 RGB

Rig inputs, in RIG_INPUTS order (name, shape, dtype): see RIG_INPUTS below; `avatar/rig.py` builds
them once per portrait. Shapes are fixed and do not depend on the portrait, so one exported graph
serves every portrait.

How a frame is made (all static shapes, no data-dependent Python control flow):
1. Control points (face landmarks, a ring of hair/skull points, fixed anchors) move: expression
   channels add per-point displacement patterns, jaw_open rotates the lower face about a hinge
   behind the ears, then the head rotates rigidly in 3D about a neck pivot and is scaled/shifted.
2. Their 2D displacements become dense forward fields on coarse grids through precomputed linear
   thin-plate-spline operators (W = K_grid . L^-1, one matmul, no per-frame solve), and are
   inverted into backward maps by fixed-point iteration on the coarse grid.
3. The head window (a fixed-size square around the head, 1:1 with the frame) samples the photo and
   the person mask through the main backward map and is composited over the inpainted background,
   so the background stays still where the head leaves it.
4. The frame is the photo outside the window and the window inside (an index gather, so the
   window's position can come from the rig).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar.constants import FRAME_SIZE
from avatar.motion import INDEX, N_CHANNELS


WIN = 448  # head window side, px, 1:1 with the frame
STEP = 8  # coarse grid spacing of the backward maps, px
GRID = WIN // STEP  # 56 coarse nodes per side; node k sits at pixel STEP * k + (STEP - 1) / 2
N_CTRL = 256  # control points, padded with inert zeros
NEWTON_ITERS = 5  # backward-map iterations (guarded Newton); the first starts from the identity
NEWTON_MAX_STEP_PX = 12.0  # a step longer than this is shortened (the map may fold)
ALPHA_RAMP_PX = 1.5  # backward shift (px) over which the person layer switches to alpha compositing
JAW_MAX_DEG = 13.0  # jaw_open = 1: the mandible's rotation about the hinge

# mouth window: follows the mouth on screen, 1:1 with the frame
MOUTH_W, MOUTH_H = 176, 144
MOUTH_ANCHOR_AT = (0.5, 0.36)  # where the mouth centre sits in the window (fractions)
MOUTH_SRC_W, MOUTH_SRC_H = 256, 224  # source crop of the mouth textures, px
MOUTH_SRC_STEP = 4  # spacing of the mouth's forward fields on the source crop
LIP_FEATHER_PX = 1.5  # the lips' inner edge fades over this many (source) px into the mouth
N_ANCHORS = 8  # extra moved points: mouth centre, skull and mandible triangles, eyes centre

N_PIX = FRAME_SIZE * FRAME_SIZE
N_WIN = WIN * WIN
_MGW, _MGH = MOUTH_SRC_W // MOUTH_SRC_STEP, MOUTH_SRC_H // MOUTH_SRC_STEP

RIG_INPUTS: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = (
    # the framed photo (RGB 0..255) and person mask (0..1) stacked, sampled by the head window
    ("photo_rgbm", (1, 4, FRAME_SIZE, FRAME_SIZE), torch.float32),
    # the frame as uint8, flattened to pixels: what the frame shows outside the head window
    ("photo_u8", (N_PIX, 3), torch.uint8),
    # the inpainted background under the head window, RGB 0..255
    ("window_background", (1, 3, WIN, WIN), torch.float32),
    # for each frame pixel, its index into cat(photo_u8, window pixels): the paste-back
    ("frame_source", (N_PIX,), torch.int64),
    # the head window's top-left corner in the frame, px (x, y)
    ("window_origin", (2,), torch.float32),
    # control points: source x, y, z in frame pixels (z toward the viewer is negative)
    ("ctrl_xyz", (N_CTRL, 3), torch.float32),
    # displacement of every control point per unit of every motion channel (px; head rows zero)
    ("ctrl_basis", (N_CHANNELS, N_CTRL, 3), torch.float32),
    # how much each control point follows the jaw's rotation, 0..1
    ("ctrl_jaw", (N_CTRL,), torch.float32),
    # anchors (rigid points, no expression): mouth centre, skull triangle (3), mandible
    # triangle (3), between the eyes; and how much each follows the jaw
    ("anchor_xyz", (N_ANCHORS, 3), torch.float32),
    ("anchor_jaw", (N_ANCHORS,), torch.float32),
    # jaw hinge and neck pivot (frame px, z px), face width (px)
    ("jaw_hinge", (3,), torch.float32),
    ("head_pivot", (3,), torch.float32),
    ("face_width", (1,), torch.float32),
    # TPS operator for the main window's coarse grid, faded to zero on the still body; the inner
    # lips are left out (where the lips part, the mouth layers take over)
    ("main_operator", (GRID * GRID, N_CTRL), torch.float32),
    # TPS operators for the mouth's source crop grid: [upper lip's field (the lower lip left out),
    # lower lip's field (the upper lip left out)], so neither folds where the lips part
    ("mouth_operator", (2, _MGH * _MGW, N_CTRL), torch.float32),
    # top-left of the mouth's source crop in the frame, px (x, y)
    ("mouth_src_origin", (2,), torch.float32),
    # mouth layers on the source crop. lip_upper / lip_lower: the photo with the mouth's inside
    # inpainted (RGB) + signed distance to the inner lip line (px, + toward that lip);
    # teeth_upper: premultiplied RGBA of the photo's visible mouth inside over shaded upper teeth,
    # + a cavity shading factor; teeth_lower: premultiplied RGBA of tongue, lower teeth and the
    # lower part of the photo's mouth inside
    ("mouth_lip_upper", (1, 4, MOUTH_SRC_H, MOUTH_SRC_W), torch.float32),
    ("mouth_lip_lower", (1, 4, MOUTH_SRC_H, MOUTH_SRC_W), torch.float32),
    ("mouth_teeth_upper", (1, 5, MOUTH_SRC_H, MOUTH_SRC_W), torch.float32),
    ("mouth_teeth_lower", (1, 4, MOUTH_SRC_H, MOUTH_SRC_W), torch.float32),
    # 1 between the mouth corners, 0 beyond them, on the source crop grid: where the upper and
    # lower layers may differ (beyond the corners they share the main map, so no seam)
    ("mouth_blend", (1, 1, _MGH, _MGW), torch.float32),
    # colour of the mouth's dark inside, RGB 0..255
    ("cavity_rgb", (3,), torch.float32),
)
RIG_INPUT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in RIG_INPUTS)

_HEAD = (INDEX["yaw"], INDEX["pitch"], INDEX["roll"], INDEX["tx"], INDEX["ty"], INDEX["scale"])
_JAW = INDEX["jaw_open"]
_DEG = math.pi / 180.0


def _rotation(yaw: Tensor, pitch: Tensor, roll: Tensor) -> Tensor:
    """Head rotation (radians, 0-dim tensors) -> (3, 3). Image axes: x right, y down, z away.

    Applied as yaw (about y), then pitch (about x), then roll (about the view axis). Signs follow
    avatar/motion.py: + yaw turns the face to the viewer's right (the nose, which has negative z,
    moves +x), + pitch tips the chin down (the nose moves +y), + roll is clockwise on screen.
    """
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    r_yaw = torch.stack([cy, zero, -sy, zero, one, zero, sy, zero, cy]).view(3, 3)
    r_pitch = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp]).view(3, 3)
    r_roll = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one]).view(3, 3)
    return r_roll @ r_pitch @ r_yaw


def _minus_identity(r: Tensor) -> Tensor:
    """R - I, exactly zero when every angle is zero (so neutral motion stays exact)."""
    return r - torch.eye(3, dtype=r.dtype)


def move_points(motion: Tensor, xyz: Tensor, basis: Tensor | None, jaw_weight: Tensor, jaw_hinge: Tensor,
                head_pivot: Tensor, face_width: Tensor) -> Tensor:
    """Points under a motion vector: expression patterns, jaw rotation, then the rigid head.

    motion (1, N_CHANNELS); xyz (P, 3) px; basis (N_CHANNELS, P, 3) or None; jaw_weight (P,)
    -> displacement (P, 3) px. Built from terms that are exactly zero at neutral.
    """
    m = motion[0]
    zero = torch.zeros_like(m[0])
    # the mandible swings about a horizontal axis through the hinge: chin down and back
    jaw_r = _minus_identity(_rotation(zero, m[_JAW] * (JAW_MAX_DEG * _DEG), zero))
    offset = jaw_weight[:, None] * ((xyz - jaw_hinge) @ jaw_r.T)
    if basis is not None:
        offset = offset + torch.einsum("c,cpd->pd", m, basis)
    r = _rotation(m[_HEAD[0]] * _DEG, m[_HEAD[1]] * _DEG, m[_HEAD[2]] * _DEG)
    scaled = torch.exp(m[_HEAD[5]]) * r
    shift = torch.stack([m[_HEAD[3]], m[_HEAD[4]], zero]) * face_width
    head = (xyz + offset - head_pivot) @ _minus_identity(scaled).T + shift
    return offset + head


def _normalise(x: Tensor, origin: Tensor, extent: tuple[int, int]) -> Tensor:
    """Pixel positions (..., 2) -> grid_sample coordinates of an image of extent (w, h) px whose
    top-left pixel centre is at `origin` (align_corners=False convention)."""
    size = torch.tensor([float(extent[0]), float(extent[1])])
    return (2.0 * (x - origin) + 1.0) / size - 1.0


def _sample(image: Tensor, x: Tensor, origin: Tensor, extent: tuple[int, int]) -> Tensor:
    """image (1, C, h, w) sampled at pixel positions x (1, H, W, 2) -> (1, C, H, W), bilinear."""
    return F.grid_sample(image, _normalise(x, origin, extent), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _with_gradient(forward: Tensor) -> Tensor:
    """(1, 2, h, w) displacement on a grid of `step` px -> (1, 6, h, w): d and its Jacobian
    [dx, dy, d(dx)/dx, d(dx)/dy, d(dy)/dx, d(dy)/dy] per px, by central differences."""
    p = F.pad(forward, (1, 1, 1, 1), mode="replicate")
    ddx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) * 0.5
    ddy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) * 0.5
    return torch.cat([forward, ddx[:, :1], ddy[:, :1], ddx[:, 1:], ddy[:, 1:]], dim=1)


def invert_field(forward: Tensor, nodes: Tensor, origin: Tensor, extent: tuple[int, int], step: int,
                 iters: int = NEWTON_ITERS) -> Tensor:
    """Backward map of a forward displacement field: solve x + d(x) = y by guarded Newton steps.

    forward: (1, 2, h, w) px displacement at source positions, nodes every `step` px over `extent`
             px from `origin` (frame px)
    nodes:   (1, H, W, 2) output positions (frame px) to invert at
    -> (1, H, W, 2) source positions x; where the map folds and no step converges, the iterate
    with the smallest residual. At zero displacement every step is exactly zero.
    """
    field = _with_gradient(forward)
    scale = 1.0 / step
    x = nodes
    best, best_err = nodes, torch.full_like(nodes[..., :1], float("inf"))
    for _ in range(iters):
        s = _sample(field, x, origin, extent).permute(0, 2, 3, 1)  # (1, H, W, 6)
        r = x + s[..., 0:2] - nodes
        err = r.square().sum(-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, x, best)
        best_err = torch.where(better, err, best_err)
        a = 1.0 + s[..., 2:3] * scale  # J = I + grad d, rows (a b; c e)
        b = s[..., 3:4] * scale
        c = s[..., 4:5] * scale
        e = 1.0 + s[..., 5:6] * scale
        det = a * e - b * c
        det = torch.where(det.abs() < 0.05, torch.full_like(det, 0.05), det)  # folded: damp
        dx = (e * r[..., 0:1] - b * r[..., 1:2]) / det
        dy = (a * r[..., 1:2] - c * r[..., 0:1]) / det
        delta = torch.cat([dx, dy], dim=-1)
        length = delta.square().sum(-1, keepdim=True).sqrt()
        delta = delta * (NEWTON_MAX_STEP_PX / length.clamp(min=NEWTON_MAX_STEP_PX))
        x = x - delta
    s = _sample(field[:, 0:2], x, origin, extent).permute(0, 2, 3, 1)
    err = (x + s - nodes).square().sum(-1, keepdim=True)
    return torch.where(err < best_err, x, best)


def _affine_backward(source: Tensor, moved: Tensor, pixels: Tensor) -> Tensor:
    """The affine map that takes 3 moved points back to their sources, applied to pixels.

    source, moved: (3, 2) px; pixels (1, H, W, 2) -> (1, H, W, 2). Explicit 2x2 inverse."""
    s = (source[1:] - source[0]).T  # (2, 2) columns are edge vectors
    o = (moved[1:] - moved[0]).T
    det = o[0, 0] * o[1, 1] - o[0, 1] * o[1, 0]
    o_inv = torch.stack([o[1, 1], -o[0, 1], -o[1, 0], o[0, 0]]).view(2, 2) / det
    b = s @ o_inv
    return source[0] + (pixels - moved[0]) @ b.T


def _grid_nodes(w: int, h: int, step: int) -> Tensor:
    """(1, h // step, w // step, 2) pixel positions (x, y) of coarse nodes over a w x h image."""
    kx = torch.arange(w // step, dtype=torch.float32) * step + (step - 1) / 2.0
    ky = torch.arange(h // step, dtype=torch.float32) * step + (step - 1) / 2.0
    yy, xx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([xx, yy], dim=-1)[None]


def _upsample(coarse: Tensor, w: int, h: int) -> Tensor:
    """(1, H, W, 2) coarse node shifts -> (1, h, w, 2) per pixel, bilinear between nodes (held
    constant past the outermost nodes, so interpolate shifts, never absolute positions)."""
    dense = F.interpolate(coarse.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
    return dense.permute(0, 2, 3, 1)


def _edge_weight(w: int, h: int, step: int, margin: float) -> Tensor:
    """(1, h // step, w // step, 1): 0 at the border of a w x h window, 1 from `margin` px in."""
    n = _grid_nodes(w, h, step)[0]
    d = torch.minimum(torch.minimum(n[..., 0], w - 1 - n[..., 0]), torch.minimum(n[..., 1], h - 1 - n[..., 1]))
    t = (d / margin).clamp(0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t))[None, ..., None]


class FaceDecoder(nn.Module):
    """motion (1, N_CHANNELS) float32 + rig tensors (RIG_INPUTS) -> frame (1, 512, 512, 3) uint8."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window_nodes", _grid_nodes(WIN, WIN, STEP), persistent=False)
        self.register_buffer("window_pixels", _grid_nodes(WIN, WIN, 1), persistent=False)
        self.register_buffer("mouth_nodes", _grid_nodes(MOUTH_W, MOUTH_H, STEP), persistent=False)
        self.register_buffer("mouth_pixels", _grid_nodes(MOUTH_W, MOUTH_H, 1), persistent=False)
        self.register_buffer("mouth_edge", _edge_weight(MOUTH_W, MOUTH_H, STEP, 20.0), persistent=False)
        iy, ix = torch.meshgrid(torch.arange(MOUTH_H), torch.arange(MOUTH_W), indexing="ij")
        self.register_buffer("mouth_index", (iy * WIN + ix).reshape(1, -1), persistent=False)

    def forward(self, motion: Tensor, photo_rgbm: Tensor, photo_u8: Tensor, window_background: Tensor,
                frame_source: Tensor, window_origin: Tensor, ctrl_xyz: Tensor, ctrl_basis: Tensor,
                ctrl_jaw: Tensor, anchor_xyz: Tensor, anchor_jaw: Tensor,
                jaw_hinge: Tensor, head_pivot: Tensor, face_width: Tensor, main_operator: Tensor,
                mouth_operator: Tensor, mouth_src_origin: Tensor, mouth_lip_upper: Tensor,
                mouth_lip_lower: Tensor, mouth_teeth_upper: Tensor, mouth_teeth_lower: Tensor,
                mouth_blend: Tensor, cavity_rgb: Tensor) -> Tensor:
        pose = (jaw_hinge, head_pivot, face_width)
        displacement = move_points(motion, ctrl_xyz, ctrl_basis, ctrl_jaw, *pose)[:, :2]
        anchors = anchor_xyz[:, :2] + move_points(motion, anchor_xyz, None, anchor_jaw, *pose)[:, :2]

        # -- head window: main forward field on the coarse grid -> backward map -> dense sampling
        main_forward = (main_operator @ displacement).T.reshape(1, 2, GRID, GRID)
        main_map = lambda nodes: invert_field(main_forward, nodes, window_origin, (WIN, WIN), STEP)  # noqa: E731
        nodes = self.window_nodes + window_origin
        shift = _upsample(main_map(nodes) - nodes, WIN, WIN)  # (1, WIN, WIN, 2) backward shift, px
        sampled = _sample(photo_rgbm, self.window_pixels + window_origin + shift, torch.zeros(2),
                          (FRAME_SIZE, FRAME_SIZE))  # (1, 4, WIN, WIN)
        rgb, person = sampled[:, :3], sampled[:, 3:]
        # where the map has moved, the person's own mask decides between person and background;
        # where it has not (all of it at neutral), the photo shows as is, exactly
        moved = (shift.square().sum(-1, keepdim=True).sqrt() / ALPHA_RAMP_PX).clamp(max=1.0)
        alpha = 1.0 - (1.0 - person) * moved.permute(0, 3, 1, 2)
        window = torch.lerp(window_background, rgb, alpha).reshape(3, N_WIN)

        # -- mouth window: layers cut along the inner lip line, placed where the mouth now is
        low = window_origin
        high = window_origin + torch.tensor([float(WIN - MOUTH_W), float(WIN - MOUTH_H)])
        at = torch.tensor([MOUTH_ANCHOR_AT[0] * MOUTH_W, MOUTH_ANCHOR_AT[1] * MOUTH_H])
        mouth_origin = torch.round(torch.minimum(torch.maximum(anchors[0] - at, low), high))
        mouth = self._mouth(displacement, anchor_xyz[:, :2], anchors, mouth_origin, main_map, mouth_operator, mouth_src_origin,
                            mouth_lip_upper, mouth_lip_lower, mouth_teeth_upper, mouth_teeth_lower,
                            mouth_blend, cavity_rgb)  # (1, 3, MOUTH_H, MOUTH_W)
        offset = (mouth_origin - window_origin).to(torch.int64)
        index = (self.mouth_index + offset[1] * WIN + offset[0]).expand(3, -1)
        window = window.scatter(1, index, mouth.reshape(3, -1))

        window_u8 = (window + 0.5).clamp(0.0, 255.0).to(torch.uint8).T  # (N_WIN, 3)
        frame = torch.cat([photo_u8, window_u8], dim=0).index_select(0, frame_source)
        return frame.view(1, FRAME_SIZE, FRAME_SIZE, 3)

    def _mouth(self, displacement: Tensor, anchor_src: Tensor, anchors: Tensor, origin: Tensor, main_map, operator: Tensor,
               src_origin: Tensor, lip_upper: Tensor, lip_lower: Tensor, teeth_upper: Tensor,
               teeth_lower: Tensor, blend: Tensor, cavity_rgb: Tensor) -> Tensor:
        """The mouth window (1, 3, MOUTH_H, MOUTH_W), back to front: cavity, lower teeth and
        tongue (with the mandible), upper teeth (with the skull), lower lip, upper lip."""
        src_extent = (MOUTH_SRC_W, MOUTH_SRC_H)
        nodes = self.mouth_nodes + origin
        forward = (operator @ displacement).permute(0, 2, 1).reshape(2, 2, _MGH, _MGW)
        main = main_map(nodes)
        upper = invert_field(forward[0:1], nodes, src_origin, src_extent, MOUTH_SRC_STEP)
        lower = invert_field(forward[1:2], nodes, src_origin, src_extent, MOUTH_SRC_STEP)
        # the two lip maps differ only between the corners and fade into the main map at the edges
        beta = _sample(blend, main, src_origin, src_extent).permute(0, 2, 3, 1) * self.mouth_edge
        pixels = self.mouth_pixels + origin
        upper = pixels + _upsample(main + beta * (upper - main) - nodes, MOUTH_W, MOUTH_H)
        lower = pixels + _upsample(main + beta * (lower - main) - nodes, MOUTH_W, MOUTH_H)
        # teeth are rigid: the upper set rides the skull, the lower set the mandible
        skull = _affine_backward(anchor_src[1:4], anchors[1:4], pixels)
        mandible = _affine_backward(anchor_src[4:7], anchors[4:7], pixels)
        lu = _sample(lip_upper, upper, src_origin, src_extent)
        ll = _sample(lip_lower, lower, src_origin, src_extent)
        tu = _sample(teeth_upper, skull, src_origin, src_extent)
        tl = _sample(teeth_lower, mandible, src_origin, src_extent)
        out = cavity_rgb.view(1, 3, 1, 1) * tu[:, 4:5]
        out = tl[:, :3] + (1.0 - tl[:, 3:4]) * out  # premultiplied "over"
        out = tu[:, :3] + (1.0 - tu[:, 3:4]) * out
        # each lip is opaque on its side of the cut and fades over LIP_FEATHER_PX into the mouth
        out = torch.lerp(out, ll[:, :3], (1.0 + ll[:, 3:4] / LIP_FEATHER_PX).clamp(0.0, 1.0))
        out = torch.lerp(out, lu[:, :3], (1.0 + lu[:, 3:4] / LIP_FEATHER_PX).clamp(0.0, 1.0))
        return out
