"""Pictures: colour-mapped depth, normal maps, image grids, orbit cameras, loss curves.

Images here are numpy ``uint8 [H, W, 3]`` unless said otherwise. They are written to files by
:func:`srn_fast.files.write_png` / :func:`srn_fast.files.write_gif` (atomically).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from . import geometry
from .files import write_png

# A perceptual colour ramp (dark blue -> teal -> yellow), 6 anchors, linearly interpolated.
_RAMP = np.array([[0.07, 0.04, 0.30], [0.20, 0.25, 0.55], [0.13, 0.50, 0.56], [0.20, 0.70, 0.45],
                  [0.60, 0.85, 0.25], [0.99, 0.91, 0.15]])


def colormap(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``[...]`` -> RGB float ``[..., 3]`` on a blue-to-yellow ramp."""
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(t).astype(int), len(_RAMP) - 2)
    f = (t - i)[..., None]
    return _RAMP[i] * (1 - f) + _RAMP[i + 1] * f


def to_uint8(x) -> np.ndarray:
    """Float image in [0, 1] -> uint8."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def rgb_image(rgb: torch.Tensor, S: int) -> np.ndarray:
    """Model colours ``[S*S, 3]`` in [-1, 1] -> uint8 ``[S, S, 3]``."""
    return to_uint8(((rgb.detach().float().cpu().reshape(S, S, 3) + 1.0) / 2.0))


def depth_image(depth: torch.Tensor, S: int, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """Depth ``[S*S, 1]`` -> colour-mapped uint8 ``[S, S, 3]`` (near = yellow, far = blue); range from the 2nd and
    98th percentiles unless given."""
    d = depth.detach().float().cpu().reshape(S, S).numpy()
    if lo is None or hi is None:
        lo, hi = np.percentile(d, 2), np.percentile(d, 98)
    t = 1.0 - (d - lo) / max(hi - lo, 1e-6)
    return to_uint8(colormap(t))


def normal_image(uv: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, S: int) -> np.ndarray:
    """Camera-space normals from a full depth map, ``(n + 1) / 2`` as colours, uint8 ``[S, S, 3]``."""
    n = geometry.compute_normal_map(uv.reshape(1, -1, 2).float().cpu(), depth.reshape(1, -1, 1).float().cpu(),
                                    K.reshape(1, *K.shape[-2:]).float().cpu(), S)
    return to_uint8((n.reshape(S, S, 3) + 1.0) / 2.0)


def hstack(images: Sequence[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    H = max(im.shape[0] for im in images)
    parts = []
    for k, im in enumerate(images):
        if im.shape[0] < H:
            im = np.pad(im, ((0, H - im.shape[0]), (0, 0), (0, 0)), constant_values=fill)
        parts.append(im)
        if k + 1 < len(images) and gap:
            parts.append(np.full((H, gap, 3), fill, np.uint8))
    return np.concatenate(parts, axis=1)


def vstack(images: Sequence[np.ndarray], gap: int = 2, fill: int = 255) -> np.ndarray:
    W = max(im.shape[1] for im in images)
    parts = []
    for k, im in enumerate(images):
        if im.shape[1] < W:
            im = np.pad(im, ((0, 0), (0, W - im.shape[1]), (0, 0)), constant_values=fill)
        parts.append(im)
        if k + 1 < len(images) and gap:
            parts.append(np.full((gap, W, 3), fill, np.uint8))
    return np.concatenate(parts, axis=0)


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement (small renders are easier to see)."""
    if factor <= 1:
        return img
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _orbit_basis(up) -> tuple:
    """Unit ``up`` and two unit vectors ``e1, e2`` spanning the plane normal to it (azimuth 0 along e1)."""
    up = np.asarray(up, np.float64)
    up = up / np.linalg.norm(up)
    a = np.array([1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(up, a)
    e1 /= np.linalg.norm(e1)
    return up, e1, np.cross(up, e1)


def orbit_poses(n: int, radius: float, elevation_deg: float, up=(0.0, 0.0, 1.0), centre=(0.0, 0.0, 0.0),
                start_deg: float = 0.0) -> np.ndarray:
    """``[n, 4, 4]`` cam2world poses (OpenCV) on a circle around ``up`` through ``centre``, looking at it."""
    up, e1, e2 = _orbit_basis(up)
    el = math.radians(elevation_deg)
    out = []
    for k in range(n):
        az = math.radians(start_deg) + 2 * math.pi * k / n
        d = math.cos(el) * (math.cos(az) * e1 + math.sin(az) * e2) + math.sin(el) * up
        out.append(geometry.look_at(np.asarray(centre) + radius * d, np.asarray(centre, np.float64), up))
    return np.stack(out)


def orbit_through(position, n: int, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """``[n, 4, 4]`` orbit around ``up`` through the origin whose first camera sits at ``position [3]`` (same
    radius, elevation and azimuth), e.g. the camera of a photo being reconstructed."""
    p = np.asarray(position, np.float64)
    u, e1, e2 = _orbit_basis(up)
    r = float(np.linalg.norm(p))
    if r < 1e-9:
        raise ValueError("orbit_through: the camera sits at the orbit centre (the origin)")
    el = math.degrees(math.asin(float(np.clip(p @ u / r, -1.0, 1.0))))
    az = math.degrees(math.atan2(float(p @ e2), float(p @ e1)))
    return orbit_poses(n, r, el, up=u, start_deg=az)


def camera_facts(poses: Sequence[np.ndarray], K_rel: np.ndarray) -> dict:
    """Orbit parameters from a dataset's cam2world poses: radius (median camera distance to the origin), up (mean
    camera up, i.e. minus the OpenCV y axis), median elevation above the plane normal to up; ``K_rel`` = [f, cx,
    cy] divided by the sidelength."""
    P = np.stack([np.asarray(p, np.float64) for p in poses])
    centres = P[:, :3, 3]
    dist = np.linalg.norm(centres, axis=1)
    up = -P[:, :3, 1].mean(axis=0)
    up = up / max(np.linalg.norm(up), 1e-9)
    el = np.degrees(np.arcsin(np.clip((centres @ up) / np.maximum(dist, 1e-9), -1, 1)))
    return {"radius": float(np.median(dist)), "up": up.tolist(), "elevation_deg": float(np.median(el)),
            "K_rel": [float(v) for v in K_rel]}


def loss_curve_png(path: str, per_object: np.ndarray, title: str = "fit loss", size=(640, 400)) -> str:
    """Fit-loss curves, drawn with PIL: ``per_object [T, n]`` (NaN where an object no longer fits) as thin lines,
    their mean over the objects still fitting as a thick one; log-scale loss against the step (1..T). A short
    tick marks where each object stopped."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    L, R, T_, B = 64, 16, 34, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    y = np.asarray(per_object, np.float64).reshape(len(per_object), -1)        # [T, n]
    steps = y.shape[0]
    ok = np.isfinite(y) & (y > 0)
    d.text((L, 10), title, fill="black", font=font)
    d.rectangle([L, T_, W - R, H - B], outline="black")
    d.text(((L + W - R) // 2 - 12, H - 16), "step", fill="black", font=font)
    if steps == 0 or not ok.any():
        d.text((L + 10, T_ + 10), "no steps", fill="black", font=font)
        return write_png(path, np.asarray(im))
    lo, hi = np.log10(y[ok].min()), np.log10(y[ok].max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

    def px(t, v):  # step t (1-based), loss v
        x = L + (t - 1) / max(steps - 1, 1) * (W - L - R)
        return x, H - B - (math.log10(v) - lo) / (hi - lo) * (H - T_ - B)

    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= math.log10(v) <= hi:
                _, yy = px(1, v)
                d.line([L, yy, W - R, yy], fill=(228, 228, 228))
                d.text((6, yy - 6), f"{v:.3g}", fill="black", font=font)
    for k in range(6):
        t = 1 + round(k * (steps - 1) / 5)
        xx, _ = px(t, 10 ** lo)
        d.line([xx, H - B, xx, H - B + 4], fill="black")
        d.text((xx - 3 * len(str(t)), H - B + 6), str(t), fill="black", font=font)
    for j in range(y.shape[1]):
        pts = [px(t + 1, y[t, j]) for t in range(steps) if ok[t, j]]
        if len(pts) > 1:
            d.line(pts, fill=(150, 180, 220), width=1)
        if pts and not ok[-1, j]:  # stopped before the end
            xx, yy = pts[-1]
            d.line([xx, yy - 5, xx, yy + 5], fill=(214, 39, 40), width=2)
    with np.errstate(invalid="ignore"):
        mean = np.array([np.nanmean(np.where(ok[t], y[t], np.nan)) if ok[t].any() else np.nan for t in range(steps)])
    pts = [px(t + 1, mean[t]) for t in range(steps) if np.isfinite(mean[t])]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=3)
    d.text((W - R - 230, T_ + 6), "thick: mean over objects still fitting", fill=(31, 119, 180), font=font)
    d.text((W - R - 230, T_ + 20), "thin: each object; red tick: it stopped", fill=(110, 110, 110), font=font)
    return write_png(path, np.asarray(im))
