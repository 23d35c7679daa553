"""Argument handling shared by the fused ops: layer lists to the ops' named tensor lists, the matmul-precision
code, input checks, the CPU's bf16 capability, and the once-differentiable guard of the ops' backward."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, FrozenSet, List, NamedTuple, Optional, Sequence

import torch
from torch.utils import _pytree

from ..types import MM_DTYPES, Layer


@functools.lru_cache(maxsize=None)
def cpu_flags() -> Optional[FrozenSet[str]]:
    """The CPU's feature flags from /proc/cpuinfo (e.g. "avx512_bf16"); None when unknown (no /proc/cpuinfo).
    Cached: read once, outside any compiled region."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_bf16_matmul() -> Optional[bool]:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16); None when unknown (no
    /proc/cpuinfo). The model asks at construction, outside any compiled region."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16"})


def mm_code(matmul_dtype: Optional[torch.dtype], x: torch.Tensor, op: str) -> int:
    """The ops' integer code of ``matmul_dtype``; checks it (and warns once about bf16 on a CPU without bf16
    instructions, outside compiled regions: nothing here reads files or warns while torch.compile traces)."""
    if matmul_dtype not in MM_DTYPES:
        raise ValueError(f"{op}: matmul_dtype must be None or torch.bfloat16, got {matmul_dtype}")
    if matmul_dtype is not None and x.dtype != torch.float32:
        raise ValueError(f"{op}: matmul_dtype={matmul_dtype} needs float32 inputs, got {x.dtype}")
    if matmul_dtype is torch.bfloat16 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        warn_if_no_bf16(op)
    return MM_DTYPES[matmul_dtype]


def warn_if_no_bf16(op: str) -> None:
    if cpu_has_bf16_matmul() is False:
        warnings.warn(f"{op}: matmul_dtype=torch.bfloat16 on a CPU without bf16 matmul instructions "
                      "(AVX512-BF16 / AMX): the bf16 matmuls are emulated with float32 arithmetic, so expect "
                      "little or no speed-up for the lost precision (measure with benchmarks/mlp_bench.py)",
                      RuntimeWarning, stacklevel=4)


def check_layers(layers: Sequence[Layer], op: str) -> None:
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise ValueError(f"{op}: layers must be a non-empty list of srn_fast.Layer, got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"{op}: layers[{i}] must be a srn_fast.Layer (weight, bias, norm, ln_weight, ln_bias), "
                            f"got {type(layer).__name__}")
        for name in ("weight", "bias"):
            if not isinstance(getattr(layer, name), torch.Tensor):
                raise TypeError(f"{op}: layers[{i}].{name} must be a tensor")


class LayerLists(NamedTuple):
    """A layer stack as the ops' named list arguments (``Tensor[]``, ``bool[]``). A layer without LayerNorm affine
    has a ``[0]`` placeholder in ``ln_weights`` / ``ln_biases``: a ``Tensor?[]`` argument holding None would not be
    differentiable through ``register_autograd`` (the whole list becomes one non-tensor argument), so the affine
    parameters of the other layers would silently get no gradient."""

    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    ln_weights: List[torch.Tensor]
    ln_biases: List[torch.Tensor]
    norm: List[bool]


def layer_lists(layers: Sequence[Layer]) -> LayerLists:
    def opt(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return like.new_empty(0) if t is None else t

    return LayerLists([l.weight for l in layers], [l.bias for l in layers],
                      [opt(l.ln_weight, l.weight) for l in layers], [opt(l.ln_bias, l.weight) for l in layers],
                      [bool(l.norm) for l in layers])


def check_devices(op: str, ref_name: str, ref: torch.Tensor, lists: LayerLists, **others: torch.Tensor) -> None:
    """Every tensor on ref's device (the fake kernels call this: with a tensor on another device, e.g. 'meta', the
    dispatcher would otherwise run the fake kernel and return meta tensors instead of failing)."""
    named = [(f"layers[{i}].{n}", t) for n, ts in (("weight", lists.weights), ("bias", lists.biases),
                                                   ("ln_weight", lists.ln_weights), ("ln_bias", lists.ln_biases))
             for i, t in enumerate(ts)] + list(others.items())
    for name, t in named:
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must be on "
                               "the same device")


