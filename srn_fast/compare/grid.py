"""Image grids for the comparison (one row per (object, view), one column per method); written to PNG files by
:func:`srn_fast.files.write_png`."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch



def rgb_to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[3, S, S]`` colours in [-1, 1] -> ``[S, S, 3]`` uint8 (clipped)."""
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def depth_to_uint8(depth: torch.Tensor, lo: float, hi: float, mask: Optional[torch.Tensor] = None) -> np.ndarray:
    """``[1, S, S]`` camera z -> ``[S, S, 3]`` grey uint8: near is bright, ``lo``..``hi`` spans the range;
    pixels outside ``mask`` (when given) are drawn black."""
    d = depth.detach().float().cpu()[0]
    x = 1.0 - ((d - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    x = 0.15 + 0.85 * x
    if mask is not None:
        x = torch.where(mask.cpu()[0], x, torch.zeros_like(x))
    g = (x * 255).round().to(torch.uint8).numpy()
    return np.repeat(g[..., None], 3, axis=-1)


def _upscale(img: np.ndarray, cell: int) -> np.ndarray:
    f = max(1, cell // img.shape[0])
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def make_grid(rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str], cell: int = 128, pad: int = 4,
              row_labels: Optional[List[str]] = None) -> np.ndarray:
    """Tile ``rows`` (each a list of ``[S, S, 3]`` uint8 images, one per column) on white, with ``headers``
    above the columns and optional ``row_labels`` at the left. Images are upscaled (nearest) to about ``cell``."""
    from PIL import Image, ImageDraw, ImageFont
    if not rows:
        raise ValueError("make_grid needs at least one row")
    ncol = len(headers)
    if any(len(r) != ncol for r in rows):
        raise ValueError(f"every row must have {ncol} images (one per header)")
    tiles = [[_upscale(im, cell) for im in r] for r in rows]
    c = tiles[0][0].shape[0]
    font = ImageFont.load_default(size=max(10, c // 9))
    head_h = c // 5 + pad
    label_w = c // 2 + pad if row_labels else 0
    W = label_w + ncol * (c + pad) + pad
    H = head_h + len(rows) * (c + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, h in enumerate(headers):
        x = label_w + pad + j * (c + pad) + c // 2
        draw.text((x, head_h // 2), h, fill=(0, 0, 0), font=font, anchor="mm")
    for i, r in enumerate(tiles):
        y = head_h + i * (c + pad)
        if row_labels:
            draw.text((label_w // 2, y + c // 2), row_labels[i], fill=(0, 0, 0), font=font, anchor="mm")
        for j, im in enumerate(r):
            canvas.paste(Image.fromarray(im), (label_w + pad + j * (c + pad), y))
    return np.asarray(canvas)
