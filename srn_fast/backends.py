"""The seam between the model and the arithmetic: one place picks the implementation of
"evaluate an MLP" (phi and the pixel generator), "evaluate a hypernetwork" and "march" for
:class:`srn_fast.SRNModel`.

* ``"torch"``: :mod:`srn_fast.torch_impl`, the pure-PyTorch reference (the tests' oracle).
* ``"fused"``: the C++/CUDA kernels in :mod:`srn_fast.ops`, with hand-written backward passes.
* ``"auto"``: ``"fused"`` when the extension provides both ops, else ``"torch"``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ext, ops, torch_impl
from .types import Layer, LSTMParams

BACKENDS = ("auto", "fused", "torch")


class TorchBackend:
    name = "torch"

    def mlp(self, x: torch.Tensor, layers: Sequence[Layer], matmul_dtype: Optional[torch.dtype] = None,
            save_activations: Optional[bool] = None):
        # save_activations has no meaning here: autograd keeps what it keeps
        if matmul_dtype is not None:
            raise ValueError("matmul_dtype (reduced-precision matmuls) needs backend='fused'")
        return torch_impl.mlp(x, layers)

    def hyper_mlp(self, z: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
        """A hypernetwork (shared weights) on the latent codes ``z [B, C_in]``: the reference's arithmetic."""
        return torch_impl.mlp(z, layers)

    def march(self, x0, dirs, phi: Sequence[Layer], lstm: LSTMParams, steps: int, grad_clamp: Optional[float] = 10.0,
              return_steps: bool = False, mode: str = "recompute", matmul_dtype: Optional[torch.dtype] = None):
        if matmul_dtype is not None:
            raise ValueError("matmul_dtype (reduced-precision matmuls) needs backend='fused'")
        return torch_impl.march(x0, dirs, phi, lstm, steps, grad_clamp=grad_clamp, return_steps=return_steps)


class FusedBackend:
    """Calls :func:`srn_fast.ops.mlp` and :func:`srn_fast.ops.march` (dispatcher ops: torch.compile sees them whole).
    The extension is required once, here, so that nothing on the model's forward path looks it up."""

    name = "fused"

    def __init__(self):
        _ext.require("backend='fused'")

    def mlp(self, x, layers, matmul_dtype=None, save_activations=None):
        return ops.mlp(x, layers, matmul_dtype=matmul_dtype, save_activations=save_activations)

    def hyper_mlp(self, z, layers):
        """The hypernetwork's small layers in PyTorch, its wide last layer (256 -> a phi layer's 65792 weights) with
        :func:`srn_fast.ops.wide_linear` (3x faster on the CPU in forward and in the gradient of its input)."""
        last = layers[-1]
        if last.norm or last.weight.dim() != 2 or z.dim() < 2:
            return torch_impl.mlp(z, layers)
        h = torch_impl.mlp(z, layers[:-1]) if len(layers) > 1 else z
        lead = h.shape[:-1]
        out = ops.wide_linear(h.reshape(-1, h.shape[-1]), last.weight, last.bias)
        return out.reshape(*lead, out.shape[-1])

    def march(self, x0, dirs, phi, lstm, steps, grad_clamp=10.0, return_steps=False, mode="recompute",
              matmul_dtype=None):
        return ops.march(x0, dirs, phi, lstm, steps, grad_clamp=grad_clamp, return_steps=return_steps,
                               mode=mode, matmul_dtype=matmul_dtype)


def fused_available() -> bool:
    """True when the compiled extension provides the fused MLP and march ops."""
    from . import _ext

    ext = _ext.load()
    return ext is not None and hasattr(ext, "mlp_forward") and hasattr(ext, "march_forward")


def get_backend(name: str = "auto"):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "fused" if fused_available() else "torch"
    if name == "fused":
        if not fused_available():
            from . import _ext

            _ext.require("backend='fused'")
            raise RuntimeError("backend='fused': this build of srn_fast._C lacks the fused mlp/march ops; "
                               "rebuild with `pip install --no-build-isolation .`")
        return FusedBackend()
    return TorchBackend()
