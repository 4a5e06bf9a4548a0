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

WIN = 384  # head window side, px, 1:1 with the frame
STEP = 8  # coarse grid spacing, px
GRID = WIN // STEP  # 48 coarse nodes per side; node k sits at pixel STEP * k + (STEP - 1) / 2
N_CTRL = 256  # control points, padded with inert zeros
N_FIELDS = 3  # main, upper (lips and above follow the skull), lower (follow the jaw)
FIXED_POINT_ITERS = 5  # backward-map iterations; error shrinks ~ |grad d|^k
ALPHA_RAMP_PX = 1.5  # backward shift (px) over which the person layer switches to alpha compositing

JAW_MAX_DEG = 16.0  # jaw_open = 1: the mandible's rotation about the hinge

N_PIX = FRAME_SIZE * FRAME_SIZE
N_WIN = WIN * WIN

RIG_INPUTS: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = (
    # the framed photo (RGB 0..255) and person mask (0..1) stacked, sampled by the head window
    ("photo_rgbm", (1, 4, FRAME_SIZE, FRAME_SIZE), torch.float32),
    # the frame as uint8, flattened to pixels: what the frame shows outside the head window
    ("photo_u8", (N_PIX, 3), torch.uint8),
    # the inpainted background under the head window, RGB 0..255
    ("window_background", (1, 3, WIN, WIN), torch.float32),
    # for each frame pixel, its index into cat(photo_u8, window pixels): the paste-back
    ("frame_source", (N_PIX,), torch.int64),
    # normalised grid_sample coordinates (into the frame) of each window pixel centre
    ("window_grid", (1, WIN, WIN, 2), torch.float32),
    # control points: source x, y, z in frame pixels (z toward the viewer is negative)
    ("ctrl_xyz", (N_CTRL, 3), torch.float32),
    # displacement of every control point per unit of every motion channel (px; head rows zero)
    ("ctrl_basis", (N_CHANNELS, N_CTRL, 3), torch.float32),
    # how much each control point follows the jaw's rotation, 0..1
    ("ctrl_jaw", (N_CTRL,), torch.float32),
    # per field, two control-point indices whose displacements are averaged: how each field
    # re-routes the lips (upper field: lower lip follows upper; lower field: the reverse)
    ("field_routes", (N_FIELDS, 2, N_CTRL), torch.int64),
    # jaw hinge and neck pivot (frame px, z px), face width (px)
    ("jaw_hinge", (3,), torch.float32),
    ("head_pivot", (3,), torch.float32),
    ("face_width", (1,), torch.float32),
    # TPS operator for the main window's coarse grid, head-weighted: (GRID*GRID, N_CTRL)
    ("main_operator", (GRID * GRID, N_CTRL), torch.float32),
)
RIG_INPUT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in RIG_INPUTS)

_HEAD = (INDEX["yaw"], INDEX["pitch"], INDEX["roll"], INDEX["tx"], INDEX["ty"], INDEX["scale"])
_JAW = INDEX["jaw_open"]


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
    """R - I, computed so that it is exactly zero when every angle is zero (neutral stays exact)."""
    return r - torch.eye(3, dtype=r.dtype)


def move_controls(motion: Tensor, ctrl_xyz: Tensor, ctrl_basis: Tensor, ctrl_jaw: Tensor,
                  jaw_hinge: Tensor, head_pivot: Tensor, face_width: Tensor) -> tuple[Tensor, Tensor]:
    """Control points under a motion vector.

    motion (1, N_CHANNELS); ctrl_xyz (K, 3); ctrl_basis (N_CHANNELS, K, 3); ctrl_jaw (K,)
    -> displacement (K, 2) px in the image plane, and moved positions (K, 3).
    Displacements are built as sums of exact zeros at neutral, so zero motion moves nothing.
    """
    m = motion[0]
    expression = torch.einsum("c,ckd->kd", m, ctrl_basis)  # (K, 3)
    jaw_angle = m[_JAW] * (JAW_MAX_DEG * math.pi / 180.0)
    zero = torch.zeros_like(jaw_angle)
    # the mandible swings about a horizontal axis through the hinge: chin down and back
    jaw_r = _minus_identity(_rotation(zero, jaw_angle, zero))
    jaw = ctrl_jaw[:, None] * ((ctrl_xyz - jaw_hinge) @ jaw_r.T)
    face = ctrl_xyz + expression + jaw  # (K, 3)
    offset = expression + jaw

    deg = math.pi / 180.0
    r = _rotation(m[_HEAD[0]] * deg, m[_HEAD[1]] * deg, m[_HEAD[2]] * deg)
    scaled = torch.exp(m[_HEAD[5]]) * r
    shift = torch.stack([m[_HEAD[3]], m[_HEAD[4]], zero]) * face_width
    head = (face - head_pivot) @ _minus_identity(scaled).T + shift  # (K, 3)
    moved = ctrl_xyz + offset + head
    return (offset + head)[:, :2], moved


