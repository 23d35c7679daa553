"""Choices made for the user: the matmul precision (``matmul_dtype="auto"``) and the march's memory mode
(``march_mode="auto"``), each decided once, by measurement or by the memory at hand, and logged once.

* Precision: bf16 matmuls (float32 accumulation, LayerNorm / LSTM / step update in float32) only where this machine
  runs them faster than float32. On the CPU that is measured once per process by the extension, the way the tile
  loops run their GEMMs (:func:`tile_gemm_rates`: float32 and each bf16 route: MKL's, srn_fast's own AVX512-BF16
  kernel, oneDNN's, "widened"); bf16 is chosen when the best route the tile loops may pick on their own (MKL's or
  the AVX512-BF16 kernel: float32 results) is at least :data:`BF16_MARGIN` times the float32 rate. On CUDA: bf16 where the GPU supports it
  (tensor cores). TF32 for float32 matmuls on CUDA follows ``torch.backends.cuda.matmul.allow_tf32`` (the CUDA
  path's matmuls are ATen/cuBLAS calls, which honour it).
* March mode: ``"store"`` (keep phi's activations: ~25% faster float32 training steps) when what it keeps fits
  :data:`STORE_BUDGET_FRACTION` of the memory available on the device (or a budget in bytes given to the model),
  else ``"recompute"`` (keep ~50 numbers per ray and step; the mode that scales to large batches). With bf16
  matmuls the CPU tiles keep xhat in bf16 (:func:`store_bytes`' ``xhat_size``), and store stays the faster mode
  even on AMX (a 2-core AMX Xeon's bf16 step: store 8-10% faster than recompute at 64x64, 11-13% at 128x128; with
  float32 xhat the two were even and auto recomputed there).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Dict, Optional, Sequence, Union

import torch

from .. import _ext

logger = logging.getLogger("srn_fast")

#: bf16 is chosen only when its best measured route beats float32 by this factor.
BF16_MARGIN = 1.1
#: march_mode="auto" stores activations while they take at most this fraction of the available memory
#: (``SRN_FAST_STORE_BUDGET`` overrides it: a fraction below 1, or a number of bytes).
STORE_BUDGET_FRACTION = 0.25

MatmulSpec = Union[None, str, torch.dtype]
_logged = set()


def log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


@functools.lru_cache(maxsize=None)
def tile_gemm_rates() -> Dict[str, float]:
    """GFLOP/s of the CPU tile GEMM ([128, 256] x [256, 256], every thread on its own tile) in float32 and through
    each bf16 route ("mkl", "onednn", "widened", and "avx512bf16" / "amx" where the CPU has them), measured once per
    process;
    {} without the extension."""
    ext = _ext.load()
    if ext is None or not hasattr(ext, "cpu_tile_gemm_rates"):
        return {}
    return {name: float(r) for name, r in ext.cpu_tile_gemm_rates()}


def bf16_pays(device: Union[str, torch.device]) -> bool:
    """Whether bf16 matmuls run faster than float32 here (CPU: measured, or under
    ``torch.use_deterministic_algorithms(True)`` whether the CPU has bf16 instructions: the routes the extension
    found, read from :func:`tile_gemm_rates`, whose rates are measured once but not compared; CUDA: bf16 tensor
    cores)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if torch.are_deterministic_algorithms_enabled():
        return bool({"avx512bf16", "amx"} & set(tile_gemm_rates()))
    return _bf16_speedup() >= BF16_MARGIN


def _bf16_speedup() -> float:
    """The best bf16 tile GEMM rate over the float32 one (0 without a measurement). The routes the tile loops may
    pick on their own ("mkl", "avx512bf16", "amx"): "widened" is the float32 GEMM on widened bf16 operands (never
    faster than float32, whatever the noise says) and "onednn" rounds every result to bf16, so it runs only when
    forced (SRN_FAST_BF16_GEMM)."""
    rates = tile_gemm_rates()
    best = max((r for k, r in rates.items() if k not in ("float32", "widened", "onednn")), default=0.0)
    return best / rates["float32"] if rates.get("float32") else 0.0


def describe_rates() -> str:
    rates = tile_gemm_rates()
    return ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s" if rates else "no measurement"


def resolve_matmul_dtype(spec: MatmulSpec, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """None (the inputs' precision) or torch.bfloat16, from None / torch.float32 / torch.bfloat16 / "auto"."""
    if spec is None or spec == torch.float32 or spec == "float32":
        return None
    if spec == torch.bfloat16 or spec == "bfloat16":
        return torch.bfloat16
    if spec != "auto":
        raise ValueError(f"matmul_dtype must be None, torch.float32, torch.bfloat16 or 'auto', got {spec!r}")
    device = torch.device(device)
    pick = torch.bfloat16 if bf16_pays(device) else None
    log_once(f"srn_fast: matmul_dtype='auto' on {device.type}: {'bfloat16' if pick else 'float32'}"
             + (f" (tile GEMM rates: {describe_rates()})" if device.type == "cpu" else ""))
    return pick


def available_memory(device: Union[str, torch.device]) -> Optional[int]:
    """Bytes free for new tensors: CUDA: free device memory; CPU: MemAvailable (Linux), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_budget(device: Union[str, torch.device], budget: Union[None, int, float] = None) -> Optional[int]:
    """The bytes march_mode="auto" may keep: ``budget`` bytes (an int, or a float > 1), a fraction of the available
    memory (a float <= 1), or by default SRN_FAST_STORE_BUDGET / :data:`STORE_BUDGET_FRACTION`."""
    if budget is None:
        env = os.environ.get("SRN_FAST_STORE_BUDGET")
        budget = float(env) if env else STORE_BUDGET_FRACTION
    if isinstance(budget, float) and budget <= 1.0:
        free = available_memory(device)
        return None if free is None else int(budget * free)
    return int(budget)


def store_bytes(B: int, N: int, steps: int, phi_widths: Sequence[int], pix_widths: Sequence[int],
                element_size: int = 4, tiles: bool = False, xhat_size: Optional[int] = None) -> int:
    """What store mode keeps beyond recompute mode for a render of B x N rays: phi's activations at every step and
    at the surface point, plus the pixel generator's; every layer LayerNorm+ReLU but the last, which is plain (the
    SRN networks). tiles: the CPU tile loops, which keep xhat and an rstd per LayerNorm layer and nothing of the
    plain last layer (the march folds phi's into the LSTM's input GEMM; the MLP op's backward does not read it);
    else the batched path (CUDA), which keeps every layer's pre-activation. xhat_size: bytes per xhat value on the
    tiles (2 with bf16 matmuls: ops.shapes.xhat_dtype), default element_size."""
    xs = element_size if xhat_size is None else xhat_size

    def per_row(widths: Sequence[int]) -> int:  # bytes
        if not tiles:
            return sum(widths) * element_size
        return sum(widths[:-1]) * xs + (len(widths) - 1) * element_size

    return int(B * N * ((steps + 1) * per_row(phi_widths) + per_row(pix_widths)))


def choose_march_mode(need: int, budget: Optional[int]) -> str:
    return "store" if budget is not None and need <= budget else "recompute"
