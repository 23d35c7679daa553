"""Loading of the compiled extension ``srn_fast._C`` (C++ CPU kernels, CUDA kernels when built with them)."""
from __future__ import annotations

import importlib
from typing import Optional

_ext = None
_error: Optional[BaseException] = None
_loaded = False


def load():
    """The extension module, or None if it is not built (the reason is kept for :func:`require`)."""
    global _ext, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            import torch  # noqa: F401 - libtorch must be loaded before the extension

            _ext = importlib.import_module("srn_fast._C")
        except ImportError as e:  # not built, or built against another torch
            _ext, _error = None, e
    return _ext


def available() -> bool:
    return load() is not None


def with_cuda() -> bool:
    ext = load()
    return bool(ext is not None and getattr(ext, "with_cuda", False))


def error() -> Optional[BaseException]:
    """Why the extension could not be imported (None when it loaded or was not tried)."""
    load()
    return _error


def describe() -> str:
    """One line for logs: which srn_fast this is and whether its extension loaded (with or without CUDA)."""
    import os

    where = os.path.dirname(os.path.abspath(__file__))  # the package folder
    ext = load()
    if ext is None:
        return f"srn_fast {where}: srn_fast._C NOT loaded ({_error})"
    return f"srn_fast {where}: srn_fast._C loaded, {'with' if with_cuda() else 'without'} CUDA kernels"


def require(what: str):
    """The extension, or a RuntimeError that says how to build it."""
    ext = load()
    if ext is None:
        raise RuntimeError(
            f"{what} needs the compiled extension srn_fast._C, which could not be imported ({_error}). "
            "Build it with `pip install --no-build-isolation .` (or `-e .`) from the srn_fast source tree, "
            "or use backend='torch'.")
    return ext
