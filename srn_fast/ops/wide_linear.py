"""A linear layer for few rows and many outputs, ``y = x W^T + b``, as the dispatcher op ``srn_fast::wide_linear``:
the hypernetwork's last layers, which map B latent features ``[B, 256]`` to a phi layer's weights and bias
``[B, 65792]`` through a ``[65792, 256]`` weight (67 MB in float32, read once per product).

Such a product is bound by reading the weight, but the CPU BLAS (MKL) runs it far below that bound in some layouts,
and which ones depends on the CPU. On the CPU with the extension built, the forward is its one pass over the
weight's rows (``wide_linear_forward`` in ``csrc/wide_linear/wide_linear.cpp``: each row's M dot products, the
output written as [M, O] with the bias added, no timing, the same bits for any thread count): on a 2-core Zen 4, M =
2, three [65792, 256] layers with cold weights 7.1-7.8 ms against 8.7-9.3 ms for the ``addmm`` layout below with
its bias copy and transpose, as fast as ``W.sum()`` reads them. Elsewhere the gradient of x, ``g W``, splits the
weight's rows into 128 chunks (one batched product, then a sum); the gradient of W is ``g^T x`` as in
``F.linear``; and the forward is ``addmm(b, W, x^T)^T`` (the output's rows are the weight's rows) or ``F.linear``
itself, whichever the first call measures faster on the CPU (:func:`forward_layout`; once per weight shape, batch
size and dtype). Measured on a 2-core AVX2 EPYC, weight [65792, 256] (reading it once: 2.6 ms; wall-clock medians
of 25 calls):

* B = 2 (the training batch): forward 16.1 (``F.linear``) -> 3.9 ms (addmm), gradient of x 13.8 -> 5.5 ms;
* B = 8: 15.0 -> 8.0 and 7.3 -> 5.6 ms; B = 32: 20.5 -> 16.1 and 12.6 -> 10.8 ms.

A 64x64 training step of the fused model (B = 2) spends ~60 ms instead of ~134 ms in its hypernetwork there. On a
2-core AMX Xeon the picture is the other way round: B = 2, weights beyond the cache (reading one: 3.3 ms),
``F.linear`` 3.1 ms against addmm 6.3-7.5 ms.

The backward on the CPU is the extension's one pass over the weight (``srn_fast::wide_linear_grads``,
``csrc/wide_linear/wide_linear.cpp``): each row of W read once for the gradient of x, and the same row of the
gradient of W written once with non-temporal stores (not read first, not evicting the cache). On a 2-core Zen 4,
B = 2, weight [65792, 256]: both gradients 4.0 ms against 13.3 ms for the products (grad of W through ``mm``
8.2 ms, grad of x 4.8 ms); the 64x64 bf16 training step ~444 -> ~424 ms. Elsewhere (CUDA, other dtypes, no
extension) and in a double backward the products below run.

The values equal ``F.linear``'s up to float rounding (the sums run in another order). Without the extension the
forward and the products are plain PyTorch, so it runs on every device (on CUDA the grad of x is one ``mm``:
cuBLAS splits the long sum itself); a gradient of a gradient works, and ``torch.compile`` sees one op.
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

import torch
from torch import Tensor

from .. import _ext
from . import buffer_cache
from ._layers import define_op, register_autograd

OP = "srn_fast.ops.wide_linear"
#: Chunks of the weight's rows in the CPU grad of x (one batched product over the chunks, then a sum).
GRAD_X_CHUNKS = 128


def _rows(y: Tensor) -> Tensor:
    """``y [O, M]`` (M small) as a contiguous ``[M, O]``: its M columns stacked. ``y.t().contiguous()`` is the same
    copy through ATen's generic transpose, ~7x slower here (2-core Zen 4, O = 65792, M = 2: 335 against 45 us hot,
    ~600 us inside a training step; three such layers a step)."""
    return y.t() if y.shape[1] == 1 else torch.stack(y.unbind(1))


_LAYOUTS = {
    "addmm": lambda x, weight, bias: _rows(torch.addmm(bias[:, None], weight, x.t())),
    "linear": lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias),
}
_layout_choice: Dict[Tuple, str] = {}
#: Weights of fewer elements than this take "addmm" without a timing: their two layouts differ by microseconds, and a
#: timed pick flipped between processes (the 1024-output layer of phi's first weights: 3 of 6 processes), and with it
#: the rounding of phi's weights, so the same seed trained to other bits.
MEASURE_MIN_NUMEL = 1 << 22


def forward_layout(x: Tensor, weight: Tensor) -> str:
    """The forward's layout for this call's shapes where the extension's CPU forward does not run: "addmm" off the
    CPU, for weights of fewer than :data:`MEASURE_MIN_NUMEL` elements, and under
    ``torch.use_deterministic_algorithms(True)`` (where "linear" is the faster, as on the AMX Xeon above, that costs
    ~3-4 ms a wide layer); otherwise the faster of "addmm" and "linear" as the first call with these shapes measures
    it (each timed twice on the call's own weight, the best kept)."""
    if x.device.type != "cpu" or weight.numel() < MEASURE_MIN_NUMEL or torch.are_deterministic_algorithms_enabled():
        return "addmm"
    key = (tuple(weight.shape), x.shape[0], x.dtype)
    if key not in _layout_choice:
        bias = weight.new_zeros(weight.shape[0])
        best = {}
        with torch.no_grad():
            for _ in range(2):
                for name, f in _LAYOUTS.items():
                    t = time.perf_counter()
                    f(x, weight, bias)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        _layout_choice[key] = min(best, key=best.get)
    return _layout_choice[key]


def _wide_linear_op_impl(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [M, K], weight [O, K], bias [O] -> [M, O]: on the CPU the extension's one pass over the weight's rows where it
    is built (:func:`_fused_cpu`), else the faster layout (:func:`forward_layout`)."""
    ext = _fused_cpu(x)
    if ext is not None:
        out = x.new_empty(x.shape[0], weight.shape[0])
        ext.wide_linear_forward(x, weight, bias, out)
        return out
    return _LAYOUTS[forward_layout(x, weight)](x, weight, bias)


def _wide_linear_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


wide_linear_op = define_op("wide_linear", _wide_linear_op_impl, _wide_linear_fake)


def grad_input(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad [M, O] @ weight [O, K] -> [M, K]``: on the CPU the O rows in chunks (one bmm, then a sum over the
    chunks; a remainder of O rows not filling a chunk in one more product)."""
    M, O = grad.shape
    K = weight.shape[1]
    k = min(GRAD_X_CHUNKS, O)
    if grad.device.type != "cpu" or k < 2:
        return grad @ weight
    rows = O // k
    main = k * rows
    out = torch.bmm(grad[:, :main].reshape(M, k, rows).transpose(0, 1), weight[:main].reshape(k, rows, K)).sum(0)
    if main < O:
        out = out + grad[:, main:] @ weight[main:]
    return out


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def grad_weight(grad: Tensor, x: Tensor) -> Tensor:
    """``grad^T [O, M] @ x [M, K] -> [O, K]``. Outside a double backward, into a buffer of
    :mod:`srn_fast.ops.buffer_cache`: the 67 MB weight gradient is new every step (zero_grad(set_to_none=True)
    frees it), and fresh pages cost ~16,000 page faults a layer."""
    if torch.is_grad_enabled():  # building a graph (create_graph=True): out= has no autograd
        return grad.t() @ x
    return torch.mm(grad.t(), x, out=buffer_cache.take((grad.shape[1], x.shape[1]), x))


def _fused_cpu(t: Tensor):
    """The extension, for its one-pass CPU forward and backward (csrc/wide_linear/wide_linear.cpp), where they apply
    to tensors like ``t`` (CPU, float32 or float64, the extension built); else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    ext = _ext.load()
    return ext if ext is not None and hasattr(ext, "wide_linear_forward") else None


def _wide_linear_grads_impl(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool,
                            need_w: bool) -> Tuple[Tensor, Tensor]:
    """grad [M, O], x [M, K], weight [O, K] -> (grad_x [M, K], grad_weight [O, K]); [0] for one not needed. On the
    CPU one pass over the weight (the extension: grad_weight streamed out, ~3x faster there), else the products
    above."""
    ext = _fused_cpu(grad)
    if ext is None:
        return (grad_input(grad, weight) if need_x else x.new_empty(0),
                grad_weight(grad, x) if need_w else x.new_empty(0))
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gw = buffer_cache.take(weight.shape, x) if need_w else x.new_empty(0)
    ext.wide_linear_backward(grad, x, weight, gx, gw)
    return gx, gw


def _wide_linear_grads_fake(grad, x, weight, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            x.new_empty(weight.shape) if need_w else x.new_empty(0))


wide_linear_grads_op = define_op("wide_linear_grads", _wide_linear_grads_impl, _wide_linear_grads_fake)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    gb = grad.sum(0) if need_b else None
    if torch.is_grad_enabled():  # a double backward (create_graph=True): differentiable products
        return grad_input(grad, weight) if need_x else None, grad_weight(grad, x) if need_w else None, gb
    if not (need_x or need_w):
        return None, None, gb
    gx, gw = wide_linear_grads_op(grad.contiguous(), x, weight, need_x, need_w)
    return gx if need_x else None, gw if need_w else None, gb


register_autograd(wide_linear_op, _backward, _setup_context)


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` (``F.linear``'s semantics) computed in the layouts that suit few rows and many outputs.

    Args:
        x: ``[M, K]`` (M small: the scenes of a batch).
        weight: ``[O, K]`` (nn.Linear's layout).
        bias: ``[O]``.
    Returns:
        ``[M, O]``, differentiable w.r.t. all three (to any order).
    """
    for name, t, dim in (("x", x, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{OP}: {name} must be a {dim}-D tensor, got {got}")
    if weight.shape[1] != x.shape[1] or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{OP}: expected x [M, K], weight [O, K] and bias [O], got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, bias {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{OP}: {name} must have x's dtype and device ({x.dtype}, {x.device}), got "
                             f"{t.dtype}, {t.device}")
    return wide_linear_op(x, weight, bias)
