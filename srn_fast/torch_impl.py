"""Pure-PyTorch implementations of srn_fast's operations: the oracle the fused kernels are tested
against, and the ``backend="torch"`` path of :class:`srn_fast.SRNModel`.

They mirror the reference SRN code step for step (``custom_layers.Raymarcher``,
``hyperlayers.BatchLinear``, ``pytorch_prototyping.FCBlock``), including the clamp of the gradient of
the LSTM hidden state to [-10, 10] at every marching step.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .types import LAYERNORM_EPS, Layer, LSTMParams

__all__ = ["LAYERNORM_EPS", "Layer", "LSTMParams", "linear", "mlp", "march", "mlp_reference_layers"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C_in] -> [B, N, C_out]`` with shared or per-scene weights."""
    if weight.dim() == 3:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return F.linear(x, weight, bias)


def mlp(x: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
    """Evaluate a stack of :class:`Layer` on points ``x [B, N, C_in]``."""
    for layer in layers:
        x = linear(x, layer.weight, layer.bias)
        if layer.norm:
            x = F.layer_norm(x, (x.shape[-1],), layer.ln_weight, layer.ln_bias, eps=LAYERNORM_EPS)
            x = F.relu(x)
    return x


def _clamp_hook(limit: float):
    return lambda g: g.clamp(min=-limit, max=limit)


def march(x0: torch.Tensor, dirs: torch.Tensor, phi: Sequence[Layer], lstm: LSTMParams, steps: int,
          grad_clamp: Optional[float] = 10.0, return_steps: bool = False
          ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The reference ray marcher (learned sphere tracing).

    Args:
        x0:   ``[B, N, 3]`` start points (pixels lifted to the initial depth).
        dirs: ``[B, N, 3]`` unit ray directions.
        phi:  the scene network, a list of :class:`Layer` ending in a ``F``-wide feature.
        lstm: :class:`LSTMParams` (hidden size H).
        steps: number of marching steps T.
        grad_clamp: the gradient of h is clamped to [-grad_clamp, grad_clamp] at every step
            (the reference's backward hook); None disables it.
        return_steps: also return the points of every step.

    Returns:
        ``x_T [B, N, 3]``, and with ``return_steps`` also ``[T + 1, B, N, 3]`` (x_0 .. x_T).
    """
    B, N, _ = x0.shape
    H = lstm.weight_hh.shape[1]
    x = x0
    h = x0.new_zeros(B * N, H)
    c = x0.new_zeros(B * N, H)
    points = [x0]
    for _ in range(steps):
        v = mlp(x, phi)
        h, c = torch.lstm_cell(v.reshape(B * N, -1), (h, c), lstm.weight_ih, lstm.weight_hh, lstm.bias_ih,
                               lstm.bias_hh)
        if grad_clamp is not None and h.requires_grad:
            h.register_hook(_clamp_hook(grad_clamp))
        s = F.linear(h, lstm.out_weight, lstm.out_bias).reshape(B, N, 1)
        x = x + dirs * s
        if return_steps:
            points.append(x)
    if return_steps:
        return x, torch.stack([p.detach() for p in points])
    return x


def mlp_reference_layers(layers: Sequence[Layer]) -> List[Layer]:
    """Layers with every tensor detached and cloned (for tests comparing two implementations)."""
    return [Layer(*(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in layer)) for layer in layers]
