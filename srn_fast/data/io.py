"""Image files of the SRN format and their encodings, with the reference's preprocessing.

- ``rgb/*.png|jpg``: the first three channels, 8-bit (or 16-bit grey) -> float in [0, 1], square centre crop,
  area resize, then mapped to [-1, 1] (:func:`load_rgb`).
- ``depth/*.png``: 16-bit grey, camera z = value * :data:`DEPTH_SCALE` (1e-4 units per count, the reference's
  ``load_depth`` convention), 0 = background; or ``depth/*.npy`` holding float camera z (:func:`load_depth`).
- ``semantic/*.png``: 8-bit grey or palette image whose pixel values are part ids, 0 = background
  (:func:`load_semantic`).

Depth and part ids are resized with the nearest-neighbour rule ``src = floor(dst * in / out)`` (OpenCV's
INTER_NEAREST), which for integer ratios picks exactly the pixel that the reference's rescaled intrinsics
(``cx' = cx / W * S``, no half-pixel offset) place at the destination pixel: depth stays consistent with the
camera after resizing.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image

from ..files import write_png

DEPTH_SCALE = 1e-4  # camera z in scene units per count of a 16-bit depth PNG
DEPTH_MAX = 6.5535  # 65535 * DEPTH_SCALE: the farthest depth a 16-bit PNG can hold

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset file or folder that does not follow the SRN format (the message names the file)."""


def _open(path: str, what: str) -> Image.Image:
    img = None
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        if img is not None:  # a truncated file: opened, then failed to decode; PIL keeps it open
            img.close()
        raise DataError(f"{path}: cannot read {what} image ({type(e).__name__}: {e})") from None
    return img


def square_crop(img: np.ndarray) -> np.ndarray:
    """The reference's centre crop: ``img[c0 - m//2 : c0 + m//2, c1 - m//2 : c1 + m//2]`` with
    ``m = min(H, W)`` and ``c = (H//2, W//2)`` (an odd ``m`` loses one row and column, as in the reference)."""
    h, w = img.shape[:2]
    m = min(h, w)
    c0, c1 = h // 2, w // 2
    return img[c0 - m // 2:c0 + m // 2, c1 - m // 2:c1 + m // 2]


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64 weights of exact area averaging (box filter of width ``n_in / n_out``).

    Output pixel ``i`` covers the input interval ``[i*s, (i+1)*s)`` with ``s = n_in / n_out``; each input pixel
    ``j`` (covering ``[j, j+1)``) contributes its overlap divided by ``s``. Rows sum to 1.
    """
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    hi = lo + s
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / s


def resize_area(img: np.ndarray, size: int) -> np.ndarray:
    """Area-resize an ``[H, W, C]`` float image to ``[size, size, C]`` (exact area averaging, float32)."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img.astype(np.float32, copy=False)
    ar, ac = area_matrix(h, size), area_matrix(w, size)
    out = np.einsum("ih,hwc,jw->ijc", ar, img.astype(np.float64), ac, optimize=True)
    return out.astype(np.float32)


def resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``[H, W, ...]`` array: ``src = floor(dst * in / out)`` (OpenCV rule)."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    rows = np.minimum((np.arange(size) * h) // size, h - 1)
    cols = np.minimum((np.arange(size) * w) // size, w - 1)
    return img[rows][:, cols]


_warned_nonsquare = set()


def _warn_nonsquare(path: str, shape) -> None:
    folder = os.path.dirname(os.path.dirname(path))
    if folder not in _warned_nonsquare:
        _warned_nonsquare.add(folder)
        warnings.warn(f"{path}: image is {shape[1]}x{shape[0]} (not square); it is centre-cropped and the "
                      f"intrinsics are rescaled by height/width as in the reference, which does not shift the "
                      f"principal point for the crop", stacklevel=3)


def image_size(path: str):
    """``(height, width)`` of an image file from its header (nothing decoded)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DataError(f"{path}: rgb file not found") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read rgb image ({type(e).__name__}: {e})") from None
    return h, w


def read_rgb_raw(path: str) -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1]: the first three channels (8-bit / 255, 16-bit grey / 65535)."""
    img = _open(path, "rgb")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float32) / 65535.0
        a = np.repeat(a[..., None], 3, axis=2)
    elif img.mode == "F":
        raise DataError(f"{path}: rgb image is floating-point (mode F); expected 8-bit RGB(A)")
    else:
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        a = np.asarray(img)[:, :, :3].astype(np.float32) / 255.0
    return a


def load_rgb(path: str, sidelength: Optional[int]) -> np.ndarray:
    """An rgb image as the reference: crop, area resize to ``sidelength``, [-1, 1]. Returns ``[S, S, 3]``."""
    a = read_rgb_raw(path)
    if a.shape[0] != a.shape[1]:
        _warn_nonsquare(path, a.shape)
    a = square_crop(a)
    if a.shape[0] == 0:
        raise DataError(f"{path}: rgb image has zero size")
    if sidelength is not None:
        a = resize_area(a, sidelength)
    return (a - 0.5) * 2.0


def read_depth_raw(path: str) -> np.ndarray:
    """``[H, W]`` float32 camera z (0 = background) from a 16-bit PNG (count * 1e-4) or an ``.npy`` array."""
    if path.lower().endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: cannot read depth array ({type(e).__name__}: {e})") from None
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"{path}: depth .npy must be a float [H, W] array, got {a.dtype} {list(a.shape)}")
        if not np.isfinite(a).all():
            raise DataError(f"{path}: depth array holds non-finite values")
        return a.astype(np.float32)
    img = _open(path, "depth")
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{path}: depth PNG must be 16-bit greyscale (camera z * 1e4), got mode {img.mode}")
    return np.asarray(img).astype(np.float32) * np.float32(DEPTH_SCALE)


