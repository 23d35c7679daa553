"""Fused small-MLP evaluation as dispatcher ops with a hand-written backward.

``srn_fast::mlp`` and ``srn_fast::mlp_backward`` are ``torch.library`` custom ops around the C++ entry points
(``srn_fast._C.mlp_forward`` / ``mlp_backward``), with fake kernels and registered autograd, so ``torch.compile``
captures a model that uses them without graph breaks (and ``opcheck`` can test them). We wrap the C++ functions
with ``torch.library.custom_op`` rather than ``TORCH_LIBRARY`` schemas in C++ because the outputs are allocated
here, from the same shape function (:mod:`srn_fast.ops.shapes`) that the fake kernels call: one definition of every
output and saved-state shape, symbolic shapes for free, and the C++ side only checks and fills buffers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..types import TILE_ROWS, Layer
from . import shapes as S
from ._layers import (LayerLists, check_devices, check_layers, define_op, layer_lists, mm_code, needs,
                      once_differentiable, optional, or_none, register_autograd, aux_outputs)

OP = "srn_fast.ops.mlp"
#: Keep the normalised activations for backward (True) or recompute them tile by tile in backward (False).
#: Keeping them is faster on the CPU (see benchmarks/mlp_bench.py) at B*N*sum(C_l) extra numbers.
SAVE_ACTIVATIONS = True


def _mlp_op_impl(x: Tensor, weights: List[Tensor], biases: List[Tensor], ln_weights: List[Tensor],
           ln_biases: List[Tensor], norm: List[bool], save: bool, tile_rows: int,
           mm_dtype: int) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """out [B, N, C_L]; acts, rstd: what backward needs when ``save`` (shapes: :func:`shapes.mlp_shapes`).
    ln_weights / ln_biases: [C_l] LayerNorm affine, or a [0] placeholder for none."""
    sh = S.mlp_shapes(x, weights, norm, save, tile_rows, mm_dtype)
    out, acts, rstd = S.empty(sh.out, x), S.empties(sh.acts, x, sh.acts_dtype), S.empties(sh.rstd, x)
    _ext.require(OP).mlp_forward(x, weights, biases, optional(ln_weights), optional(ln_biases), norm, save,
                                 tile_rows, mm_dtype, out, acts, rstd)
    return out, acts, rstd


def _mlp_fake(x, weights, biases, ln_weights, ln_biases, norm, save, tile_rows, mm_dtype):
    check_devices(OP, "x", x, LayerLists(weights, biases, ln_weights, ln_biases, norm))
    sh = S.mlp_shapes(x, weights, norm, save, tile_rows, mm_dtype)
    return S.empty(sh.out, x), S.empties(sh.acts, x, sh.acts_dtype), S.empties(sh.rstd, x)


mlp_op = define_op("mlp", _mlp_op_impl, _mlp_fake)


def _grad_shapes(x, weights, biases, ln_weights, ln_biases, need_x, need_w, need_b, need_g, need_be):
    return (S.grad_shape(x, need_x), [S.grad_shape(w, n) for w, n in zip(weights, need_w)],
            [S.grad_shape(b, n) for b, n in zip(biases, need_b)],
            [S.grad_shape(g, n) for g, n in zip(ln_weights, need_g)],
            [S.grad_shape(b, n) for b, n in zip(ln_biases, need_be)])


def _grad_buffers(x, shapes):
    gx, gw, gb, gg, gbe = shapes
    return S.empty(gx, x), S.empties(gw, x), S.empties(gb, x), S.empties(gg, x), S.empties(gbe, x)


def _mlp_backward_op_impl(grad_out: Tensor, x: Tensor, acts: List[Tensor], rstd: List[Tensor], weights: List[Tensor],
                    biases: List[Tensor], ln_weights: List[Tensor], ln_biases: List[Tensor],
                    norm: List[bool], need_x: bool, need_weights: List[bool], need_biases: List[bool],
                    need_ln_weights: List[bool], need_ln_biases: List[bool], tile_rows: int, mm_dtype: int
                    ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Gradients of x and of every layer tensor; [0] placeholders where not needed."""
    g = _grad_buffers(x, _grad_shapes(x, weights, biases, ln_weights, ln_biases, need_x, need_weights, need_biases,
                                      need_ln_weights, need_ln_biases))
    _ext.require(OP).mlp_backward(grad_out, x, acts, rstd, weights, biases, optional(ln_weights),
                                  optional(ln_biases), norm, tile_rows, mm_dtype, *g)
    return g


