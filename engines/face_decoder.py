"""FaceDecoder: motion vector + portrait rig -> one 512x512 RGB frame. A training-free 2.5D renderer.

    frame = FaceDecoder()(motion, *rig.inputs())
    motion: (1, N_CHANNELS) float32, channels as in avatar/motion.py
    frame:  (1, FRAME_SIZE, FRAME_SIZE, 3) uint8 RGB

The rig inputs follow RIG_INPUTS below (name, shape, dtype, in order); `avatar/rig.py` builds them
once per portrait. Shapes are fixed and never depend on the portrait, so one exported graph serves
every portrait. Pure: no I/O, no randomness. Traced, exported or on a GPU there is no data-dependent
control flow; eager on the CPU (where a host read costs nothing) the decoder skips the work it can
prove invisible (head-window tiles that can show only the background or have not moved, teeth
covered by the lips, eyeballs outside the eye opening) and gives the very same pixels.

How a frame is made:
1. Control points (face landmarks, a ring of hair/skull points, anchors on the still body) move:
   expression channels add per-point displacement patterns, jaw_open swings the lower face about
   a hinge below and behind the ears, then the head turns rigidly in 3D about a neck pivot and is
   scaled and shifted.
2. Their 2D displacements become forward displacement fields on coarse grids through precomputed
   thin-plate-spline operators (W = K_grid . L^-1: one matmul, no per-frame solve), inverted into
   backward maps by guarded Newton steps on the coarse nodes, then upsampled.
3. Head window (a fixed square over the head, 1:1 with the frame): the photo and its person mask
   are sampled through the main map and composited over the inpainted background, so the room
   stays still where the head leaves it.
4. Mouth window (follows the mouth): layers cut along the inner lip line. Back to front: a shaded
   cavity, tongue and lower teeth riding the mandible, upper teeth (the photo's own where visible)
   riding the skull, then the lower and upper lips, each warped by its own field.
5. Eye window (follows the eyes): in the photo's coordinates, per eye along its own axis, lid skin
   is stretched over the eyeball as the lids close; in the opening that remains, the sclera and the
   iris (moved by the gaze) show through.
6. The windows are written into the head window, and the head window into the photo.
At zero motion every displacement is an exact zero, so the photo comes back unchanged.
"""

from __future__ import annotations

import math
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar.constants import FRAME_SIZE
from avatar.motion import INDEX, N_CHANNELS

WIN = 448  # head window side, px, 1:1 with the frame
STEP = 16  # node spacing of the head window's map, px (the head's motion is smooth)
GRID = WIN // STEP  # 28 nodes per side; node k sits at pixel STEP * k + (STEP - 1) / 2
SUB_STEP = 8  # node spacing of the mouth and eye windows' maps, px
N_CTRL = 256  # control points, padded with inert zeros; the last N_ANCHORS are anchors
N_ANCHORS = 9  # rigid points: mouth centre, skull triangle (3), mandible triangle (3), two eye centres
NEWTON_ITERS = 3  # backward-map iterations (guarded Newton), starting from the identity
NEWTON_MAX_STEP_PX = 12.0  # a longer step is shortened (the map may fold)
ALPHA_RAMP_PX = 1.5  # backward shift (px) over which the person layer switches to alpha compositing
JAW_MAX_DEG = 13.0  # jaw_open = 1: the mandible's rotation about the hinge

MOUTH_W, MOUTH_H = 176, 144  # mouth window, px; it follows the mouth on screen
MOUTH_ANCHOR_AT = (0.5, 0.36)  # where the mouth centre sits in the window (fractions)
MOUTH_SRC_W, MOUTH_SRC_H = 256, 224  # source crop of the mouth layers, px
MOUTH_SRC_STEP = 8  # node spacing of the lip fields on the source crop
MOUTH_LAYERS = 4  # upper lip, lower lip, upper teeth, lower teeth (see RIG_INPUTS)
LIP_FEATHER_PX = 1.5  # a moving lip's inner edge fades over this many (source) px into the mouth

EYE_W, EYE_H = 96, 64  # one window per eye, px; each follows its eye on screen
EYES_SRC_W, EYES_SRC_H = 288, 112  # source crop of the eye layers (both eyes), px
LID_FEATHER_PX = 1.0  # the eye opening fades over this many px, inside the opening
BLINK_CLOSURE = 0.62  # closed lids meet this far down the opening (slightly below the middle)
EYEBALL_RADIUS_IRIS = 2.2  # eyeball radius in iris radii: how far the iris travels per degree

N_PIX = FRAME_SIZE * FRAME_SIZE
N_WIN = WIN * WIN
_MGW, _MGH = MOUTH_SRC_W // MOUTH_SRC_STEP, MOUTH_SRC_H // MOUTH_SRC_STEP
assert _MGW >= GRID and _MGH >= GRID, "the main field is padded to the lips' lattice for one inversion"

