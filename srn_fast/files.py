"""Writing files: the one place in srn_fast that creates output files.

Every writer goes through :func:`atomic_write`: the bytes go to a hidden temporary file in the target's folder
(``.NAME.<random>.tmp``), are flushed and fsync'ed, and the temporary is renamed over the target with
``os.replace`` (atomic on POSIX). So a crash, a Ctrl-C or a full disk never leaves a half-written file under the
real name: readers see the old file or the new one. A kill -9 can leave the hidden temporary behind;
:func:`srn_fast.runfolder.clean_run_temporaries` removes those.

On top of it: :func:`write_bytes`, :func:`write_text`, :func:`write_json` (strict JSON: NaN and infinities become
``null``, see :func:`strict_json`), :func:`save_torch` (``torch.save``), :func:`write_png` and :func:`write_gif`.
Files are made readable by everyone (mode 0644), as ``open()`` would with the usual umask.

``fsync=False`` skips the flush to disk (the file is still written whole and renamed): for the many small files of
a generated dataset, which is itself written into a hidden staging folder and renamed into place as a whole.
The name ``files`` rather than ``io`` keeps this module apart from the standard library's ``io`` and from
:mod:`srn_fast.data.io` (which reads and encodes the SRN data format).
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any, Callable, BinaryIO, Optional, Sequence

FILE_MODE = 0o644


class OutputError(ValueError):
    """An output file that cannot be written where asked (missing or read-only folder)."""


def atomic_write(path: str, write_fn: Callable[[BinaryIO], Any], *, makedirs: bool = False,
                 fsync: bool = True) -> str:
    """Call ``write_fn(fh)`` on a binary temporary file next to ``path``, fsync it, then rename it to ``path``.

    ``makedirs`` creates the folder of ``path`` first; otherwise a missing folder is an :class:`OutputError`.
    On any error (or interrupt) the temporary is removed and the old ``path``, if any, is left as it was.
    Returns ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if makedirs:
        os.makedirs(folder, exist_ok=True)
    if not os.path.isdir(folder):
        raise OutputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: output folder is not writable")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600 files; outputs are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_bytes(path: str, data: bytes, **kw) -> str:
    """Write ``data`` to ``path`` atomically (``kw``: :func:`atomic_write`'s options)."""
    return atomic_write(path, lambda fh: fh.write(data), **kw)


def write_text(path: str, text: str, **kw) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), **kw)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kw) -> str:
    """``json.dumps`` that writes strict JSON: NaN and +-inf (which ``json.dumps`` writes as bare ``NaN`` /
    ``Infinity``, rejected by strict parsers) become ``null``."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kw)


def write_json(path: str, obj, indent: Optional[int] = 1, default: Optional[Callable] = None, **kw) -> str:
    """Write ``obj`` to ``path`` as strict JSON (:func:`strict_json`) and a final newline, atomically.
    ``default``: as ``json.dumps``' (e.g. ``float`` for numpy scalars)."""
    return write_text(path, strict_json(obj, indent=indent, default=default) + "\n", **kw)


def save_torch(path: str, obj, **kw) -> str:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints, heads, latent codes)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh), **kw)


def write_png(path: str, img, compress_level: Optional[int] = None, **kw) -> str:
    """Write an image as PNG atomically: a numpy array (uint8 ``[H, W, 3]`` or ``[H, W]``, uint16 ``[H, W]``) or a
    PIL image (e.g. a palette image). ``compress_level`` 0-9 (PIL's default when None)."""
    import numpy as np
    from PIL import Image

    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({} if compress_level is None else {"compress_level": compress_level}))
    return write_bytes(path, buf.getvalue(), **kw)


def write_gif(path: str, frames: Sequence, fps: float = 12.0, **kw) -> str:
    """Write uint8 frames ``[H, W, 3]`` as a looping GIF at ``fps`` frames per second, atomically."""
    import imageio.v2 as imageio

    buf = io.BytesIO()
    imageio.mimsave(buf, list(frames), format="gif", duration=1.0 / fps, loop=0)
    return write_bytes(path, buf.getvalue(), **kw)
