"""Camera geometry with the reference SRN conventions (OpenCV camera: x right, y down, z forward).

Shapes: ``B`` scenes (or views), ``N`` rays. ``intrinsics`` may be ``[B, 3, 3]`` or ``[B, 4, 4]`` (the
reference data loader produces 4x4 matrices); only fx, fy, cx, cy are read. ``cam2world`` is ``[B, 4, 4]``.
Pixel coordinates ``uv`` are ``(x, y) = (column, row)`` with no half-pixel offset.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


class IntrinsicsFile(NamedTuple):
    """Contents of an SRN ``intrinsics.txt``."""

    K: np.ndarray  # [4, 4] float64, rescaled to the target sidelength if one was given
    grid_barycenter: np.ndarray  # [3]
    scale: float
    height: float
    width: float
    world2cam_poses: bool


class GeometryError(ValueError):
    """A camera or pose file that does not follow the SRN format."""


def _floats(line: str, path: str, lineno: int, count: Optional[int], what: str):
    parts = line.split()
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise GeometryError(f"{path}: line {lineno} ({what}) must hold numbers, got {line.strip()!r}") from None
    if count is not None and len(vals) != count:
        raise GeometryError(f"{path}: line {lineno} ({what}) must hold {count} numbers, got {len(vals)}: "
                            f"{line.strip()!r}")
    if not all(math.isfinite(v) for v in vals):
        raise GeometryError(f"{path}: line {lineno} ({what}) holds a non-finite number: {line.strip()!r}")
    return vals


def parse_intrinsics(path: str, trgt_sidelength: Optional[int] = None) -> IntrinsicsFile:
    """Read an SRN ``intrinsics.txt``.

    Line 1 ``f cx cy _``; line 2 the grid barycenter (3 numbers); line 3 the scale; line 4 ``height width``;
    optional line 5 a world2cam flag. With ``trgt_sidelength`` S: ``cx' = cx / width * S``,
    ``cy' = cy / height * S``, ``f' = S / height * f`` (the reference's rescaling).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GeometryError(f"{path}: intrinsics file not found")
    with open(path, "r") as fh:
        lines = [ln for ln in fh.read().splitlines()]
    if len(lines) < 4:
        raise GeometryError(f"{path}: intrinsics file needs at least 4 lines (f cx cy _ / barycenter / scale / "
                            f"height width), found {len(lines)}")
    f, cx, cy, _ = _floats(lines[0], path, 1, 4, "f cx cy _")
    bary = np.array(_floats(lines[1], path, 2, 3, "grid barycenter"), dtype=np.float64)
    (scale,) = _floats(lines[2], path, 3, 1, "scale")
    if f <= 0:
        raise GeometryError(f"{path}: line 1 (f cx cy _): the focal length must be positive, got {f:g}")
    height, width = _floats(lines[3], path, 4, 2, "height width")
    if height <= 0 or width <= 0:
        raise GeometryError(f"{path}: line 4 (height width) must be positive, got {lines[3].strip()!r}")
    world2cam = False
    if len(lines) > 4 and lines[4].strip():
        try:
            world2cam = bool(int(lines[4].strip()))
        except ValueError:
            world2cam = False  # as the reference: a non-integer fifth line means "no flag"
    if trgt_sidelength is not None:
        cx = cx / width * trgt_sidelength
        cy = cy / height * trgt_sidelength
        f = trgt_sidelength / height * f
    K = np.array([[f, 0.0, cx, 0.0], [0.0, f, cy, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    return IntrinsicsFile(K, bary, float(scale), float(height), float(width), world2cam)


def load_pose(path: str) -> np.ndarray:
    """Read a 4x4 cam2world pose: 16 numbers on one line or four lines of four. Returns float64 [4, 4]."""
    path = os.fspath(path)
    try:
        with open(path, "r") as fh:
            text = fh.read()
    except OSError as e:
        raise GeometryError(f"{path}: cannot read pose file ({e.strerror})") from None
    try:
        vals = [float(t) for t in text.split()]
    except ValueError:
        raise GeometryError(f"{path}: pose file must hold 16 numbers, found non-numeric text") from None
    if len(vals) != 16:
        raise GeometryError(f"{path}: pose file must hold 16 numbers (4x4 cam2world), found {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise GeometryError(f"{path}: pose file holds a non-finite number")
    M = np.array(vals, dtype=np.float64).reshape(4, 4)
    problem = rigid_transform_problem(M)
    if problem:
        raise GeometryError(f"{path}: pose is not a rigid transform ({problem}); expected a 4x4 cam2world made of "
                            f"a rotation and a translation, last row 0 0 0 1")
    return M


RIGID_TOL = 1e-2  # |R^T R - I| and |det R - 1| beyond this are not rounding of a rotation


def rigid_transform_problem(M: np.ndarray, tol: float = RIGID_TOL) -> Optional[str]:
    """None if the 4x4 ``M`` is a rotation plus a translation (to ``tol``), else what is wrong with it."""
    if np.abs(M[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > 1e-6:
        return f"last row {' '.join(f'{v:g}' for v in M[3])}"
    R = M[:3, :3]
    det = float(np.linalg.det(R))
    if det < 0:
        return f"a mirror: the 3x3 part has determinant {det:.3g}"
    scales = np.linalg.norm(R, axis=0)
    if np.abs(scales - 1).max() > tol:
        return f"a scale: its columns have lengths {', '.join(f'{v:.4g}' for v in scales)}"
    if np.abs(R.T @ R - np.eye(3)).max() > tol:
        return "a shear: its columns are not orthogonal"
    return None


def intrinsics_matrix(f: float, cx: float, cy: float) -> torch.Tensor:
    """A 3x3 pinhole matrix [[f, 0, cx], [0, f, cy], [0, 0, 1]] (float32)."""
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def uv_grid(sidelength: int, device=None) -> torch.Tensor:
    """``[S*S, 2]`` pixel coordinates (x=column, y=row), row-major, as float32."""
    rows, cols = torch.meshgrid(torch.arange(sidelength, device=device), torch.arange(sidelength, device=device),
                                indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1).float()


def parse_intrinsics_tensor(K: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """fx, fy, cx, cy, each ``[B]``, from ``[B, 3, 3]`` or ``[B, 4, 4]`` intrinsics."""
    return K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]


def lift(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, intrinsics: torch.Tensor,
         homogeneous: bool = False) -> torch.Tensor:
    """Pixel (x, y) [B, N] at camera depth z [B, N] -> camera-space points [B, N, 3] (or 4, homogeneous)."""
    fx, fy, cx, cy = parse_intrinsics_tensor(intrinsics)
    x_lift = (x - cx[:, None]) / fx[:, None] * z
    y_lift = (y - cy[:, None]) / fy[:, None] * z
    parts = [x_lift, y_lift, z]
    if homogeneous:
        parts.append(torch.ones_like(z))
    return torch.stack(parts, dim=-1)


def world_from_xy_depth(uv: torch.Tensor, depth: torch.Tensor, cam2world: torch.Tensor,
                        intrinsics: torch.Tensor) -> torch.Tensor:
    """World points [B, N, 3] of pixels uv [B, N, 2] at camera depth ``depth`` ([B, N] or [B, N, 1])."""
    B = cam2world.shape[0]
    z = depth.reshape(B, -1)
    pts = lift(uv[..., 0].reshape(B, -1), uv[..., 1].reshape(B, -1), z, intrinsics, homogeneous=True)
    return torch.bmm(cam2world, pts.transpose(1, 2)).transpose(1, 2)[..., :3]


def get_ray_directions(uv: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Unit ray directions [B, N, 3]: normalise(world point at z = 1 minus the camera centre)."""
    B, N = uv.shape[:2]
    pts = world_from_xy_depth(uv, torch.ones(B, N, device=uv.device, dtype=cam2world.dtype), cam2world, intrinsics)
    return F.normalize(pts - cam2world[:, None, :3, 3], dim=2)


def get_depth(points: torch.Tensor, cam2world: torch.Tensor) -> torch.Tensor:
    """Camera-space z [B, N, 1] of world points [B, N, 3] (the reference inverts cam2world)."""
    world2cam = torch.linalg.inv(cam2world)
    z = points @ world2cam[:, 2, :3].unsqueeze(-1) + world2cam[:, 2, 3].reshape(-1, 1, 1)
    return z


def camera_centres(cam2world: torch.Tensor) -> torch.Tensor:
    return cam2world[:, :3, 3]


def compute_normal_map(uv: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor,
                       sidelength: Optional[int] = None) -> torch.Tensor:
    """Camera-space unit normals [B, N, 3] from a full-image depth map (rows of a square S x S grid).

    Normals come from finite differences of the lifted points (a visualisation aid, as in the reference);
    ``uv`` must be the full row-major grid.
    """
    B, N = uv.shape[:2]
    S = sidelength or int(round(math.sqrt(N)))
    if S * S != N:
        raise ValueError(f"compute_normal_map: needs a full square image, got N={N} rays")
    pts = lift(uv[..., 0], uv[..., 1], depth.reshape(B, N), intrinsics).reshape(B, S, S, 3)
    dx = torch.zeros_like(pts)
    dy = torch.zeros_like(pts)
    dx[:, :, 1:-1] = (pts[:, :, 2:] - pts[:, :, :-2]) / 2
    dy[:, 1:-1, :] = (pts[:, 2:, :] - pts[:, :-2, :]) / 2
    n = torch.cross(dy, dx, dim=-1)
    return F.normalize(n, dim=-1).reshape(B, N, 3)


def look_at(eye: np.ndarray, target: np.ndarray = np.zeros(3), up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """cam2world [4, 4] (OpenCV: x right, y down, z forward) of a camera at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    up = np.asarray(up, dtype=np.float64)
    if abs(np.dot(fwd, up / np.linalg.norm(up))) > 0.999:
        up = np.array([0.0, 1.0, 0.0]) if abs(fwd[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, fwd, eye
    return c2w