RIG_INPUTS: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = (
    # the framed photo, RGB 0..255, and its person mask 0..1, stacked
    ("photo_rgbm", (1, 4, FRAME_SIZE, FRAME_SIZE), torch.float32),
    # the frame's pixels outside the head window (row by row), uint8: shown as they are
    ("photo_u8", (N_PIX - N_WIN, 3), torch.uint8),
    # the inpainted background under the head window, RGB 0..255
    ("window_background", (1, 3, WIN, WIN), torch.float32),
    # for each frame pixel, its index into cat(photo_u8, window pixels): the paste-back
    ("frame_source", (N_PIX,), torch.int32),
    # the head window's top-left pixel in the frame (x, y)
    ("window_origin", (2,), torch.float32),
    # control points: source x, y, z in frame px (z toward the viewer is negative). The last
    # N_ANCHORS rows are anchors, moved like the rest but outside every warp operator: the mouth
    # centre, a skull and a mandible triangle (the teeth ride them), the two eye centres
    ("ctrl_xyz", (N_CTRL, 3), torch.float32),
    # each control point's displacement per unit of each motion channel (px; head rows zero)
    ("ctrl_basis", (N_CHANNELS, N_CTRL, 3), torch.float32),
    # how much each control point follows the mandible, 0..1
    ("ctrl_jaw", (N_CTRL,), torch.float32),
    # jaw hinge and neck pivot (x, y, z px), face width (px)
    ("jaw_hinge", (3,), torch.float32),
    ("head_pivot", (3,), torch.float32),
    ("face_width", (1,), torch.float32),
    # TPS operator to the head window's nodes, faded to zero on the still body; the inner lips
    # are left out of it (where the lips part the mouth layers take over)
    ("main_operator", (GRID * GRID, N_CTRL), torch.float32),
    # TPS operators to the mouth crop's nodes: [upper lip's field, without the lower lip;
    # lower lip's field, without the upper lip], so neither folds where the lips part
    ("mouth_operator", (2, _MGH * _MGW, N_CTRL), torch.float32),
    # the mouth's source crop: top-left pixel in the frame (x, y) and its layers, 5 channels each:
    #   0 upper lip: the photo with the mouth's inside inpainted (RGB), signed distance to the
    #     upper inner lip line (px, + toward the lip), 0
    #   1 lower lip: the same, distance to the lower inner lip line
    #   2 upper teeth: premultiplied RGBA of the photo's visible mouth inside over shaded upper
    #     teeth, + the cavity's shading factor
    #   3 lower teeth: premultiplied RGBA of the tongue, lower teeth and the photo's mouth inside
    #     below the upper teeth's biting edge, 0
    ("mouth_src_origin", (2,), torch.float32),
    ("mouth_layers", (MOUTH_LAYERS, 5, MOUTH_SRC_H, MOUTH_SRC_W), torch.float32),
    # 1 between the mouth corners, 0 beyond them (on the lip fields' nodes): where the upper and
    # lower lips may follow different fields (beyond the corners both follow the main map)
    ("mouth_blend", (1, 1, _MGH, _MGW), torch.float32),
    # colour of the mouth's dark inside, RGB 0..255
    ("cavity_rgb", (3,), torch.float32),
    # per eye [subject's right, subject's left]: centre x, y (px), axis x, y (unit, corner to
    # corner toward +x), half-width (px), crease above and below the lids (px), iris radius (px),
    # the lids' margin bands (upper, lower; px) that move with them (lashes, lid shadow)
    ("eye_frame", (2, 10), torch.float32),
    # per eye, upper and lower lid margins: v (px, down the eye's normal) as quartics in
    # sigma = u / half-width, coefficients from sigma^0 up
    ("eye_lids", (2, 2, 5), torch.float32),
    # the eyes' source crop: top-left pixel in the frame (x, y); the eyeballs with the irises
    # removed (sclera inpainted, RGB) and the irises as full discs (RGB + signed distance to the
    # disc's edge, px, + inside)
    ("eye_src_origin", (2,), torch.float32),
    ("eye_ball", (1, 3, EYES_SRC_H, EYES_SRC_W), torch.float32),
    ("eye_iris", (1, 4, EYES_SRC_H, EYES_SRC_W), torch.float32),
)
RIG_INPUT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in RIG_INPUTS)

_HEAD = tuple(INDEX[n] for n in ("yaw", "pitch", "roll", "tx", "ty", "scale"))
_JAW = INDEX["jaw_open"]
_EYE_CHANNELS = tuple(INDEX[n] for n in ("blink_right", "blink_left", "smile_right", "smile_left", "squint",
                                          "eyes_wide", "gaze_yaw", "gaze_pitch"))
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
    return r - torch.eye(3, dtype=r.dtype, device=r.device)


