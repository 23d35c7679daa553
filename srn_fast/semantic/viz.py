"""Pictures for Semantic SRN, drawn with numpy and PIL (no plotting library needed): colour-coded part maps,
the feature-space embedding (PCA in torch; t-SNE when scikit-learn is installed) and the mIoU-against-K plot."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import torch
from PIL import Image, ImageDraw, ImageFont

from .. import files

# class 0 (background) dark grey, then distinct part colours
PALETTE = np.array([[40, 40, 40], [228, 26, 28], [55, 126, 184], [77, 175, 74], [255, 127, 0], [152, 78, 163],
                    [255, 221, 51], [166, 86, 40], [247, 129, 191], [0, 200, 200], [130, 130, 130], [0, 0, 140]],
                   dtype=np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """``[C, 3]`` uint8 colours (class 0 = background); repeats after 12 classes with a shift."""
    reps = [(PALETTE.astype(int) + 37 * r) % 256 for r in range(math.ceil(num_classes / len(PALETTE)))]
    return np.concatenate(reps)[:num_classes].astype(np.uint8)


def label_image(labels: torch.Tensor, S: int, num_classes: int) -> np.ndarray:
    """``[S, S, 3]`` uint8 colour-coded part map of ``labels [S*S]`` (row-major)."""
    lab = labels.reshape(S, S).cpu().numpy()
    return palette(num_classes)[np.clip(lab, 0, num_classes - 1)]


def rgb_image(rgb: torch.Tensor, S: int) -> np.ndarray:
    """``[S, S, 3]`` uint8 from colours ``[S*S, 3]`` in [-1, 1]."""
    x = ((rgb.reshape(S, S, 3).float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).cpu().numpy()


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor <= 1 else np.repeat(np.repeat(img, factor, 0), factor, 1)


def hstack(images: Sequence[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    h = max(im.shape[0] for im in images)
    cols = []
    for k, im in enumerate(images):
        pad = np.full((h, im.shape[1], 3), fill, np.uint8)
        pad[:im.shape[0]] = im
        cols.append(pad)
        if k < len(images) - 1:
            cols.append(np.full((h, gap, 3), fill, np.uint8))
    return np.concatenate(cols, 1)


def vstack(images: Sequence[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    w = max(im.shape[1] for im in images)
    rows = []
    for k, im in enumerate(images):
        pad = np.full((im.shape[0], w, 3), fill, np.uint8)
        pad[:, :im.shape[1]] = im
        rows.append(pad)
        if k < len(images) - 1:
            rows.append(np.full((gap, w, 3), fill, np.uint8))
    return np.concatenate(rows, 0)


def legend_strip(class_names: Sequence[str], width: int) -> np.ndarray:
    """A white strip with a colour swatch and the name of every class."""
    pal = palette(len(class_names))
    font = ImageFont.load_default()
    items = [(pal[c], str(n)) for c, n in enumerate(class_names)]
    per_row = max(1, width // 90)
    rows = math.ceil(len(items) / per_row)
    im = Image.new("RGB", (max(width, 90), 14 * rows + 4), "white")
    d = ImageDraw.Draw(im)
    for k, (col, name) in enumerate(items):
        x, y = 4 + 90 * (k % per_row), 2 + 14 * (k // per_row)
        d.rectangle([x, y + 2, x + 9, y + 11], fill=tuple(int(v) for v in col))
        d.text((x + 13, y), name, fill="black", font=font)
    return np.asarray(im)


# ------------------------------------------------------------------------------------------------------------------
def embed_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[M, 2]`` embedding of ``features [M, F]``: ``"pca"`` (torch SVD of the centred features) or ``"tsne"``
    (needs scikit-learn: ``pip install .[viz]``)."""
    x = features.double()
    if method == "pca":
        x = x - x.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        return (x @ v[:2].T).numpy()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ImportError("t-SNE needs scikit-learn, an optional extra: `pip install .[viz]` "
                              "(or use --embedding pca, which needs nothing)") from None
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(x.numpy())
    raise ValueError(f"embedding method must be 'pca' or 'tsne', got {method!r}")


