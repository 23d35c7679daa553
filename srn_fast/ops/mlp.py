"""Fused small-MLP evaluation with a hand-written backward (``srn_fast._C.mlp_forward/mlp_backward``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _ext
from ..torch_impl import Layer
from ._layers import check_layers, flatten, grads_to_flat, mm_code, needs_flags, unflatten

#: Rays per CPU tile (activations of a tile stay in L2 through every layer).
TILE_ROWS = 128
#: Keep the normalised activations for backward (True) or recompute them tile by tile in backward (False).
#: Keeping them is faster on the CPU (see benchmarks/mlp_bench.py) at B*N*sum(C_l) extra numbers.
SAVE_ACTIVATIONS = True


class _MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, x, *flat):
        struct, mm, tile, grad_on, keep = meta
        ext = _ext.require("srn_fast.ops.mlp")
        W, b, g, be, norm = unflatten(flat, struct)
        save = grad_on and keep
        outs = ext.mlp_forward(x, W, b, g, be, norm, bool(save), tile, mm)
        ctx.meta = meta
        ctx.nsaved = len(outs) - 1
        if grad_on:
            ctx.save_for_backward(x, *flat, *outs[1:])
        return outs[0]

    @staticmethod
    def backward(ctx, v_out):
        struct, mm, tile, _, _ = ctx.meta
        saved = ctx.saved_tensors
        x = saved[0]
        nflat = len(saved) - 1 - ctx.nsaved
        flat = saved[1:1 + nflat]
        acts = list(saved[1 + nflat:])
        W, b, g, be, norm = unflatten(flat, struct)
        nW, nb, ng, nbe = needs_flags(ctx.needs_input_grad, struct, 2)
        needs = [ctx.needs_input_grad[1], nW, nb, ng, nbe]
        L = len(struct)
        res = _ext.require("srn_fast.ops.mlp").mlp_backward(v_out, x, acts, W, b, g, be, norm, needs, tile, mm)
        v_x = res[0]
        gW, gb, gg, gbe = res[1:1 + L], res[1 + L:1 + 2 * L], res[1 + 2 * L:1 + 3 * L], res[1 + 3 * L:1 + 4 * L]
        flat_grads = grads_to_flat(struct, gW, gb, gg, gbe)
        flat_grads = [gr if need else None for gr, need in zip(flat_grads, ctx.needs_input_grad[2:])]
        return (None, v_x if ctx.needs_input_grad[1] else None, *flat_grads)


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
        tile_rows: rays per CPU tile (default :data:`TILE_ROWS`); 0 runs the whole batch as one tile through
            batched GEMMs, the CUDA backend's code path (on the CPU: slower, for testing that path).
        save_activations: keep the normalised activations for backward (default :data:`SAVE_ACTIVATIONS`)
            or recompute them in backward.
    Returns:
        ``[B, N, C_out]``; differentiable w.r.t. ``x`` and every layer tensor (per-scene weight gradients stay
        per scene, so they flow on into a hypernetwork).
    """
    op = "srn_fast.ops.mlp"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{op}: x must be a tensor of shape [B, N, C_in], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_layers(layers, op)
    flat, struct = flatten(layers)
    grad_on = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *flat))
    tile = int(TILE_ROWS if tile_rows is None else tile_rows)
    if tile < 0:
        raise ValueError(f"{op}: tile_rows must be >= 1 (or 0 for the batched path), got {tile}")
    keep = SAVE_ACTIVATIONS if save_activations is None else bool(save_activations)
    meta = (tuple(struct), mm_code(matmul_dtype, x, op), tile, grad_on, keep)
    return _MLPFunction.apply(meta, x, *flat)
