"""The fused ray march as dispatcher ops (``srn_fast::march`` / ``srn_fast::march_backward``: torch.library custom ops
around ``srn_fast._C.march_forward/march_backward``, fake kernels from :mod:`srn_fast.ops.shapes`, registered
autograd; see :mod:`srn_fast.ops.mlp` for why custom_op), and the camera-side helpers around it."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..types import MARCH_MODES, TILE_ROWS, Layer, LSTMParams
from . import shapes as S
from ._layers import (LayerLists, check_devices, check_layers, define_op, layer_lists, mm_code, needs,
                      once_differentiable, optional, or_none, register_autograd, aux_outputs)

OP = "srn_fast.ops.march"


def _march_op_impl(x0: Tensor, dirs: Tensor, weights: List[Tensor], biases: List[Tensor],
             ln_weights: List[Tensor], ln_biases: List[Tensor], norm: List[bool], w_ih: Tensor,
             w_hh: Tensor, bias: Tensor, w_out: Tensor, b_out: Tensor, steps: int, mode: int, grad_clamp: float,
             return_steps: bool, tile_rows: int, mm_dtype: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    """(xT, steps, xs, hs, cs, gates, acts, rstd): shapes from :func:`shapes.march_shapes`. grad_clamp (< 0: none)
    is the clamp of the gradient of h that the registered backward applies."""
    sh = S.march_shapes(x0, weights, norm, w_hh, steps, mode, return_steps, tile_rows, mm_dtype)
    outs = S.empties(sh[:6], x0) + [S.empties(sh.acts, x0, sh.acts_dtype), S.empties(sh.rstd, x0)]
    _ext.require(OP).march_forward(x0, dirs, weights, biases, optional(ln_weights), optional(ln_biases), norm, w_ih,
                                   w_hh, bias, w_out, b_out, steps, mode, tile_rows, mm_dtype, *outs)
    return tuple(outs)


def _march_fake(x0, dirs, weights, biases, ln_weights, ln_biases, norm, w_ih, w_hh, bias, w_out, b_out, steps, mode,
                grad_clamp, return_steps, tile_rows, mm_dtype):
    check_devices(OP, "x0", x0, LayerLists(weights, biases, ln_weights, ln_biases, norm), dirs=dirs,
                  **{"lstm.weight_ih": w_ih, "lstm.weight_hh": w_hh, "lstm bias": bias, "lstm.out_weight": w_out,
                     "lstm.out_bias": b_out})
    sh = S.march_shapes(x0, weights, norm, w_hh, steps, mode, return_steps, tile_rows, mm_dtype)
    return tuple(S.empties(sh[:6], x0) + [S.empties(sh.acts, x0, sh.acts_dtype), S.empties(sh.rstd, x0)])


march_op = define_op("march", _march_op_impl, _march_fake)


def _grad_shapes(x0, weights, biases, ln_weights, ln_biases, lstm, need_x0, need_dirs, nw, nb, ng, nbe, nl):
    opt = [S.grad_shape(t, n) for t, n in zip(ln_weights, ng)]
    optb = [S.grad_shape(t, n) for t, n in zip(ln_biases, nbe)]
    return ([S.grad_shape(x0, need_x0), S.grad_shape(x0, need_dirs),
             [S.grad_shape(w, n) for w, n in zip(weights, nw)], [S.grad_shape(b, n) for b, n in zip(biases, nb)],
             opt, optb] + [S.grad_shape(t, n) for t, n in zip(lstm, nl)])


def _grad_buffers(x0, shapes):
    return tuple(S.empties(s, x0) if isinstance(s, list) else S.empty(s, x0) for s in shapes)


def _march_backward_op_impl(grad_xT: Tensor, x0: Tensor, dirs: Tensor, xs: Tensor, hs: Tensor, cs: Tensor, gates: Tensor,
                      acts: List[Tensor], rstd: List[Tensor], weights: List[Tensor], biases: List[Tensor],
                      ln_weights: List[Tensor], ln_biases: List[Tensor], norm: List[bool],
                      w_ih: Tensor, w_hh: Tensor, bias: Tensor, w_out: Tensor, b_out: Tensor, steps: int, mode: int,
                      grad_clamp: float, tile_rows: int, mm_dtype: int, need_x0: bool, need_dirs: bool,
                      need_weights: List[bool], need_biases: List[bool], need_ln_weights: List[bool],
                      need_ln_biases: List[bool], need_lstm: List[bool]
                      ) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor], Tensor,
                                 Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x0, dirs, every phi tensor and the LSTM's (w_ih, w_hh, bias, w_out, b_out); [0] placeholders
    where not needed. grad_clamp < 0: no clamp of the gradient of h."""
    g = _grad_buffers(x0, _grad_shapes(x0, weights, biases, ln_weights, ln_biases, (w_ih, w_hh, bias, w_out, b_out),
                                       need_x0, need_dirs, need_weights, need_biases, need_ln_weights,
                                       need_ln_biases, need_lstm))
    _ext.require(OP).march_backward(grad_xT, x0, dirs, xs, hs, cs, gates, acts, rstd, weights, biases,
                                    optional(ln_weights), optional(ln_biases), norm, w_ih, w_hh, bias, w_out, b_out, steps, mode, grad_clamp,
                                    tile_rows, mm_dtype, *g)
    return g