def scatter_png(path: str, xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str,
                size: int = 560, seed: int = 0) -> str:
    """Scatter plot of ``xy [M, 2]`` coloured by ``labels [M]`` with a legend, drawn with PIL."""
    pal = palette(len(class_names))
    im = Image.new("RGB", (size, size + 40), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    d.text((8, 6), title, fill="black", font=font)
    m = 24
    lo, hi = xy.min(0), xy.max(0)
    span = np.maximum(hi - lo, 1e-12)
    p = m + (xy - lo) / span * (size - 2 * m)
    p[:, 1] = size - p[:, 1] + 20  # y up
    order = np.random.default_rng(seed).permutation(len(xy))  # no class drawn entirely on top of another
    for k in order:
        x, y = p[k]
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(int(v) for v in pal[labels[k]]))
    present = sorted(set(int(v) for v in labels))
    for j, c in enumerate(present):
        x, y = 8 + 100 * j, size + 20
        d.rectangle([x, y + 2, x + 9, y + 11], fill=tuple(int(v) for v in pal[c]))
        d.text((x + 13, y), f"{class_names[c]} ({int((labels == c).sum())})", fill="black", font=font)
    return files.write_png(path, im, makedirs=True)


def line_plot_png(path: str, series: Dict[str, List[Tuple[float, float]]], xlabel: str, ylabel: str, title: str,
                  xticklabels: Optional[Dict[float, str]] = None, ylim: Tuple[float, float] = (0.0, 1.0),
                  log_x: bool = True, size: Tuple[int, int] = (560, 400)) -> str:
    """A line plot with markers, axes, ticks and a legend, drawn with PIL. ``series``: name -> [(x, y)]."""
    W, H = size
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    L, R, T, B = 60, 44, 40, 50
    xs = [x for pts in series.values() for x, _ in pts]
    fx = (lambda v: math.log(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    pad = 0.06 * (x1 - x0)
    x0, x1 = x0 - pad, x1 + pad

    def px(x, y):
        return (L + (fx(x) - x0) / (x1 - x0) * (W - L - R), H - B - (y - ylim[0]) / (ylim[1] - ylim[0]) * (H - T - B))

    d.text((L, 8), title, fill="black", font=font)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        y = ylim[0] + k * (ylim[1] - ylim[0]) / 5
        _, yy = px(min(xs), y)
        d.line([L, yy, W - R, yy], fill=(225, 225, 225))
        d.text((L - 34, yy - 6), f"{y:.2f}", fill="black", font=font)
    for x in sorted(set(xs)):
        xx, _ = px(x, ylim[0])
        d.line([xx, H - B, xx, H - B + 4], fill="black")
        lab = (xticklabels or {}).get(x, f"{x:g}")
        d.text((xx - 3 * len(lab), H - B + 6), lab, fill="black", font=font)
    d.text(((L + W - R) / 2 - 3 * len(xlabel), H - 20), xlabel, fill="black", font=font)
    d.text((L - 34, T - 20), ylabel, fill="black", font=font)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for j, (name, pts) in enumerate(series.items()):
        col = colours[j % len(colours)]
        pts = sorted(pts)
        q = [px(x, y) for x, y in pts]
        if len(q) > 1:
            d.line(q, fill=col, width=2)
        for (x, y), (xx, yy) in zip(pts, q):
            d.ellipse([xx - 4, yy - 4, xx + 4, yy + 4], fill=col)
            d.text((xx + 6, yy - 14), f"{y:.3f}", fill=col, font=font)
        d.rectangle([W - R - 150, T + 8 + 14 * j, W - R - 140, T + 18 + 14 * j], fill=col)
        d.text((W - R - 136, T + 6 + 14 * j), name, fill="black", font=font)
    return files.write_png(path, im, makedirs=True)
