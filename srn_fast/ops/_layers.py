"""Flattening of :class:`~srn_fast.torch_impl.Layer` lists into the tensor lists the extension takes."""
from __future__ import annotations

import functools
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from ..torch_impl import Layer

MM_DTYPES = {None: 0, torch.bfloat16: 1}


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> Optional[bool]:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16); None when unknown (no
    /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return None


def mm_code(matmul_dtype: Optional[torch.dtype], x: torch.Tensor, op: str) -> int:
    if matmul_dtype not in MM_DTYPES:
        raise ValueError(f"{op}: matmul_dtype must be None or torch.bfloat16, got {matmul_dtype}")
    if matmul_dtype is not None and x.dtype != torch.float32:
        raise ValueError(f"{op}: matmul_dtype={matmul_dtype} needs float32 inputs, got {x.dtype}")
    if matmul_dtype is torch.bfloat16 and x.device.type == "cpu" and cpu_has_bf16_matmul() is False:
        warnings.warn(f"{op}: matmul_dtype=torch.bfloat16 on a CPU without bf16 matmul instructions "
                      "(AVX512-BF16 / AMX): the bf16 matmuls are emulated with float32 arithmetic, so expect "
                      "little or no speed-up for the lost precision (measure with benchmarks/mlp_bench.py)",
                      RuntimeWarning, stacklevel=3)
    return MM_DTYPES[matmul_dtype]


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


def flatten(layers: Sequence[Layer]) -> Tuple[List[torch.Tensor], list]:
    """(tensors, structure): weights, biases and present LayerNorm affine tensors in one list."""
    tensors, struct = [], []
    for layer in layers:
        affine = layer.ln_weight is not None
        tensors += [layer.weight, layer.bias]
        if affine:
            tensors += [layer.ln_weight, layer.ln_bias]
        struct.append((bool(layer.norm), affine))
    return tensors, struct


def unflatten(tensors: Sequence[torch.Tensor], struct) -> Tuple[list, list, list, list, List[bool]]:
    W, b, g, be, norm = [], [], [], [], []
    i = 0
    for n, affine in struct:
        W.append(tensors[i])
        b.append(tensors[i + 1])
        i += 2
        if affine:
            g.append(tensors[i])
            be.append(tensors[i + 1])
            i += 2
        else:
            g.append(None)
            be.append(None)
        norm.append(n)
    return W, b, g, be, norm


def grads_to_flat(struct, gW, gb, gg, gbe) -> List[Optional[torch.Tensor]]:
    out = []
    for l, (_, affine) in enumerate(struct):
        out += [gW[l], gb[l]]
        if affine:
            out += [gg[l], gbe[l]]
    return out


def needs_flags(ctx_needs: Sequence[bool], struct, offset: int) -> Tuple[bool, bool, bool, bool]:
    """Whether any weight / bias / ln weight / ln bias among the flattened layer inputs needs grad."""
    nW = nb = ng = nbe = False
    i = offset
    for _, affine in struct:
        nW |= ctx_needs[i]
        nb |= ctx_needs[i + 1]
        i += 2
        if affine:
            ng |= ctx_needs[i]
            nbe |= ctx_needs[i + 1]
            i += 2
    return nW, nb, ng, nbe