def read_semantic_raw(path: str) -> np.ndarray:
    """``[H, W]`` int64 part ids from a greyscale or palette PNG (pixel value = part id, 0 = background)."""
    img = _open(path, "semantic")
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"{path}: semantic PNG must be greyscale or palette (pixel value = part id), "
                        f"got mode {img.mode}")
    return np.asarray(img).astype(np.int64)


def load_depth(path: str, sidelength: Optional[int]) -> np.ndarray:
    """Depth as camera z ``[S, S]`` float32: crop as the rgb, nearest resize (keeps camera consistency)."""
    a = square_crop(read_depth_raw(path))
    return resize_nearest(a, sidelength) if sidelength is not None else a


def load_semantic(path: str, sidelength: Optional[int]) -> np.ndarray:
    """Part ids ``[S, S]`` int64: crop as the rgb, nearest resize."""
    a = square_crop(read_semantic_raw(path))
    return resize_nearest(a, sidelength) if sidelength is not None else a


# ---------------------------------------------------------------------------------------------- writing

def _palette(n: int = 256) -> list:
    """A palette for part-id PNGs: 0 white (background), then distinct saturated colours."""
    base = [(255, 255, 255), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
    pal = []
    for i in range(n):
        pal.extend(base[i] if i < len(base) else ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
    return pal


_PALETTE = _palette()


def save_rgb(path: str, rgb01: np.ndarray) -> None:
    """Write ``[H, W, 3]`` colours in [0, 1] as an 8-bit RGB PNG."""
    a = np.clip(np.rint(rgb01 * 255.0), 0, 255).astype(np.uint8)
    write_png(path, a, compress_level=1, fsync=False)


def encode_depth(z: np.ndarray, path: str = "depth") -> np.ndarray:
    """Camera z ``[H, W]`` (0 = background) -> uint16 counts of :data:`DEPTH_SCALE`; errors past 6.55 units."""
    if not np.isfinite(z).all() or z.min() < 0:
        raise DataError(f"{path}: depth must be finite and >= 0")
    if z.max() > DEPTH_MAX:
        raise DataError(f"{path}: depth {z.max():.3f} exceeds the 16-bit PNG range ({DEPTH_MAX} units)")
    return np.rint(z / DEPTH_SCALE).astype(np.uint16)


def save_depth(path: str, z: np.ndarray) -> None:
    """Write camera z ``[H, W]`` as a 16-bit PNG (value = round(z / 1e-4), 0 = background)."""
    write_png(path, encode_depth(z, path), compress_level=1, fsync=False)


def save_semantic(path: str, ids: np.ndarray) -> None:
    """Write part ids ``[H, W]`` (0..255) as a palette PNG: pixel values are the ids, colours for viewing."""
    if ids.min() < 0 or ids.max() > 255:
        raise DataError(f"{path}: part ids must lie in [0, 255]")
    img = Image.fromarray(ids.astype(np.uint8))  # mode L; putpalette turns it into P keeping the values
    img.putpalette(_PALETTE)
    write_png(path, img, compress_level=1, fsync=False)