def field_displacements(displacement: Tensor, field_routes: Tensor) -> Tensor:
    """(K, 2) true control displacements -> (K, 2 * N_FIELDS): each field's re-routed copy."""
    a = displacement[field_routes[:, 0]]  # (N_FIELDS, K, 2)
    b = displacement[field_routes[:, 1]]
    routed = 0.5 * (a + b)
    return routed.permute(1, 0, 2).reshape(-1, 2 * N_FIELDS)


def invert_field(forward: Tensor, nodes: Tensor, size: float, iters: int = FIXED_POINT_ITERS) -> Tensor:
    """Backward map of a forward displacement field, by fixed-point iteration x <- y - d(x).

    forward: (1, 2, G, G) px displacement at source nodes spanning a square of `size` px
    nodes:   (1, H, W, 2) output positions (px in the same square) to invert at
    -> (1, H, W, 2) source positions x with x + d(x) = y.
    """
    scale = 2.0 / size

    def d(x: Tensor) -> Tensor:
        g = (x + 0.5) * scale - 1.0
        return F.grid_sample(forward, g, mode="bilinear", padding_mode="border",
                             align_corners=False).permute(0, 2, 3, 1)

    x = nodes - d(nodes)
    for _ in range(iters - 1):
        x = nodes - d(x)
    return x


class FaceDecoder(nn.Module):
    """motion (1, N_CHANNELS) float32 + rig tensors (RIG_INPUTS) -> frame (1, 512, 512, 3) uint8."""

    def __init__(self):
        super().__init__()
        k = torch.arange(GRID, dtype=torch.float32) * STEP + (STEP - 1) / 2.0
        yy, xx = torch.meshgrid(k, k, indexing="ij")
        # coarse node positions in window px: (1, GRID, GRID, 2) as (x, y)
        self.register_buffer("nodes", torch.stack([xx, yy], dim=-1)[None], persistent=False)

    def forward(self, motion: Tensor, photo_rgbm: Tensor, photo_u8: Tensor, window_background: Tensor,
                frame_source: Tensor, window_grid: Tensor, ctrl_xyz: Tensor, ctrl_basis: Tensor,
                ctrl_jaw: Tensor, field_routes: Tensor, jaw_hinge: Tensor, head_pivot: Tensor,
                face_width: Tensor, main_operator: Tensor) -> Tensor:
        displacement, _ = move_controls(motion, ctrl_xyz, ctrl_basis, ctrl_jaw, jaw_hinge, head_pivot,
                                        face_width)
        fields = field_displacements(displacement, field_routes)  # (K, 6)

        # main window: forward field on the coarse grid -> backward map -> dense sampling grid
        forward = (main_operator @ fields[:, 0:2]).T.reshape(1, 2, GRID, GRID)
        source = invert_field(forward, self.nodes, float(WIN))  # (1, G, G, 2) window px
        shift = (source - self.nodes).permute(0, 3, 1, 2)  # (1, 2, G, G) backward shift, px
        shift = F.interpolate(shift, size=(WIN, WIN), mode="bilinear", align_corners=False)
        shift = shift.permute(0, 2, 3, 1)  # (1, WIN, WIN, 2)
        grid = window_grid + shift * (2.0 / FRAME_SIZE)
        sampled = F.grid_sample(photo_rgbm, grid, mode="bilinear", padding_mode="border",
                                align_corners=False)  # (1, 4, WIN, WIN)
        rgb, person = sampled[:, :3], sampled[:, 3:]
        # where the map has moved, the person's own mask decides between person and background;
        # where it has not (all of it at neutral), the photo shows as is, exactly
        moved = (shift.square().sum(-1, keepdim=True).sqrt() / ALPHA_RAMP_PX).clamp(max=1.0)
        alpha = 1.0 - (1.0 - person) * moved.permute(0, 3, 1, 2)
        window = torch.lerp(window_background, rgb, alpha)  # (1, 3, WIN, WIN)

        window_u8 = (window + 0.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).reshape(N_WIN, 3)
        frame = torch.cat([photo_u8, window_u8], dim=0).index_select(0, frame_source)
        return frame.view(1, FRAME_SIZE, FRAME_SIZE, 3)
