"""The small types and constants shared by the oracle (:mod:`srn_fast.torch_impl`), the fused ops
(:mod:`srn_fast.ops`) and the model: layer and LSTM parameter bundles, the LayerNorm epsilon, the march modes, the
CPU tile size and the matmul-precision codes. Defined once here so that the ops do not import their types from the
oracle and no constant is written twice.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

#: LayerNorm epsilon of every layer (torch.nn.LayerNorm's default, as the reference).
LAYERNORM_EPS = 1e-5

#: Rays per CPU tile of the fused ops (a tile's activations stay in L2 through every layer); 0 = the batched
#: whole-batch path (the CUDA backend's orchestration, runnable on the CPU for tests).
TILE_ROWS = 128

#: March modes of the fused op: what the forward keeps for backward.
MARCH_MODES = {"inference": 0, "recompute": 1, "store": 2}

#: Matmul precision codes of the fused ops: None = the inputs' dtype, bfloat16 = bf16 inputs, float32 accumulation.
MM_DTYPES = {None: 0, torch.bfloat16: 1}


class Layer(NamedTuple):
    """One layer of a small MLP: ``y = x W^T + b``, then (if ``norm``) LayerNorm, optional affine, ReLU.

    weight: ``[C_out, C_in]`` shared, or ``[B, C_out, C_in]`` per scene.
    bias:   ``[C_out]`` shared, or ``[B, C_out]`` per scene.
    norm:   False makes the layer plain linear (the pixel generator's last layer).
    ln_weight, ln_bias: ``[C_out]`` LayerNorm affine parameters, or None (phi's layers have none).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    norm: bool = True
    ln_weight: Optional[torch.Tensor] = None
    ln_bias: Optional[torch.Tensor] = None


class LSTMParams(NamedTuple):
    """Weights of ``nn.LSTMCell(F, H)`` (gate order i, f, g, o) and of the ``Linear(H, 1)`` step head."""

    weight_ih: torch.Tensor  # [4H, F]
    weight_hh: torch.Tensor  # [4H, H]
    bias_ih: torch.Tensor  # [4H]
    bias_hh: torch.Tensor  # [4H]
    out_weight: torch.Tensor  # [1, H]
    out_bias: torch.Tensor  # [1]