def _march_backward_fake(grad_xT, x0, dirs, xs, hs, cs, gates, acts, rstd, weights, biases, ln_weights, ln_biases,
                         norm, w_ih, w_hh, bias, w_out, b_out, steps, mode, grad_clamp, tile_rows, mm_dtype, need_x0,
                         need_dirs, need_weights, need_biases, need_ln_weights, need_ln_biases, need_lstm):
    return _grad_buffers(x0, _grad_shapes(x0, weights, biases, ln_weights, ln_biases, (w_ih, w_hh, bias, w_out, b_out),
                                          need_x0, need_dirs, need_weights, need_biases, need_ln_weights,
                                          need_ln_biases, need_lstm))


march_backward_op = define_op("march_backward", _march_backward_op_impl, _march_backward_fake)


def _setup_context(ctx, inputs, output):
    (x0, dirs, weights, biases, ln_weights, ln_biases, norm, w_ih, w_hh, bias, w_out, b_out, steps, mode,
     grad_clamp, return_steps, tile_rows, mm_dtype) = inputs
    _, pts, xs, hs, cs, gates, acts, rstd = output
    ctx.L = len(weights)
    ctx.attrs = (list(norm), steps, mode, grad_clamp, tile_rows, mm_dtype)
    aux_outputs(ctx, pts, xs, hs, cs, gates, *acts, *rstd)
    ctx.save_for_backward(x0, dirs, w_ih, w_hh, bias, w_out, b_out, xs, hs, cs, gates, *weights, *biases,
                          *ln_weights, *ln_biases, *acts, *rstd)


@once_differentiable(OP)
def _backward(ctx, grad_xT, grad_steps, grad_xs, grad_hs, grad_cs, grad_gates, grad_acts, grad_rstd):
    L = ctx.L
    norm, steps, mode, grad_clamp, tile_rows, mm_dtype = ctx.attrs
    if mode == MARCH_MODES["inference"]:
        raise RuntimeError(f"{OP}: backward of a march run without grad (inference mode)")
    saved = ctx.saved_tensors
    x0, dirs, w_ih, w_hh, bias, w_out, b_out, xs, hs, cs, gates = saved[:11]
    weights, biases, ln_w, ln_b, acts, rstd = (list(saved[11 + i * L:11 + (i + 1) * L]) for i in range(6))
    ng = ctx.needs_input_grad
    nw, nb, ngm, nbe = needs(ng, 2, weights), needs(ng, 3, biases), needs(ng, 4, ln_w), needs(ng, 5, ln_b)
    nl = [bool(ng[i]) for i in range(7, 12)]
    grad_xT = x0.new_zeros(x0.shape) if grad_xT is None else grad_xT
    res = march_backward_op(grad_xT.contiguous(), x0, dirs, xs, hs, cs, gates, acts, rstd, weights, biases, ln_w,
                            ln_b, norm, w_ih, w_hh, bias, w_out, b_out, steps, mode, grad_clamp, tile_rows,
                            mm_dtype, bool(ng[0]), bool(ng[1]), nw, nb, ngm, nbe, nl)
    gx0, gdirs, gw, gb, gg, gbe = res[:6]
    lstm_grads = [g if n else None for g, n in zip(res[6:], nl)]
    return (gx0 if ng[0] else None, gdirs if ng[1] else None, or_none(gw, nw), or_none(gb, nb), or_none(gg, ngm),
            or_none(gbe, nbe), None, *lstm_grads, None, None, None, None, None, None)


register_autograd(march_op, _backward, _setup_context)


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
    if mode not in ("recompute", "store"):
        raise ValueError(f"{OP}: mode must be 'recompute' or 'store', got {mode!r}")
    for name, t in (("x0", x0), ("dirs", dirs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != 3:
            raise ValueError(f"{OP}: {name} must be a tensor of shape [B, N, 3], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(lstm, LSTMParams):
        raise TypeError(f"{OP}: lstm must be a srn_fast.LSTMParams, got {type(lstm).__name__}")
    if int(steps) < 0:
        raise ValueError(f"{OP}: steps must be >= 0, got {steps}")
    if int(tile_rows) < 0:
        raise ValueError(f"{OP}: tile_rows must be >= 1 (or 0 for the batched path), got {tile_rows}")
    check_layers(phi, OP)
    ll = layer_lists(phi)
    bias = lstm.bias_ih + lstm.bias_hh
    grad_on = torch.is_grad_enabled() and any(
        t.requires_grad
        for t in (x0, dirs, bias, lstm.weight_ih, lstm.weight_hh, lstm.out_weight, lstm.out_bias, *ll.weights,
                  *ll.biases, *ll.ln_weights, *ll.ln_biases))
    run_mode = MARCH_MODES[mode] if grad_on else MARCH_MODES["inference"]
    clamp = -1.0 if grad_clamp is None else float(grad_clamp)
    xT, pts, *_ = march_op(x0, dirs, *ll, lstm.weight_ih, lstm.weight_hh, bias, lstm.out_weight, lstm.out_bias,
                           int(steps), run_mode, clamp, bool(return_steps), int(tile_rows),
                           mm_code(matmul_dtype, x0, OP))
    if return_steps:
        return xT, pts.detach()
    return xT


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