def move_points(motion: Tensor, xyz: Tensor, basis: Tensor | None, jaw_weight: Tensor, jaw_hinge: Tensor,
                head_pivot: Tensor, face_width: Tensor) -> Tensor:
    """Points under a motion vector: expression patterns, the jaw's swing, then the rigid head.

    motion (1, N_CHANNELS); xyz (P, 3) px; basis (N_CHANNELS, P, 3) or None; jaw_weight (P,)
    -> displacement (P, 3) px, built from terms that are exactly zero at neutral.
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


def _with_gradient(forward: Tensor, step: int) -> Tensor:
    """(B, 2, h, w) displacement on nodes `step` px apart -> (B, 6, h, w): d and its Jacobian
    [dx, dy, d(dx)/dx, d(dx)/dy, d(dy)/dx, d(dy)/dy] per px, by central differences."""
    p = F.pad(forward, (1, 1, 1, 1), mode="replicate")
    ddx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) * (0.5 / step)
    ddy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) * (0.5 / step)
    return torch.cat([forward, ddx[:, :1], ddy[:, :1], ddx[:, 1:], ddy[:, 1:]], dim=1)


def invert_field(field: Tensor, nodes: Tensor, origin: Tensor, inv_extent: Tensor) -> Tensor:
    """Backward maps of forward displacement fields: solve x + d(x) = y by guarded Newton steps.

    field:   (B, 6, h, w) from _with_gradient: px displacement and its Jacobian on nodes covering,
             for each batch entry, a region whose top-left pixel is origin[b] (frame px)
    origin, inv_extent: (B, 1, 1, 2) that top-left pixel, and 2 / the region's size (w, h) px
    nodes:   (B, 1, N, 2) output positions (frame px) to invert at
    -> (B, 1, N, 2) source positions x. Where the map folds and no step converges, the iterate with
    the smallest residual. At zero displacement every step is exactly zero.
    """
    x = nodes
    best, best_err = nodes, torch.full_like(nodes[..., :1], 3.0e38)
    to_grid = 0.5 * inv_extent - 1.0 - origin * inv_extent  # grid = x * inv_extent + to_grid
    for i in range(NEWTON_ITERS + 1):  # the last pass only scores the last step
        s = F.grid_sample(field, torch.addcmul(to_grid, x, inv_extent), mode="bilinear",
                          padding_mode="border", align_corners=False).permute(0, 2, 3, 1)
        r = x + s[..., 0:2] - nodes
        err = r.abs().sum(-1, keepdim=True)  # L1: no squares, so no subnormal floats (slow on CPUs)
        better = err < best_err
        best = torch.where(better, x, best)
        best_err = torch.where(better, err, best_err)
        if i == NEWTON_ITERS:
            break
        da, b, c, de = s[..., 2:6].unbind(-1)  # J = I + grad d = (a b; c e)
        a, e = da + 1.0, de + 1.0
        det = a * e - b * c
        det = torch.where(det.abs() < 0.05, 0.05, det)  # folded: damp the step
        rx, ry = r.unbind(-1)
        delta = torch.stack([e * rx - b * ry, a * ry - c * rx], dim=-1) / det.unsqueeze(-1)
        limit = NEWTON_MAX_STEP_PX / delta.abs().amax(-1, keepdim=True).clamp(min=NEWTON_MAX_STEP_PX)
        x = x - delta * limit
    return best


def _affine_back(source: Tensor, moved: Tensor) -> tuple[Tensor, Tensor]:
    """The affine maps taking moved triangles back to their sources, as (matrix (T, 2, 2), offset
    (T, 1, 2)) for points @ matrix + offset. source, moved: (T, 3, 2) px. Explicit 2x2 inverse
    (exports everywhere)."""
    s = source[:, 1:] - source[:, :1]  # (T, 2, 2), rows are edge vectors
    o = moved[:, 1:] - moved[:, :1]
    o00, o01, o10, o11 = o.reshape(-1, 4).unbind(-1)
    det = (o00 * o11 - o01 * o10).view(-1, 1, 1)
    o_inv = torch.stack([o11, -o01, -o10, o00], dim=-1).view(-1, 2, 2) / det  # rows: o^-1 (row vectors)
    matrix = o_inv @ s  # p_source = (p - moved0) @ o^-1 @ s + source0
    return matrix, source[:, :1] - moved[:, :1] @ matrix


def _nodes(w: int, h: int, step: int) -> Tensor:
    """(h // step, w // step, 2) pixel positions (x, y) of nodes every `step` px over w x h,
    each node at the centre of its step x step cell."""
    kx = torch.arange(w // step, dtype=torch.float32) * step + (step - 1) / 2.0
    ky = torch.arange(h // step, dtype=torch.float32) * step + (step - 1) / 2.0
    yy, xx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _interp_matrix(size: int, step: int) -> Tensor:
    """(size, size // step) bilinear weights from nodes `step` px apart (cell centres) to pixel
    centres, held constant past the outermost nodes: the interpolation grid_sample does with
    padding_mode="border", align_corners=False, as a matrix (each row two weights summing to 1)."""
    n = size // step
    s = ((torch.arange(size, dtype=torch.float64) + 0.5) / step - 0.5).clamp(0.0, n - 1)
    i0 = s.floor().long()
    f = s - i0
    i1 = (i0 + 1).clamp(max=n - 1)
    m = torch.zeros(size, n, dtype=torch.float64)
    m[torch.arange(size), i0] += 1.0 - f
    m[torch.arange(size), i1] += f
    return m.float()


def _upsample_mm(coarse: Tensor, rows: Tensor, cols_t: Tensor) -> Tensor:
    """(B, gh, gw, C) values on nodes (cell centres) -> (B, C, h, w) per pixel: bilinear between
    nodes, held constant past the outermost ones (so upsample shifts, never absolute positions).
    Separable, as two small matmuls (rows: (h, gh), cols_t: (gw, w), from _interp_matrix): on CPUs
    ~5x cheaper than grid_sample at the pixel centres; zero in, exactly zero out."""
    return rows @ (coarse.permute(0, 3, 1, 2) @ cols_t)


def _transposed(operator: Tensor) -> Tensor:
    """(..., nodes, K) operator(s) -> (K, all nodes) contiguous."""
    return operator.reshape(-1, operator.shape[-1]).T.contiguous()


def _channels_last(image: Tensor) -> Tensor:
    """The same (N, C, H, W) values stored channel by channel per pixel (a copy)."""
    return image.contiguous(memory_format=torch.channels_last)


def _tiled(image: Tensor) -> Tensor:
    """(C, WIN, WIN) -> (C, GRID^2, STEP^2): the head window tile by tile, each tile's pixels row by
    row (a copy)."""
    c = image.shape[0]
    return image.reshape(c, GRID, STEP, GRID, STEP).permute(0, 1, 3, 2, 4).reshape(c, GRID * GRID, STEP * STEP)


def _untiled(tiles: Tensor) -> Tensor:
    """_tiled's inverse: (C, GRID^2, STEP^2) -> (C, WIN, WIN)."""
    c = tiles.shape[0]
    return tiles.view(c, GRID, GRID, STEP, STEP).permute(0, 1, 3, 2, 4).reshape(c, WIN, WIN)


def _padded(index: Tensor, multiple: int = 64) -> Tensor:
    """index (n,) with its last entry repeated up to a multiple of `multiple`: element-wise kernels
    then run no scalar tail loop (whose rounding may differ from the vector body's), so sparse
    and dense evaluation give the same bits. Empty stays empty."""
    n = index.numel()
    short = -n % multiple
    return torch.cat([index, index[-1:].expand(short)]) if n and short else index


def _mouth_inside(cavity_rgb: Tensor, teeth_up: Tensor, teeth_low: Tensor) -> Tensor:
    """Inside the mouth, back to front: the shaded cavity, the lower teeth, the upper teeth
    (premultiplied "over"). Layers channel-first (5, ...) as in RIG_INPUTS' mouth_layers; cavity_rgb
    (3, 1, ...) broadcasting over them. -> (3, ...)"""
    out = cavity_rgb * teeth_up[4:5]
    out = teeth_low[:3] + (1.0 - teeth_low[3:4]) * out
    return teeth_up[:3] + (1.0 - teeth_up[3:4]) * out


def _lip_cover(distance: Tensor, sharpness: Tensor) -> Tensor:
    """How opaque a lip is per px, 0..1, from its signed distance to the inner lip line (+ toward
    the lip) and the sharpness of its edge (1 / px)."""
    return (1.0 + distance * sharpness).clamp(0.0, 1.0)


def _lips_over(inside: Tensor, lip_low: Tensor, lip_up: Tensor, cover_low: Tensor, cover_up: Tensor) -> Tensor:
    """Each lip over the mouth's inside: opaque on its side of the cut, fading (once it moves) into
    the mouth. inside (3, ...), lips channel-first (>= 3, ...), covers (...). -> (3, ...)"""
    out = torch.lerp(inside, lip_low[:3], cover_low)
    return torch.lerp(out, lip_up[:3], cover_up)


def _smoothstep(t: Tensor) -> Tensor:
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _tracing() -> bool:
    """True while the module is being traced, exported or compiled (one graph, no threads)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
        or torch.compiler.is_compiling()


def _in_mode(inference: bool, fn, *args):
    """fn(*args) without autograd, in the caller's inference mode (both are per thread)."""
    with torch.inference_mode(inference), torch.no_grad():
        return fn(*args)


def _window_origin(anchor: Tensor, at: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Top-left pixel of a window that puts `anchor` at `at`, kept inside [low, high]. (2,)"""
    return torch.round(torch.minimum(torch.maximum(anchor - at, low), high))


class FaceDecoder(nn.Module):
    """motion (1, N_CHANNELS) float32 + rig tensors (RIG_INPUTS) -> frame (1, 512, 512, 3) uint8."""

    def __init__(self):
        super().__init__()
        buf = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        wn = _nodes(WIN, WIN, STEP)
        mn = _nodes(MOUTH_W, MOUTH_H, SUB_STEP)
        en = _nodes(EYE_W, EYE_H, SUB_STEP)
        self.n_win, self.n_mouth, self.n_eye = wn.shape[0] * wn.shape[1], mn.shape[0] * mn.shape[1], en.shape[0] * en.shape[1]
        self.mouth_grid, self.eye_grid = mn.shape[:2], en.shape[:2]
        buf("window_nodes", wn.reshape(1, 1, -1, 2))
        buf("mouth_nodes", mn.reshape(1, 1, -1, 2))
        buf("eye_nodes", en.reshape(1, 1, -1, 2))
        buf("mouth_pixels", _nodes(MOUTH_W, MOUTH_H, 1)[None])
        # grid_sample coordinates (in the mouth crop) of the mouth window's pixels when the window
        # and the crop share their top-left corner
        mp = _nodes(MOUTH_W, MOUTH_H, 1)[None]
        buf("mouth_base_grid", (mp + 0.5) * torch.tensor([2.0 / MOUTH_SRC_W, 2.0 / MOUTH_SRC_H]) - 1.0)
        buf("eye_pixels", _nodes(EYE_W, EYE_H, 1)[None])
        # lip maps fade into the main map over the mouth window's outer 20 px
        d = torch.minimum(torch.minimum(mn[..., 0], MOUTH_W - 1 - mn[..., 0]),
                          torch.minimum(mn[..., 1], MOUTH_H - 1 - mn[..., 1]))
        buf("mouth_edge", _smoothstep(d / 20.0).reshape(1, 1, -1, 1))
        # the top-left pixel (x, y) of each head-window tile (tile (i, j): the STEP x STEP pixels
        # from (STEP * j, STEP * i)), (2, GRID, GRID)
        ty, tx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        buf("tile_corner", torch.stack([tx, ty]).float() * STEP)
        for name, (w, h) in (("mouth", (MOUTH_W, MOUTH_H)), ("eye", (EYE_W, EYE_H))):
            iy, ix = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            buf(f"{name}_index", (iy * WIN + ix).reshape(1, -1).expand(3, -1).contiguous())
        for name, (w, h), step in (("win", (WIN, WIN), STEP), ("mouth", (MOUTH_W, MOUTH_H), SUB_STEP),
                                    ("eye", (EYE_W, EYE_H), SUB_STEP)):
            buf(f"{name}_up_rows", _interp_matrix(h, step))
            buf(f"{name}_up_cols", _interp_matrix(w, step).T.contiguous())
        buf("inv_fields", torch.tensor([[2.0 / (_MGW * STEP), 2.0 / (GRID * STEP)], [2.0 / MOUTH_SRC_W, 2.0 / MOUTH_SRC_H],
                                        [2.0 / MOUTH_SRC_W, 2.0 / MOUTH_SRC_H]]).view(3, 1, 1, 2))
        buf("inv_mouth_src", torch.tensor([2.0 / MOUTH_SRC_W, 2.0 / MOUTH_SRC_H]))
        buf("inv_eyes_src", torch.tensor([2.0 / EYES_SRC_W, 2.0 / EYES_SRC_H]))
        buf("inv_frame", torch.tensor([2.0 / FRAME_SIZE, 2.0 / FRAME_SIZE]))
        # grid_sample x (and y) of the head window's pixel centres when its origin is at pixel 0
        buf("win_centres", ((torch.arange(WIN, dtype=torch.float64) * 2.0 + 1.0) / FRAME_SIZE - 1.0).float().expand(2, -1).contiguous())
        buf("mouth_at", torch.tensor([MOUTH_ANCHOR_AT[0] * MOUTH_W, MOUTH_ANCHOR_AT[1] * MOUTH_H]))
        buf("mouth_room", torch.tensor([float(WIN - MOUTH_W), float(WIN - MOUTH_H)]))
        buf("eye_at", torch.tensor([0.5 * EYE_W, 0.5 * EYE_H]))
        buf("eye_room", torch.tensor([float(WIN - EYE_W), float(WIN - EYE_H)]))
        self._pool: ThreadPoolExecutor | None = None
        self._per_rig: dict[str, tuple] = {}  # see _cached

    def parallel(self, workers: int = 1) -> FaceDecoder:
        """On the CPU, render the mouth and eye windows on `workers` threads of their own while the
        calling thread renders the head window (0: all in the calling thread). Op for op the same
        work, so the same pixels. Meant for one torch thread per op (torch.set_num_threads(1), as
        live runs): measured here, 1 worker took 16 % off a frame, where two intra-op threads took
        10 % and stall badly when the other core is busy. It costs CPU (measured on the AMD EPYC:
        29 ms of CPU a frame in one thread, 41 with the worker; 30 and 33 a day later), so offline
        render, which may let a frame wait, decodes whole frames side by side instead
        (avatar.pipeline.ordered_map).
        Traced, exported, scripted, compiled or on a GPU, the decoder runs in one thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        # torch's thread count is per thread (OpenMP's setting): a new thread would run every op on
        # as many threads as there are cores, spinning; measured here, 2x the CPU for the same work
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="face-decoder", initializer=torch.set_num_threads,
                                        initargs=(torch.get_num_threads(),)) if workers > 0 else None
        return self

    def _cached(self, name: str, make, *tensors: Tensor) -> Tensor:
        """make(*tensors), made once per rig (eager CPU only) and kept while these very tensors are
        unchanged (their in-place version counters included; inference tensors have none)."""
        key = tuple((id(t), None if t.is_inference() else t._version) for t in tensors)
        entry = self._per_rig.get(name)
        if entry is None or entry[0] != key or any(ref() is not t for ref, t in zip(entry[1], tensors)):
            entry = self._per_rig[name] = (key, tuple(weakref.ref(t) for t in tensors), make(*tensors))
        return entry[2]

    @staticmethod
    def _still_frame(photo_u8: Tensor, frame_source: Tensor) -> Tensor:
        """(FRAME_SIZE, FRAME_SIZE, 3) uint8: the frame outside the head window (zeros inside it)."""
        frame = torch.cat([photo_u8, photo_u8.new_zeros(N_WIN, 3)]).index_select(0, frame_source)
        return frame.view(FRAME_SIZE, FRAME_SIZE, 3)

    @staticmethod
    def _person_area(photo_rgbm: Tensor) -> Tensor:
        """(FRAME_SIZE + 1, FRAME_SIZE + 1) int32 summed-area table of the photo's pixels where the
        person mask is not zero: entry (y, x) counts them in rows < y, columns < x."""
        inside = (photo_rgbm[0, 3] > 0).to(torch.int32)
        return F.pad(inside.cumsum(0).cumsum(1), (1, 0, 1, 0)).to(torch.int32)

    @staticmethod
    def _photo_tiles(photo_rgbm: Tensor, window_origin: Tensor) -> Tensor:
        """(3, GRID^2, STEP^2) the photo's RGB under the head window, tile by tile."""
        x0, y0 = (int(v) for v in window_origin.tolist())
        return _tiled(photo_rgbm[0, 0:3, y0:y0 + WIN, x0:x0 + WIN])

    def __getstate__(self):  # copies and pickles carry no threads
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_pool"] = None
        state["_per_rig"] = {}
        return state

    def forward(self, motion: Tensor, photo_rgbm: Tensor, photo_u8: Tensor, window_background: Tensor,
                frame_source: Tensor, window_origin: Tensor, ctrl_xyz: Tensor,
                ctrl_basis: Tensor, ctrl_jaw: Tensor, jaw_hinge: Tensor, head_pivot: Tensor,
                face_width: Tensor, main_operator: Tensor, mouth_operator: Tensor, mouth_src_origin: Tensor,
                mouth_layers: Tensor, mouth_blend: Tensor, cavity_rgb: Tensor, eye_frame: Tensor,
                eye_lids: Tensor, eye_src_origin: Tensor, eye_ball: Tensor, eye_iris: Tensor) -> Tensor:
        displacement = move_points(motion, ctrl_xyz, ctrl_basis, ctrl_jaw, jaw_hinge, head_pivot,
                                   face_width)[:, :2]  # (K, 2) px
        anchor_src = ctrl_xyz[N_CTRL - N_ANCHORS:, :2]
        anchors = anchor_src + displacement[N_CTRL - N_ANCHORS:]  # where they are now
        high = window_origin + self.mouth_room
        mouth_origin = _window_origin(anchors[0], self.mouth_at, window_origin, high)
        eye_origin = _window_origin(anchors[7:9], self.eye_at, window_origin, window_origin + self.eye_room)  # (2, 2)

        # -- the main map at every node of every window and the two lips' maps on the mouth's nodes,
        # in one inversion: three fields on one lattice of nodes (the main one's padded to the lips')
        mouth_nodes = self.mouth_nodes + mouth_origin  # (1, 1, n, 2)
        nodes = torch.cat([self.window_nodes + window_origin, mouth_nodes,
                           self.eye_nodes + eye_origin[0], self.eye_nodes + eye_origin[1]], dim=2)  # (1, 1, N, 2)
        # the operators applied as (2, K) @ (K, nodes): a matmul with 2 columns, operator @
        # displacement, ran ~7x slower in MKL here (0.8 ms for the lips' alone). Eager on the CPU
        # the transposed copies are made once per rig; elsewhere per frame, the same bits
        eager_cpu = motion.device.type == "cpu" and not _tracing()  # host reads are free: see the module's docstring
        main_t, mouth_t = ((self._cached(name, _transposed, op) for name, op in
                            (("main_op_t", main_operator), ("mouth_op_t", mouth_operator)))
                           if eager_cpu else (_transposed(main_operator), _transposed(mouth_operator)))
        main_forward = (displacement.T @ main_t).view(1, 2, GRID, GRID)
        lip_forward = (displacement.T @ mouth_t).view(2, 2, _MGH * _MGW).transpose(0, 1).reshape(2, 2, _MGH, _MGW)
        fields = torch.cat([F.pad(_with_gradient(main_forward, STEP), (0, _MGW - GRID, 0, _MGH - GRID), mode="replicate"),
                            _with_gradient(lip_forward, MOUTH_SRC_STEP)])  # (3, 6, _MGH, _MGW)
        lip_nodes = torch.cat([mouth_nodes, nodes[:, :, self.n_mouth:]], dim=2)  # padded to N
        origins = torch.stack([window_origin, mouth_src_origin, mouth_src_origin]).view(3, 1, 1, 2)
        found = invert_field(fields, torch.cat([nodes, lip_nodes, lip_nodes]), origins, self.inv_fields)
        main_shift = found[0:1] - nodes
        lips = found[1:3, :, :self.n_mouth]  # (2, 1, n, 2) where each lip's field puts each node
        win_shift, mouth_shift, eye_shift = torch.split(
            main_shift, [self.n_win, self.n_mouth, 2 * self.n_eye], dim=2)

        if eager_cpu:  # the sampled images channels-last, made once per rig: a bilinear tap's four channels
            # then share a cache line (measured: the head window's sampling 4.4-6.1 -> 2.0-3.5 ms)
            photo_rgbm, mouth_layers, eye_ball, eye_iris = (
                self._cached(name, _channels_last, image) for name, image in (
                    ("photo_cl", photo_rgbm), ("mouth_cl", mouth_layers), ("ball_cl", eye_ball), ("iris_cl", eye_iris)))
        mouth_args = (anchor_src, anchors, mouth_origin, mouth_shift, lips, mouth_src_origin, mouth_layers,
                      mouth_blend, cavity_rgb, eager_cpu)
        eye_args = (motion, eye_origin, eye_shift, photo_rgbm, eye_frame, eye_lids, eye_src_origin, eye_ball, eye_iris,
                    eager_cpu)
        pool = self._pool if self._pool is not None and eager_cpu else None
        if pool is not None:  # the mouth and the eyes on another core while this thread does the head window
            inference = torch.is_inference_mode_enabled()
            mouth_job = pool.submit(_in_mode, inference, self._mouth, *mouth_args)
            eyes_job = pool.submit(_in_mode, inference, self._eyes, *eye_args)

        # -- head window: the person through the main map, over the still background
        moved = win_shift.abs().sum(-1, keepdim=True) * (1.0 / ALPHA_RAMP_PX)  # capped at 1 per pixel
        coarse = torch.cat([win_shift * self.inv_frame, moved], dim=-1).view(1, GRID, GRID, 3)
        # upsampled as in _upsample_mm; the window's pixel centres (x by column, y by row: rank one
        # each) ride along as one more row and column of the matmuls, so no dense grid is read
        cols = coarse.permute(0, 3, 1, 2)[0] @ self.win_up_cols  # (3, GRID, WIN)
        centres = self.win_centres + window_origin.view(2, 1) * self.inv_frame.view(2, 1)  # (2, WIN): x, y
        rows_xy = torch.cat([self.win_up_rows.expand(2, -1, -1),
                             torch.stack([torch.ones_like(centres[1]), centres[1]]).unsqueeze(-1)], dim=2)
        cols_xy = torch.cat([cols[0:2], torch.stack([centres[0], torch.ones_like(centres[0])]).unsqueeze(1)], dim=1)
        grid_cf = torch.bmm(rows_xy, cols_xy)  # (2, WIN, WIN): channel-first storage, cheap adds
        moved_dense = (self.win_up_rows @ cols[2]).clamp_(max=1.0)  # (WIN, WIN)
        if eager_cpu:
            window = self._head_window(grid_cf, moved_dense, win_shift, moved, window_origin, photo_rgbm,
                                       window_background)
        else:
            sampled = F.grid_sample(photo_rgbm, grid_cf.unsqueeze(0).permute(0, 2, 3, 1), mode="bilinear",
                                    padding_mode="border", align_corners=False)  # (1, 4, WIN, WIN)
            # where the map has moved, the person's mask decides between person and background;
            # where it has not (all of it at neutral) the photo shows as it is
            alpha = (sampled[:, 3:4] - 1.0).mul_(moved_dense).add_(1.0)
            window = torch.lerp(window_background, sampled[:, 0:3], alpha).view(3, N_WIN)

        if pool is not None:
            mouth, (eyes, eye_weight) = mouth_job.result(), eyes_job.result()
        else:
            mouth = self._mouth(*mouth_args)
            eyes, eye_weight = self._eyes(*eye_args)
        # each sub-window blends into the head window by its own weight (1 where its layers differ
        # from the main map's rendering), so the person/background compositing stays the head
        # window's; one after another, so windows may overlap
        # eager on the CPU the window offsets are plain numbers, so the windows are pasted by slicing;
        # traced, exported or on a GPU (no host reads there) by the index maps. The same pixels.
        for (image, weight), origin, index in ((mouth, mouth_origin, self.mouth_index),
                                               ((eyes[0], eye_weight[0]), eye_origin[0], self.eye_index),
                                               ((eyes[1], eye_weight[1]), eye_origin[1], self.eye_index)):
            if eager_cpu:
                h, w = image.shape[-2:]
                ox, oy = (int(v) for v in (origin - window_origin).tolist())
                under = window.view(3, WIN, WIN)[:, oy:oy + h, ox:ox + w]
                under.copy_(torch.lerp(under, image.reshape(3, h, w), weight.reshape(1, h, w)))
                continue
            offset = (origin - window_origin).to(torch.int64)
            index = index + (offset[1] * WIN + offset[0])
            under = window.gather(1, index)
            window.scatter_(1, index, torch.lerp(under, image.reshape(3, -1), weight.reshape(1, -1)))

        # every layer is a convex blend of 0..255 values, so rounding needs no clamp
        # (N_WIN, 3): interleaving the uint8 rows by stack is ~2x cheaper on CPUs than the copy of a
        # transposed view (which cat would make)
        window_u8 = torch.stack(window.round().to(torch.uint8).unbind(0), dim=1)
        if eager_cpu:
            x0, y0 = (int(v) for v in window_origin.tolist())
            frame = self._cached("still", self._still_frame, photo_u8, frame_source).clone()
            frame[y0:y0 + WIN, x0:x0 + WIN] = window_u8.view(WIN, WIN, 3)
            return frame.unsqueeze(0)
        frame = torch.cat([photo_u8, window_u8], dim=0).index_select(0, frame_source)
        return frame.view(1, FRAME_SIZE, FRAME_SIZE, 3)

    def _head_window(self, grid_cf: Tensor, moved_dense: Tensor, win_shift: Tensor, moved: Tensor,
                     window_origin: Tensor, photo_rgbm: Tensor, window_background: Tensor) -> Tensor:
        """The head window (3, N_WIN) as forward's traced branch makes it, without sampling the tiles
        whose pixels are known beforehand: tiles that have not moved at all show the photo as it is,
        and tiles whose every pixel has moved by ALPHA_RAMP_PX or more (alpha compositing
        throughout) and reads only photo pixels outside the person mask show the inpainted
        background. Eager CPU only (a host read picks the tiles); the same pixels.
        grid_cf: (2, WIN, WIN) sampling grid; moved_dense: (WIN, WIN); win_shift: (1, 1, GRID^2, 2)
        backward shifts (px) at the nodes; moved: (1, 1, GRID^2, 1) their L1 norm / ALPHA_RAMP_PX."""
        # a tile's pixels take convex blends of the shifts at the 3 x 3 nodes around it (the
        # upsampling is bilinear between nodes, held past the outer ones)
        shift = win_shift.view(GRID, GRID, 2).permute(2, 0, 1).unsqueeze(0)  # (1, 2, GRID, GRID)
        low = -F.max_pool2d(-shift, 3, 1, 1)[0]
        high = F.max_pool2d(shift, 3, 1, 1)[0]
        moved = moved.view(1, 1, GRID, GRID)
        settled = -F.max_pool2d(-moved, 3, 1, 1)[0, 0] > 1.001  # clamped to exactly 1
        still = (F.max_pool2d(moved, 3, 1, 1)[0, 0] == 0.0).view(-1)  # shift exactly zero: the photo's pixels
        # the photo pixels the tile's bilinear taps can read (source px = window px + origin + shift),
        # 0.01 px wider for rounding, clipped at the border as grid_sample does
        corner = self.tile_corner + window_origin.view(2, 1, 1)
        first = (corner + low - 0.01).floor().clamp(0, FRAME_SIZE - 1).to(torch.int64)
        last = ((corner + (STEP - 1) + high + 0.01).floor() + 1.0).clamp(0, FRAME_SIZE - 1).to(torch.int64) + 1
        area = self._cached("person_area", self._person_area, photo_rgbm)
        (x0, y0), (x1, y1) = first, last
        row = FRAME_SIZE + 1
        corners = area.view(-1)[torch.stack([y1 * row + x1, y0 * row + x1, y1 * row + x0, y0 * row + x0])]
        person = corners[0] - corners[1] - corners[2] + corners[3]  # (GRID, GRID) mask pixels the taps read
        shows_room = (settled & (person == 0)).view(-1)
        tiles = torch.nonzero(~(shows_room | still)).view(-1)
        # the work runs tile by tile (each tile's STEP^2 pixels contiguous: gathers copy whole
        # tiles, and every element-wise op sees a multiple of STEP^2, so no scalar tail loops)
        background = self._cached("background_tiles", lambda b: _tiled(b.view(3, WIN, WIN)), window_background)
        window = background.clone()  # (3, GRID^2, STEP^2)
        unmoved = torch.nonzero(still).view(-1)
        if unmoved.numel():
            photo = self._cached("photo_tiles", self._photo_tiles, photo_rgbm, window_origin)
            window.index_copy_(1, unmoved, photo.index_select(1, unmoved))
        if tiles.numel():
            grid = _tiled(grid_cf).index_select(1, tiles).permute(1, 2, 0).unsqueeze(0)  # (1, k, STEP^2, 2)
            sampled = F.grid_sample(photo_rgbm, grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)  # (1, 4, k, STEP^2)
            alpha = (sampled[:, 3:4] - 1.0).mul_(_tiled(moved_dense[None]).index_select(1, tiles)).add_(1.0)
            window.index_copy_(1, tiles, torch.lerp(background.index_select(1, tiles), sampled[0, 0:3], alpha[0]))
        return _untiled(window).view(3, N_WIN)

    def _mouth(self, anchor_src: Tensor, anchors: Tensor, origin: Tensor, main_shift: Tensor, lips: Tensor,
               src_origin: Tensor, layers: Tensor, blend: Tensor, cavity_rgb: Tensor,
               sparse: bool) -> tuple[Tensor, Tensor]:
        """The mouth window (1, 3, MOUTH_H, MOUTH_W) and its blend weight (1, 1, MOUTH_H, MOUTH_W).
        lips: (2, 1, n, 2) source positions of the window's nodes under the upper and lower lips' fields.
        sparse (eager CPU): only the pixels that show (see _mouth_where_seen)."""
        gh, gw = self.mouth_grid
        nodes = self.mouth_nodes + origin  # (1, 1, n, 2) frame px
        main = nodes + main_shift
        # the lip maps differ only between the corners and fade into the main map at the edges
        beta = F.grid_sample(blend, (main - src_origin + 0.5) * self.inv_mouth_src - 1.0, mode="bilinear",
                             padding_mode="border", align_corners=False).permute(0, 2, 3, 1) * self.mouth_edge
        lips = main + beta * (lips - main)  # (2, 1, n, 2)
        # teeth are rigid: the upper set rides the skull, the lower set the mandible. Affine maps
        # are exact under bilinear upsampling, so they join the lips' maps at the nodes
        back, offset = _affine_back(anchor_src[1:7].view(2, 3, 2), anchors[1:7].view(2, 3, 2))  # skull, mandible
        teeth = (nodes[0] @ back + offset).unsqueeze(1)  # (2, 1, n, 2)
        # how far each lip has slid over its teeth (px, up to 1): the lips' inner edges soften with
        # it, and are hard, exactly the photo's, while the lips have not moved
        slide = (lips - teeth).abs().sum(-1, keepdim=True).clamp(max=1.0)
        maps = torch.cat([lips, teeth], dim=0) - nodes  # (4, 1, n, 2) backward shifts, px
        coarse = torch.cat([maps * self.inv_mouth_src, torch.cat([slide, slide], dim=0)], dim=-1)
        dense = _upsample_mm(coarse.view(MOUTH_LAYERS, gh, gw, 3), self.mouth_up_rows, self.mouth_up_cols)  # (4, 3, H, W)
        base = self.mouth_base_grid + (origin - src_origin) * self.inv_mouth_src  # (1, H, W, 2)
        weight = _upsample_mm(beta.view(1, gh, gw, 1), self.mouth_up_rows, self.mouth_up_cols)
        if sparse:
            return self._mouth_where_seen(dense, base, weight, layers, cavity_rgb), weight
        grid = dense[:, 0:2].permute(0, 2, 3, 1) + base
        s = F.grid_sample(layers, grid, mode="bilinear", padding_mode="border", align_corners=False)
        lip_up, lip_low, teeth_up, teeth_low = s.unbind(0)  # (5, H, W) each
        # (2, H, W) per px of signed distance; at rest the edge is a step (1e-4 px wide)
        sharpness = (1.0 / LIP_FEATHER_PX) / dense[0:2, 2].clamp(min=1e-4)
        inside = _mouth_inside(cavity_rgb.view(3, 1, 1), teeth_up, teeth_low)
        out = _lips_over(inside, lip_low, lip_up, _lip_cover(lip_low[3], sharpness[1]),
                         _lip_cover(lip_up[3], sharpness[0]))
        return out.unsqueeze(0), weight

    @staticmethod
    def _mouth_where_seen(dense: Tensor, base: Tensor, weight: Tensor, layers: Tensor, cavity_rgb: Tensor) -> Tensor:
        """The mouth window (1, 3, MOUTH_H, MOUTH_W) as _mouth's traced branch makes it, where its
        weight is not zero (zero elsewhere: not pasted there): the lips sampled only there, the
        teeth and the cavity only where neither lip covers them (measured: ~6 % of the window).
        Eager CPU only; the same pixels, op for op. dense: (4, 3, H, W) upsampled maps (grid
        shifts, slide); base: (1, H, W, 2) grid at zero shift; weight: (1, 1, H, W)."""
        n_px = MOUTH_H * MOUTH_W
        seen = _padded(torch.nonzero(weight.view(-1) > 0.0).view(-1))
        image = weight.new_zeros(3, n_px)
        if seen.numel() == 0:
            return image.view(1, 3, MOUTH_H, MOUTH_W)
        # pixel by pixel first, so the gather copies whole rows (measured: 1.0 ms gathering along
        # the last axis, 0.3 ms this way)
        at = dense.permute(2, 3, 0, 1).contiguous().view(n_px, MOUTH_LAYERS, 3).index_select(0, seen)  # (n, 4, 3)
        grid = at[..., 0:2].transpose(0, 1) + base.view(n_px, 2).index_select(0, seen)  # (4, n, 2)
        lips = F.grid_sample(layers[0:2, 0:4], grid[0:2].unsqueeze(1), mode="bilinear", padding_mode="border",
                             align_corners=False)[:, :, 0]  # (2, 4, n): RGB, signed distance
        sharpness = (1.0 / LIP_FEATHER_PX) / at[:, 0:2, 2].T.clamp(min=1e-4)  # (2, n)
        cover_low, cover_up = _lip_cover(lips[1, 3], sharpness[1]), _lip_cover(lips[0, 3], sharpness[0])
        inside = image.new_zeros(3, seen.numel())  # under a lip that covers it, any finite value
        shows = _padded(torch.nonzero((cover_low < 1.0) & (cover_up < 1.0)).view(-1))
        if shows.numel():
            teeth = F.grid_sample(layers[2:4], grid[2:4].index_select(1, shows).unsqueeze(1), mode="bilinear",
                                  padding_mode="border", align_corners=False)[:, :, 0]  # (2, 5, m)
            inside.index_copy_(1, shows, _mouth_inside(cavity_rgb.view(3, 1), teeth[0], teeth[1]))
        image.index_copy_(1, seen, _lips_over(inside, lips[1], lips[0], cover_low, cover_up))
        return image.view(1, 3, MOUTH_H, MOUTH_W)

    def _eyes(self, motion: Tensor, origin: Tensor, main_shift: Tensor, photo_rgbm: Tensor, eye_frame: Tensor,
              eye_lids: Tensor, src_origin: Tensor, eye_ball: Tensor, eye_iris: Tensor,
              sparse: bool) -> tuple[Tensor, Tensor]:
        """The two eye windows (2, 3, EYE_H, EYE_W) and their blend weights (2, 1, EYE_H, EYE_W).
        sparse (eager CPU): the lid skin sampled only where it shows, the eyeball only in the opening.

        Works in the photo's coordinates (through the main map), per eye along its own axis: the
        lid skin is stretched over the eyeball as the lids close; where the opening remains, the
        eyeball (sclera + the iris moved by the gaze) shows."""
        gh, gw = self.eye_grid
        shift = _upsample_mm(main_shift.view(2, gh, gw, 2), self.eye_up_rows, self.eye_up_cols).permute(0, 2, 3, 1)
        s = self.eye_pixels + origin.view(2, 1, 1, 2) + shift  # photo px
        m = motion[0]
        blink_r, blink_l, smile_r, smile_l, squint, wide, gaze_yaw, gaze_pitch = (m[i] for i in _EYE_CHANNELS)
        blink = torch.stack([blink_r, blink_l]).clamp(0.0, 1.0).view(2, 1, 1)
        # a smile's cheeks push the lower lids up a little, like a light squint
        raise_low = (squint + 0.35 * torch.stack([smile_r, smile_l])).clamp(0.0, 1.2).view(2, 1, 1)

        f = eye_frame.view(2, 1, 1, 10)
        axis = f[..., 2:4]
        normal = torch.cat([-axis[..., 1:2], axis[..., 0:1]], dim=-1)  # down the face
        half, crease_up, crease_low, iris_r, band_up, band_low = (f[..., i] for i in range(4, 10))
        q = s - f[..., 0:2]  # (2, H, W, 2)
        u = (q * axis).sum(-1)
        v = (q * normal).sum(-1)
        sigma = (u / half).clamp(-1.0, 1.0)
        c = eye_lids.view(2, 2, 1, 1, 5)  # (eye, lid, 1, 1, power)
        t = sigma[:, None]  # (eye, 1, H, W)
        lids = (((c[..., 4] * t + c[..., 3]) * t + c[..., 2]) * t + c[..., 1]) * t + c[..., 0]
        upper0, lower0 = lids[:, 0], lids[:, 1]  # (2, H, W) the photo's lid margins
        height = (lower0 - upper0).clamp(min=0.0)
        bump = 1.0 - sigma * sigma
        # the iris travels on the eyeball; the upper lid follows it down (and up a little)
        radius = EYEBALL_RADIUS_IRIS * iris_r
        gaze_u = radius * torch.sin(gaze_yaw * _DEG)  # (2, 1, 1)
        gaze_v = radius * torch.sin(gaze_pitch * _DEG)
        closure = upper0 + BLINK_CLOSURE * height
        upper = upper0 + blink * (closure - upper0) + 0.12 * squint * height \
            - 0.28 * wide.clamp(0.0, 1.0) * height.amax(dim=(1, 2), keepdim=True) * bump + 0.5 * gaze_v * bump
        lower = lower0 - blink * (lower0 - closure) - 0.3 * raise_low * height
        # lid skin between the crease and the margin is stretched (or squeezed) to the new margin;
        # the margin band (lashes, the lid's shadow) moves with it. Each term is an exact zero
        # while the lids have not moved.
        top = upper0 - crease_up
        bottom = lower0 + crease_low
        up_ratio = (upper0 - top) / (upper - top).clamp(min=1e-3)
        low_ratio = (bottom - lower0) / (bottom - lower).clamp(min=1e-3)
        zero = torch.zeros_like(v)
        lid_shift = torch.where(v < top, zero,
                    torch.where(v < upper, (v - top) * (up_ratio - 1.0),
                    torch.where(v < upper + band_up, upper0 - upper,
                    torch.where(v <= lower - band_low, zero,
                    torch.where(v <= lower, lower0 - lower,
                    torch.where(v <= bottom, (bottom - v) * (1.0 - low_ratio), zero))))))
        inside = (u.abs() < half).to(v.dtype)
        skin_at = s + (lid_shift * inside).unsqueeze(-1) * normal
        # the opening: opaque inside, fading over LID_FEATHER_PX at each lid band (inside it)
        opening = ((v - upper - band_up) * (1.0 / LID_FEATHER_PX)).clamp(0.0, 1.0) \
            * ((lower - band_low - v) * (1.0 / LID_FEATHER_PX)).clamp(0.0, 1.0) * inside
        # the window's weight: 1 over the eye's lids and opening, fading over 2 px around them
        weight = ((half + 2.0 - u.abs()) * 0.5).clamp(0.0, 1.0) * ((v - top + 2.0) * 0.5).clamp(0.0, 1.0) \
            * ((bottom + 2.0 - v) * 0.5).clamp(0.0, 1.0)

        gaze = gaze_u[..., None] * axis + gaze_v[..., None] * normal  # (2, 1, 1, 2)
        both = (1, 2 * EYE_H, EYE_W, 2)  # the two eyes' pixels side by side for one sampling call
        skin_grid = ((skin_at + 0.5) * self.inv_frame - 1.0).reshape(both)
        ball_grid = ((s - src_origin + 0.5) * self.inv_eyes_src - 1.0).reshape(both)
        iris_grid = ((s - gaze - src_origin + 0.5) * self.inv_eyes_src - 1.0).reshape(both)
        # the iris's edge is a step while the eye is still (the photo exactly) and softens over a
        # pixel once the gaze has moved it
        travel = gaze.abs().amax(-1).clamp(1e-3, 1.0)  # (2, 1, 1) px, capped
        sharp = (1.0 / travel).view(2, 1, 1).expand(2, EYE_H, EYE_W).reshape(1, 1, 2 * EYE_H, EYE_W)
        opening = opening.reshape(1, 1, 2 * EYE_H, EYE_W)
        if sparse:
            out = self._eyes_where_seen(photo_rgbm, eye_ball, eye_iris, skin_grid, ball_grid, iris_grid, sharp,
                                        opening, weight)
            return out.view(3, 2, EYE_H, EYE_W).transpose(0, 1), weight.view(2, 1, EYE_H, EYE_W)
        skin = F.grid_sample(photo_rgbm, skin_grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0:3]
        ball = F.grid_sample(eye_ball, ball_grid, mode="bilinear", padding_mode="border", align_corners=False)
        iris = F.grid_sample(eye_iris, iris_grid, mode="bilinear", padding_mode="border", align_corners=False)
        eyeball = torch.lerp(ball, iris[:, 0:3], (0.5 + iris[:, 3:4] * sharp).clamp(0.0, 1.0))
        out = torch.lerp(skin, eyeball, opening)  # (1, 3, 2H, W)
        return out.view(3, 2, EYE_H, EYE_W).transpose(0, 1), weight.view(2, 1, EYE_H, EYE_W)

    @staticmethod
    def _eyes_where_seen(photo_rgbm: Tensor, eye_ball: Tensor, eye_iris: Tensor, skin_grid: Tensor,
                         ball_grid: Tensor, iris_grid: Tensor, sharp: Tensor, opening: Tensor,
                         weight: Tensor) -> Tensor:
        """_eyes' output (3, 2 * EYE_H * EYE_W) as its traced branch makes it where the weight is
        not zero: the lid skin sampled only where the opening does not cover it, the eyeball only
        in the opening. Eager CPU only; the same pixels, op for op. Grids (1, 2 * EYE_H, EYE_W, 2);
        sharp, opening (1, 1, 2 * EYE_H, EYE_W); weight (2, EYE_H, EYE_W)."""
        n_px = 2 * EYE_H * EYE_W
        opening = opening.view(n_px)
        sample = lambda image, grid, at: F.grid_sample(  # noqa: E731
            image, grid.view(n_px, 2).index_select(0, at).view(1, 1, -1, 2), mode="bilinear",
            padding_mode="border", align_corners=False)[0, :, 0]
        skin = opening.new_zeros(3, n_px)  # where the opening covers it, any finite value
        at = _padded(torch.nonzero((weight.view(n_px) > 0.0) & (opening < 1.0)).view(-1))
        if at.numel():
            skin.index_copy_(1, at, sample(photo_rgbm, skin_grid, at)[0:3])
        eyeball = opening.new_zeros(3, n_px)
        at = _padded(torch.nonzero(opening > 0.0).view(-1))
        if at.numel():
            iris = sample(eye_iris, iris_grid, at)
            eyeball.index_copy_(1, at, torch.lerp(sample(eye_ball, ball_grid, at), iris[0:3],
                                                  (0.5 + iris[3:4] * sharp.view(1, n_px)[:, at]).clamp(0.0, 1.0)))
        return torch.lerp(skin, eyeball, opening.view(1, n_px))