def is_placeholder(t: torch.Tensor) -> bool:
    return t.dim() == 1 and t.shape[0] == 0


def optional(ts: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The C++ entry points' view of an affine list: None for a placeholder."""
    return [None if is_placeholder(t) else t for t in ts]


def needs(flags, index: int, tensors: Sequence[torch.Tensor]) -> List[bool]:
    """Per-element needs_input_grad of a ``Tensor[]`` argument (False for a placeholder)."""
    f = flags[index]
    f = [bool(v) for v in f] if isinstance(f, (list, tuple)) else [bool(f)] * len(tensors)
    return [n and not is_placeholder(t) for n, t in zip(f, tensors)]


def or_none(grads: Sequence[torch.Tensor], flags: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """The op's gradient outputs as autograd wants them: None where not needed (a [0] placeholder came back)."""
    return [g if f else None for g, f in zip(grads, flags)]


_LIB = torch.library.Library("srn_fast", "DEF")


def define_op(name: str, impl: Callable, fake: Callable):
    """Defines the dispatcher op ``srn_fast::name``: its schema inferred from ``impl``'s annotations (named, typed
    arguments), ``impl`` as its kernel on every device (it calls the C++ entry point, which dispatches on the
    device itself) and ``fake`` as its fake (meta) kernel. Returns the op (an OpOverload).

    Why the low-level torch.library API rather than ``@torch.library.custom_op``: custom_op wraps the kernel in
    ``torch._disable_dynamo``, which imports torch._dynamo on the first call (about 120k more live objects: every
    later garbage collection of the process gets slower; measured +9% on a CPU training step) and adds about 1 ms to
    each call. The op is the same to torch.compile, opcheck and autograd (``torch.library.register_autograd``)."""
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"srn_fast::{name}", fake, lib=_LIB)
    return getattr(torch.ops.srn_fast, name).default


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIB)


def aux_outputs(ctx, *tensors: torch.Tensor) -> None:
    """In an op's setup_context: ``tensors`` (outputs kept only for the backward: saved activations, per-step
    points) are not differentiable, and the backward gets None rather than a materialized zero gradient for every
    output nothing used (a training step's march otherwise allocated and zero-filled ~340 MB of gradients of its
    [T, B, N, 256] saved activations at 64x64, 9% of the step)."""
    ctx.mark_non_differentiable(*tensors)
    ctx.set_materialize_grads(False)


def once_differentiable(op: str) -> Callable:
    """Makes an op's backward once-differentiable with a clear error: the backward runs without building a graph,
    and when the caller asked for one (``create_graph=True``, e.g. a gradient penalty) while any input or saved
    tensor requires grad, the gradients come back attached to a node that raises on a second backward instead of
    silently dropping the second-order terms."""
    msg = (f"{op}: double backward (a gradient of a gradient, e.g. a gradient penalty through "
           "torch.autograd.grad(..., create_graph=True)) is not supported by the fused op; use backend='torch' "
           "(srn_fast.torch_impl) for higher-order gradients").encode()

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = fn(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            inputs = [g for g in grads if isinstance(g, torch.Tensor)] + \
                [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor)]
            if not any(t.requires_grad for t in inputs):
                return out
            flat, spec = _pytree.tree_flatten(out)
            idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)]
            if not idx:
                return out
            err = torch._C._functions.DelayedError(msg, len(idx))
            tied = err(*[flat[i].detach().requires_grad_() for i in idx])
            tied = tied if isinstance(tied, tuple) else (tied,)
            for i, t in zip(idx, tied):
                flat[i] = t
            return _pytree.tree_unflatten(flat, spec)
        return wrapper
    return deco
