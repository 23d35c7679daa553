"""Output and saved-state shapes of the fused ops: the one function per op that both the real kernels' allocation
(:mod:`srn_fast.ops.mlp`, :mod:`srn_fast.ops.march`) and their fake (meta) kernels call, so that what
``torch.compile`` traces is by construction what the kernels produce. The C++ entry points check every buffer
against the same rules (csrc/mlp/mlp.h, csrc/march/march.cpp).

A ``(0,)`` shape is a placeholder: an output that this configuration does not keep (fixed-arity returns: the
number of tensors never depends on the device, the tile size or the mode). Shapes may hold SymInts.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..types import MARCH_MODES
from . import buffer_cache

Shape = Tuple
NONE: Shape = (0,)


def batched_path(device: torch.device, tile_rows: int) -> bool:
    """The whole batch as one tile through batched GEMMs: always on CUDA, and on the CPU with ``tile_rows == 0``."""
    return device.type == "cuda" or int(tile_rows) == 0


class MLPShapes(NamedTuple):
    out: Shape
    acts: List[Shape]
    rstd: List[Shape]
    acts_dtype: List[Optional[torch.dtype]]  # per act: None = the input's dtype


def xhat_dtype(batched: bool, mm_dtype: int, norm: bool, kept: bool) -> Optional[torch.dtype]:
    """A saved activation's dtype (None: the input's). With bf16 matmuls (``mm_dtype`` 1) the CPU tiles keep a
    LayerNorm layer's xhat in bf16: half the bytes that store mode writes and reads back (csrc/common/mlp_tile.h,
    "Saved activations"); everything else, and the batched path's pre-activations, stay in the input's dtype."""
    return torch.bfloat16 if kept and not batched and int(mm_dtype) == 1 and norm else None


def mlp_shapes(x: torch.Tensor, weights: Sequence[torch.Tensor], norm: Sequence[bool], save: bool,
               tile_rows: int, mm_dtype: int = 0) -> MLPShapes:
    """``out [B, N, C_L]``; per layer l what backward needs when ``save``: CPU tiles keep ``acts[l] [B, N, C_l]``
    (xhat, or the output of a plain hidden layer; nothing for a plain last layer) and ``rstd[l] [B, N]`` for norm
    layers; the batched path keeps the pre-norm ``acts[l]`` of every layer and no rstd. Dtypes: :func:`xhat_dtype`."""
    B, N = x.shape[0], x.shape[1]
    L = len(weights)
    widths = [w.shape[-2] for w in weights]
    batched = batched_path(x.device, tile_rows)
    acts = [(B, N, widths[l]) if save and (batched or l < L - 1 or norm[l]) else NONE for l in range(L)]
    rstd = [(B, N) if save and not batched and norm[l] else NONE for l in range(L)]
    return MLPShapes((B, N, widths[-1]), acts, rstd,
                     [xhat_dtype(batched, mm_dtype, norm[l], acts[l] != NONE) for l in range(L)])


def folds_last(norm: Sequence[bool], batched: bool) -> bool:
    """The march's CPU tiles fold phi's last layer into the LSTM's input GEMM: a plain linear layer, not the only one
    (csrc/march/march.cpp, ``folds_last``)."""
    return not batched and len(norm) >= 2 and not norm[-1]


class MarchShapes(NamedTuple):
    xT: Shape
    steps: Shape
    xs: Shape
    hs: Shape
    cs: Shape
    gates: Shape
    acts: List[Shape]
    rstd: List[Shape]
    acts_dtype: List[Optional[torch.dtype]]  # per act: None = the input's dtype


def march_shapes(x0: torch.Tensor, weights: Sequence[torch.Tensor], norm: Sequence[bool], w_hh: torch.Tensor,
                 steps: int, mode: int, return_steps: bool, tile_rows: int, mm_dtype: int = 0) -> MarchShapes:
    """``xT [B, N, 3]``; ``steps [T + 1, B, N, 3]`` with return_steps; unless inference: ``xs [T, B, N, 3]``,
    ``hs, cs [T + 1, B, N, H]``, ``gates [T, B, N, 4H]``; store mode: per phi layer ``acts[l] [T, B, N, C_l]`` and, on
    the CPU tiles, ``rstd[l] [T, B, N]`` for norm layers. The CPU tiles fold a plain linear last layer of phi into the
    LSTM's input GEMM (csrc/march/march.cpp, ``LstmInput``): it never runs there, so nothing is kept for it."""
    B, N = x0.shape[0], x0.shape[1]
    T, H = int(steps), w_hh.shape[1]
    keep = mode != MARCH_MODES["inference"]
    store = mode == MARCH_MODES["store"]
    batched = batched_path(x0.device, tile_rows)
    acts = [(T, B, N, w.shape[-2]) if store and not (l == len(weights) - 1 and folds_last(norm, batched)) else NONE
            for l, w in enumerate(weights)]
    return MarchShapes(
        (B, N, 3), (T + 1, B, N, 3) if return_steps else NONE,
        (T, B, N, 3) if keep else NONE, (T + 1, B, N, H) if keep else NONE, (T + 1, B, N, H) if keep else NONE,
        (T, B, N, 4 * H) if keep else NONE, acts,
        [(T, B, N) if store and not batched and n else NONE for n in norm],
        [xhat_dtype(batched, mm_dtype, n, a != NONE) for n, a in zip(norm, acts)])


def grad_shape(param: torch.Tensor, needed: bool) -> Shape:
    """A gradient output: the parameter's shape when needed, else the placeholder."""
    return tuple(param.shape) if needed else NONE


def empty(shape: Shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An op's output buffer (``like.new_empty(shape, dtype=dtype)``, dtype None: like's); large CPU ones reused from
    :mod:`srn_fast.ops.buffer_cache` (a real tensor's only: fake kernels and traced graphs get a plain
    ``new_empty``). Outputs too, not only what is saved for backward: a 128x128 step's 32 MB feature and
    input-gradient outputs were fresh pages every step."""
    return buffer_cache.take(shape, like, dtype)


def empties(shapes: Sequence[Shape], like: torch.Tensor,
            dtypes: Optional[Sequence[Optional[torch.dtype]]] = None) -> List[torch.Tensor]:
    return [empty(s, like, None if dtypes is None else d) for s, d in zip(shapes, dtypes or [None] * len(shapes))]

