"""Lifting pixels to world-space rays with the extension (forward only), as the dispatcher op
``srn_fast::lift_rays`` (a torch.library custom op with a fake kernel; see :mod:`srn_fast.ops.mlp`).

Falls back to :mod:`srn_fast.geometry` (differentiable) when the extension is missing or when an input
requires grad; both give the reference's conventions.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ext, geometry
from ._layers import define_op

OP = "srn_fast.ops.lift_rays"


def _lift_rays_op_impl(uv: Tensor, K: Tensor, c2w: Tensor, depth0: Tensor) -> Tuple[Tensor, Tensor]:
    """uv [B, N, 2], K [B, 4] (fx, fy, cx, cy), c2w [B, 3, 4], depth0 [B, N] -> (x0 [B, N, 3], dir [B, N, 3])."""
    x0, d = uv.new_empty(_ray_shape(uv)), uv.new_empty(_ray_shape(uv))
    _ext.require(OP).lift_rays(uv, K, c2w, depth0, x0, d)
    return x0, d


def _ray_shape(uv: Tensor):
    return (uv.shape[0], uv.shape[1], 3)


def _lift_rays_fake(uv, K, c2w, depth0):
    return uv.new_empty(_ray_shape(uv)), uv.new_empty(_ray_shape(uv))


lift_rays_op = define_op("lift_rays", _lift_rays_op_impl, _lift_rays_fake)


def lift_rays(uv: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor,
              depth0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start points and unit directions of the rays through pixels ``uv``.

    Args:
        uv: ``[B, N, 2]`` pixel coordinates (column, row).
        cam2world: ``[B, 4, 4]``.
        intrinsics: ``[B, 3, 3]`` or ``[B, 4, 4]``.
        depth0: ``[B, N]`` or ``[B, N, 1]`` initial camera-space depth.
    Returns:
        ``x0 [B, N, 3]`` (the pixel lifted to depth0, in world space) and ``dir [B, N, 3]``.
    """
    B, N = uv.shape[0], uv.shape[1] if uv.dim() > 1 else 0
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (uv, cam2world, intrinsics, depth0))
    if not _ext.available() or needs_grad:
        d = depth0.reshape(B, N, 1) if depth0.numel() == B * N else depth0
        return (geometry.world_from_xy_depth(uv, d, cam2world, intrinsics),
                geometry.get_ray_directions(uv, cam2world, intrinsics))
    fx, fy, cx, cy = geometry.parse_intrinsics_tensor(intrinsics)
    K = torch.stack([fx, fy, cx, cy], dim=-1)
    if depth0.dim() == 3 and depth0.shape[-1] == 1:
        depth0 = depth0[..., 0]
    dt = cam2world.dtype
    return lift_rays_op(uv.to(dt).contiguous(), K.to(dt).contiguous(), cam2world[:, :3, :4].contiguous(),
                        depth0.to(dt).contiguous())
