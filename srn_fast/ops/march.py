"""The fused ray march (``srn_fast._C.march_forward/march_backward``) as an autograd function."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .. import _ext
from ..torch_impl import Layer, LSTMParams
from ._layers import check_layers, flatten, grads_to_flat, mm_code, needs_flags, unflatten

MODES = {"inference": 0, "recompute": 1, "store": 2}
TILE_ROWS = 128


class _MarchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, x0, dirs, w_ih, w_hh, bias, w_out, b_out, *flat):
        struct, steps, mode, clamp, return_steps, tile, mm, grad_on = meta
        ext = _ext.require("srn_fast.ops.march")
        W, b, g, be, norm = unflatten(flat, struct)
        training = grad_on and any(ctx.needs_input_grad)
        run_mode = MODES[mode] if training else MODES["inference"]
        outs = ext.march_forward(x0, dirs, W, b, g, be, norm, w_ih, w_hh, bias, w_out, b_out, steps, run_mode,
                                 return_steps, tile, mm)
        ctx.meta = meta
        ctx.run_mode = run_mode
        if training:
            ctx.save_for_backward(x0, dirs, w_ih, w_hh, bias, w_out, b_out, *flat, *outs[2:])
        if return_steps:
            ctx.mark_non_differentiable(outs[1])
            return outs[0], outs[1]
        return outs[0]

    @staticmethod
    def backward(ctx, v_xT, *unused):
        struct, steps, mode, clamp, return_steps, tile, mm, _ = ctx.meta
        saved = ctx.saved_tensors
        x0, dirs, w_ih, w_hh, bias, w_out, b_out = saved[:7]
        nflat = sum(2 + 2 * affine for _, affine in struct)
        flat = saved[7:7 + nflat]
        rest = list(saved[7 + nflat:])
        W, b, g, be, norm = unflatten(flat, struct)
        nW, nb, ng, nbe = needs_flags(ctx.needs_input_grad, struct, 8)
        needs = [ctx.needs_input_grad[1], ctx.needs_input_grad[2], nW, nb, ng, nbe]
        res = _ext.require("srn_fast.ops.march").march_backward(
            v_xT, x0, dirs, rest, W, b, g, be, norm, w_ih, w_hh, bias, w_out, b_out, steps, ctx.run_mode,
            -1.0 if clamp is None else float(clamp), needs, tile)
        L = len(struct)
        v_x0, v_dirs = res[0], res[1]
        gW, gb, gg, gbe = res[2:2 + L], res[2 + L:2 + 2 * L], res[2 + 2 * L:2 + 3 * L], res[2 + 3 * L:2 + 4 * L]
        g_wih, g_whh, g_bias, g_wout, g_bout = res[2 + 4 * L:]
        flat_grads = grads_to_flat(struct, gW, gb, gg, gbe)
        flat_grads = [gr if need else None for gr, need in zip(flat_grads, ctx.needs_input_grad[8:])]
        n = ctx.needs_input_grad
        return (None, v_x0 if n[1] else None, v_dirs if n[2] else None, g_wih if n[3] else None,
                g_whh if n[4] else None, g_bias if n[5] else None, g_wout.view_as(w_out) if n[6] else None,
                g_bout.view_as(b_out) if n[7] else None, *flat_grads)


def march(x0: torch.Tensor, dirs: torch.Tensor, phi: Sequence[Layer], lstm: LSTMParams, steps: int,
          grad_clamp: Optional[float] = 10.0, return_steps: bool = False, mode: str = "recompute",
          matmul_dtype: Optional[torch.dtype] = None, tile_rows: int = TILE_ROWS):
    """The reference ray marcher as one fused op; same semantics as :func:`srn_fast.torch_impl.march`.

    Args:
        x0, dirs: ``[B, N, 3]`` start points and unit directions.
        phi: list of :class:`srn_fast.Layer` (per-scene or shared weights, LayerNorm + ReLU layers).
        lstm: :class:`srn_fast.LSTMParams`.
        steps: marching steps T.
        grad_clamp: clamp of the gradient of h at every step (the reference's 10); None for no clamp.
        return_steps: also return ``[T + 1, B, N, 3]`` points of every step (not differentiable).
        mode: ``"recompute"`` (store per step only x, h, c and the gates; recompute phi in backward),
            ``"store"`` (keep phi's activations: faster backward, more memory). Without grad nothing is stored.
        matmul_dtype: ``torch.bfloat16`` for bf16 forward matmuls.
        tile_rows: rays per CPU tile; 0 runs the whole batch as one tile through batched GEMMs, the CUDA
            backend's code path (on the CPU: slower, for testing that path).
    """
    op = "srn_fast.ops.march"
    if mode not in ("recompute", "store"):
        raise ValueError(f"{op}: mode must be 'recompute' or 'store', got {mode!r}")
    for name, t in (("x0", x0), ("dirs", dirs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != 3:
            raise ValueError(f"{op}: {name} must be a tensor of shape [B, N, 3], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(lstm, LSTMParams):
        raise TypeError(f"{op}: lstm must be a srn_fast.LSTMParams, got {type(lstm).__name__}")
    if int(steps) < 0:
        raise ValueError(f"{op}: steps must be >= 0, got {steps}")
    if int(tile_rows) < 0:
        raise ValueError(f"{op}: tile_rows must be >= 1 (or 0 for the batched path), got {tile_rows}")
    check_layers(phi, op)
    flat, struct = flatten(phi)
    bias = lstm.bias_ih + lstm.bias_hh
    grad_on = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x0, dirs, bias, lstm.weight_ih, lstm.weight_hh, lstm.out_weight, lstm.out_bias,
                                  *flat))
    meta = (tuple(struct), int(steps), mode, grad_clamp, bool(return_steps), int(tile_rows),
            mm_code(matmul_dtype, x0, op), grad_on)
    return _MarchFunction.apply(meta, x0, dirs, lstm.weight_ih, lstm.weight_hh, bias, lstm.out_weight,
                                lstm.out_bias, *flat)


class MarchResult(NamedTuple):
    """What :func:`march_camera` returns: world points ``[B, N, 3]``, their camera depth ``[B, N, 1]``, and the
    depth after every step ``[T + 1, B, N, 1]`` (or None)."""

    points: torch.Tensor
    depth: torch.Tensor
    step_depths: Optional[torch.Tensor]


def initial_depth(B: int, N: int, device=None, dtype=torch.float32,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The reference Raymarcher's start depth: N(0.05, 5e-4) per ray, ``[B, N, 1]`` (drawn on the CPU, so a seeded
    generator gives the same draw on every device)."""
    d = torch.empty(B, N, 1, dtype=dtype)
    d.normal_(mean=0.05, std=5e-4, generator=generator)
    return d.to(device) if device is not None else d


_draw_initial_depth = initial_depth  # march_camera's argument of the same name shadows it


def march_camera(uv: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor, phi: Sequence[Layer],
                 lstm: LSTMParams, steps: int, initial_depth: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, return_steps: bool = False, **kwargs) -> MarchResult:
    """The reference Raymarcher from pixels: lifts ``uv`` through the cameras to rays, starts each ray at its
    initial depth (drawn as the reference does, N(0.05, 5e-4), unless given), marches with :func:`march`, and
    returns the final world points, their depth along the camera axis and, with ``return_steps``, every step's depth.

    Args:
        uv: ``[B, N, 2]`` pixel coordinates; cam2world ``[B, 4, 4]``; intrinsics ``[B, 3, 3]`` or ``[B, 4, 4]``.
        initial_depth: ``[B, N, 1]`` or ``[B, N]``, for reproducibility; None draws it (with ``generator``).
        kwargs: passed to :func:`march` (grad_clamp, mode, matmul_dtype, tile_rows).
    """
    op = "srn_fast.ops.march_camera"
    if not isinstance(uv, torch.Tensor) or uv.dim() != 3 or uv.shape[-1] != 2:
        raise ValueError(f"{op}: uv must be a tensor of shape [B, N, 2], got "
                         f"{tuple(uv.shape) if isinstance(uv, torch.Tensor) else type(uv).__name__}")
    B, N = uv.shape[:2]
    if not isinstance(cam2world, torch.Tensor) or tuple(cam2world.shape) != (B, 4, 4):
        raise ValueError(f"{op}: cam2world must have shape [B, 4, 4] = [{B}, 4, 4], got "
                         f"{tuple(getattr(cam2world, 'shape', ()))}")
    if not isinstance(intrinsics, torch.Tensor) or tuple(intrinsics.shape) not in ((B, 3, 3), (B, 4, 4)):
        raise ValueError(f"{op}: intrinsics must have shape [B, 3, 3] or [B, 4, 4] with B = {B}, got "
                         f"{tuple(getattr(intrinsics, 'shape', ()))}")
    dtype, device = cam2world.dtype, cam2world.device
    if initial_depth is None:
        d0 = _draw_initial_depth(B, N, device, dtype, generator)
    else:
        if tuple(initial_depth.shape) not in ((B, N, 1), (B, N)):
            raise ValueError(f"{op}: initial_depth must have shape [B, N, 1] = [{B}, {N}, 1] (or [B, N]), got "
                             f"{tuple(initial_depth.shape)}")
        d0 = initial_depth.reshape(B, N, 1).to(device=device, dtype=dtype)
    return lift_and_march(lambda x0, dirs, rs: march(x0, dirs, phi, lstm, steps, return_steps=rs, **kwargs),
                          uv.to(device=device, dtype=dtype), cam2world, intrinsics, d0, return_steps)


def lift_and_march(march_fn: Callable, uv: torch.Tensor, cam2world: torch.Tensor, intrinsics: torch.Tensor,
                   depth0: torch.Tensor, return_steps: bool = False) -> MarchResult:
    """The camera side of the reference Raymarcher around any march (shared by :func:`march_camera` and
    :meth:`srn_fast.SRNModel.render`, whose backend may be the fused op or the oracle): lifts ``uv`` to rays
    starting at ``depth0`` (``[B, N, 1]`` or ``[B, N]``), calls ``march_fn(x0, dirs, return_steps)`` (which
    returns ``x_T`` or ``(x_T, points of every step)``), and measures the depths. Inputs are not checked here."""
    from .. import geometry

    B, N = uv.shape[:2]
    dirs = geometry.get_ray_directions(uv, cam2world, intrinsics)
    x0 = geometry.world_from_xy_depth(uv, depth0, cam2world, intrinsics)
    out = march_fn(x0, dirs, return_steps)
    step_depths = None
    if return_steps:
        points, pts = out
        T1 = pts.shape[0]
        step_depths = geometry.get_depth(pts.reshape(T1 * B, N, 3), cam2world.repeat(T1, 1, 1)).reshape(T1, B, N, 1)
    else:
        points = out
    return MarchResult(points, geometry.get_depth(points, cam2world), step_depths)
