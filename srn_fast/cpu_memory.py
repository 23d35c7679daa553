"""Keep freed CPU memory for reuse instead of handing it back to the kernel after every training step.

glibc's malloc serves every block over its mmap threshold (at most 32 MB by default) with a fresh ``mmap`` and
gives it back with ``munmap`` when it is freed; smaller blocks freed at the top of the heap are trimmed back to the
kernel too. A CPU training step at 64x64 views allocates and frees hundreds of MB of such blocks (activations kept
for backward, their gradients), so every step starts on fresh pages, each one faulted in and zero-filled by the
kernel. :func:`keep_freed_memory` raises both thresholds so
that freed blocks stay in the process and the next step reuses them. A 64x64 training step (B = 2, one backend
per process, as in a training run): on a 2-core AVX2 EPYC the fused backend went from 1195 to 1025 ms (144,000 page
faults and 0.35 s of kernel time per step to none), the torch backend, whose per-layer tensors mostly stay under
the threshold, from 1130 to 1100 ms; on a 2-core Xeon the fused step went from 816-969 to 647-793 ms.
The price: the process keeps the memory of its largest step until it exits (what a training loop needs anyway).

Nothing changes at ``import srn_fast``. The command-line tools call :func:`keep_freed_memory_for` with their
``--device`` (``--release-memory`` opts out); library users call either themselves. It acts only on glibc (Linux);
elsewhere it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEEP = 2 ** 31 - 1  # bytes: any block a step frees stays in the process
_state = {"kept": False}


def is_glibc() -> bool:
    """Whether this process runs on glibc (the only C library :func:`keep_freed_memory` acts on)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name (or no confstr) outside glibc-like systems
        return False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (``mallopt`` of ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD``). Returns True when it took effect (now or before), False where the C library is not
    glibc. It lasts for the life of the process."""
    if _state["kept"]:
        return True
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
    except (OSError, AttributeError):
        return False
    _state["kept"] = bool(ok)
    return _state["kept"]


def keep_freed_memory_for(device) -> bool:
    """:func:`keep_freed_memory` when ``device`` (a torch.device or its name, already resolved: the commands resolve
    ``--device auto`` with :func:`srn_fast.cli.common.pick_device` first) is the CPU. False for any other device,
    and for a name torch does not know (whoever uses the device reports that)."""
    import torch

    try:
        if torch.device(device).type != "cpu":
            return False
    except (RuntimeError, TypeError, ValueError):
        return False
    return keep_freed_memory()


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _state["kept"]
