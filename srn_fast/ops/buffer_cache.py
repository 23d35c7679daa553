"""Reused CPU buffers for the fused ops' outputs: what they save for their backward, the outputs and gradients they
return (and wide_linear's weight gradient).

A CPU training step at 64x64 (B = 2) saves ~450 MB of activations in the fused march and MLP ops and frees them in
the backward; the hypernetwork's three 67 MB weight gradients are new every step too. glibc's malloc serves such
blocks with a fresh ``mmap`` (and a freed block at the top of its heap goes back to the kernel), so every step
started on fresh pages, each one faulted in and zero-filled by the kernel: ~135,000 page faults and ~0.4 s of
kernel time per fused step on a 2-core EPYC, 15-25% of its wall time. :func:`take` hands out the same blocks again
instead: it keeps every buffer of at least ``MIN_BYTES`` it allocated and gives one back out when nothing but the
cache still refers to it (a storage use count of one: the graph that saved it is gone), for a request of the same
dtype and size. Buffers still in use are never handed out, so a graph kept alive (``retain_graph``, two forwards
before one backward) simply gets new ones.

What it costs: the process keeps the saved buffers of its largest step between steps (what the next step needs
anyway). Before it grows, it frees the buffers that have sat idle for more than ``MAX_IDLE`` requests (a shape
the run stopped using, e.g. a smaller last batch); :func:`release` frees every idle buffer now, and
:func:`set_enabled` turns the cache off (the commands' ``--release-memory`` does). CUDA tensors never come here
(PyTorch's caching allocator already does this on the GPU). Unlike :func:`srn_fast.cpu_memory.keep_freed_memory`
it changes nothing for the rest of the process.

The compiled ops do the same inside their CPU backward passes for their weight-gradient accumulators (one slot per
thread, ~3 MB for phi at width 256; ``csrc/common/scratch_pool.h``). :func:`release` and :func:`set_enabled` act on
that pool too.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

MIN_BYTES = 1 << 20  # smaller blocks come from malloc's heap without fresh pages
MAX_IDLE = 512       # requests an idle buffer waits before it is freed (a 64x64 training step makes ~40)

_entries: Dict[Tuple[torch.dtype, int], List[list]] = {}  # (dtype, nbytes) -> [[storage, last use], ...]
_state = {"enabled": True, "clock": 0}
_lock = threading.Lock()


def _free(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1  # only this cache refers to it


def take(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``dtype`` (None: ``like``'s) on ``like``'s device (as
    ``like.new_empty(shape, dtype=dtype)``), on the CPU from the cache when a large enough request can reuse an idle
    buffer."""
    shape = tuple(int(s) for s in shape)
    dtype = like.dtype if dtype is None else dtype
    nbytes = math.prod(shape) * dtype.itemsize
    if (not _state["enabled"] or like.device.type != "cpu" or nbytes < MIN_BYTES or type(like) is not torch.Tensor
            or torch.compiler.is_compiling()):  # fake / functional tensors while tracing: no real storage
        return like.new_empty(shape, dtype=dtype)
    with _lock:  # threads calling the ops at once must not both take one idle buffer
        _state["clock"] += 1
        now = _state["clock"]
        for entry in _entries.get((dtype, nbytes), ()):
            if _free(entry[0]):
                entry[1] = now
                return like.new_empty(0, dtype=dtype).set_(entry[0], 0, shape)
        _drop_idle(now, MAX_IDLE)
        out = like.new_empty(shape, dtype=dtype)
        _entries.setdefault((dtype, nbytes), []).append([out.untyped_storage(), now])
        return out


def _drop_idle(now: int, max_idle: int) -> int:
    """Frees the idle buffers last used more than ``max_idle`` requests before ``now``; returns the bytes freed."""
    freed = 0
    for key in list(_entries):
        kept = [e for e in _entries[key] if now - e[1] <= max_idle or not _free(e[0])]
        freed += key[1] * (len(_entries[key]) - len(kept))
        if kept:
            _entries[key] = kept
        else:
            del _entries[key]
    return freed


def _scratch_pool(name: str, *args):
    """Calls the compiled extension's scratch-pool function ``name`` (csrc/common/scratch_pool.h: the ops' internal
    backward accumulators, reused the same way); None when the extension is not built."""
    from srn_fast import _ext

    ext = _ext.load()
    fn = getattr(ext, name, None) if ext is not None else None
    return fn(*args) if fn is not None else None


def release() -> int:
    """Frees every cached buffer that nothing uses now, and the extension's idle scratch blocks; returns the bytes
    freed."""
    with _lock:
        freed = _drop_idle(_state["clock"], -1)
    return freed + (_scratch_pool("release_scratch_pool") or 0)


def cached_bytes() -> int:
    """Bytes the cache holds, in use or idle."""
    return sum(key[1] * len(v) for key, v in _entries.items())


def set_enabled(enabled: bool) -> None:
    """Turns the cache (and the extension's scratch pool) on (the default) or off; off also frees every idle
    buffer."""
    _state["enabled"] = bool(enabled)
    _scratch_pool("set_scratch_pool_enabled", bool(enabled))
    if not enabled:
        release()