def _mlp_backward_fake(grad_out, x, acts, rstd, weights, biases, ln_weights, ln_biases, norm, need_x, need_weights,
                       need_biases, need_ln_weights, need_ln_biases, tile_rows, mm_dtype):
    return _grad_buffers(x, _grad_shapes(x, weights, biases, ln_weights, ln_biases, need_x, need_weights,
                                         need_biases, need_ln_weights, need_ln_biases))


mlp_backward_op = define_op("mlp_backward", _mlp_backward_op_impl, _mlp_backward_fake)


def _setup_context(ctx, inputs, output):
    x, weights, biases, ln_weights, ln_biases, norm, save, tile_rows, mm_dtype = inputs
    out, acts, rstd = output
    ctx.L = len(weights)
    ctx.attrs = (list(norm), tile_rows, mm_dtype)
    ctx.out_shape = out.shape
    aux_outputs(ctx, *acts, *rstd)
    ctx.save_for_backward(x, *weights, *biases, *ln_weights, *ln_biases, *acts, *rstd)


@once_differentiable(OP)
def _backward(ctx, grad_out, grad_acts, grad_rstd):
    L = ctx.L
    norm, tile_rows, mm_dtype = ctx.attrs
    saved = ctx.saved_tensors
    x, rest = saved[0], saved[1:]
    weights, biases, ln_w, ln_b, acts, rstd = (list(rest[i * L:(i + 1) * L]) for i in range(6))
    ng = ctx.needs_input_grad
    nx, nw, nb, ngm, nbe = bool(ng[0]), needs(ng, 1, weights), needs(ng, 2, biases), needs(ng, 3, ln_w), \
        needs(ng, 4, ln_b)
    if grad_out is None:  # the output itself unused (aux outputs get no materialized zero gradients)
        grad_out = x.new_zeros(ctx.out_shape)
    gx, gw, gb, gg, gbe = mlp_backward_op(grad_out.contiguous(), x, acts, rstd, weights, biases, ln_w, ln_b, norm,
                                          nx, nw, nb, ngm, nbe, tile_rows, mm_dtype)
    return (gx if nx else None, or_none(gw, nw), or_none(gb, nb), or_none(gg, ngm), or_none(gbe, nbe),
            None, None, None, None)


register_autograd(mlp_op, _backward, _setup_context)


def mlp(x: torch.Tensor, layers: Sequence[Layer], matmul_dtype: Optional[torch.dtype] = None,
        tile_rows: Optional[int] = None, save_activations: Optional[bool] = None) -> torch.Tensor:
    """Evaluate a stack of layers on points with the fused kernel; same semantics as
    :func:`srn_fast.torch_impl.mlp`.

    Args:
        x: ``[B, N, C_in]`` float32/float64 (CPU) or float32 (CUDA).
        layers: list of :class:`srn_fast.Layer`; weights ``[B, C_out, C_in]`` per scene or ``[C_out, C_in]``
            shared (biases ``[B, C_out]`` / ``[C_out]`` likewise); LayerNorm (eps 1e-5) with optional affine,
            then ReLU; ``norm=False`` = plain linear.
        matmul_dtype: ``torch.bfloat16`` runs the matmuls of layers at least 16 wide in bf16 (float32
            accumulation and LayerNorm), forward and backward; None keeps the input precision.
        tile_rows: rays per CPU tile (default :data:`srn_fast.types.TILE_ROWS`); 0 runs the whole batch as one tile
            through batched GEMMs, the CUDA backend's code path (on the CPU: slower, for testing that path).
        save_activations: keep the normalised activations for backward (default :data:`SAVE_ACTIVATIONS`)
            or recompute them in backward.
    Returns:
        ``[B, N, C_out]``; differentiable w.r.t. ``x`` and every layer tensor (per-scene weight gradients stay
        per scene, so they flow on into a hypernetwork); once: a gradient of a gradient raises.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{OP}: x must be a tensor of shape [B, N, C_in], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_layers(layers, OP)
    tile = int(TILE_ROWS if tile_rows is None else tile_rows)
    if tile < 0:
        raise ValueError(f"{OP}: tile_rows must be >= 1 (or 0 for the batched path), got {tile}")
    ll = layer_lists(layers)
    grad_on = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, *ll.weights, *ll.biases, *ll.ln_weights, *ll.ln_biases))
    keep = SAVE_ACTIVATIONS if save_activations is None else bool(save_activations)
    out, _, _ = mlp_op(x, *ll, grad_on and keep, tile, mm_code(matmul_dtype, x, OP))
    return out
