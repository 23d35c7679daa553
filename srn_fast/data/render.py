"""Sphere tracing of an exact SDF (:class:`~srn_fast.data.sdf.Shape`) into RGB, depth and part-id images.

Rays follow the reference camera convention exactly (the same formulas as :mod:`srn_fast.geometry`): pixel
``(u, v) = (column, row)`` with no half-pixel offset, direction ``normalise(R @ [(u-cx)/f, (v-cy)/f, 1])``
for a cam2world ``[R | t]`` in OpenCV convention. Every ray first clips to the shape's bounding sphere, then
marches ``t += sdf(o + t d)`` until ``sdf < hit_eps`` (a hit), ``t`` leaves the sphere (a miss) or
``max_steps`` pass (counted as a miss and reported). The SDF is a lower bound everywhere, so the march never
steps through a surface; hits end within ``hit_eps`` outside the surface.

Shading is Lambertian under two fixed *world-space* lights plus ambient light: the colour of a surface point
does not depend on the viewpoint, as SRN's model (colour as a function of the 3D point) assumes. Pixels whose
part label differs from a neighbour's (silhouettes and part borders) are anti-aliased with 4 extra rays at
offsets (+-1/4, +-1/4); their depth and part id stay those of the pixel's own ray, so depth is exact per pixel.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .sdf import Shape

LIGHTS = np.array([[0.45, -0.55, 0.70], [-0.6, 0.5, -0.25]])
LIGHTS = LIGHTS / np.linalg.norm(LIGHTS, axis=1, keepdims=True)
LIGHT_WEIGHTS = np.array([0.6, 0.25])
AMBIENT = 0.4
BACKGROUND = 1.0  # white


def ray_directions(c2w: np.ndarray, f: float, cx: float, cy: float, uv: np.ndarray) -> np.ndarray:
    """Unit world directions ``[V, N, 3]`` of pixels ``uv`` ``[N, 2]`` for cam2world ``[V, 4, 4]`` (float64)."""
    cam = np.stack([(uv[:, 0] - cx) / f, (uv[:, 1] - cy) / f, np.ones(len(uv))], axis=-1)  # [N, 3]
    d = np.einsum("vij,nj->vni", c2w[:, :3, :3], cam)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def sphere_trace(shape: Shape, o: np.ndarray, d: np.ndarray, hit_eps: float = 1e-4, max_steps: int = 256,
                 dtype=np.float32) -> Tuple[np.ndarray, np.ndarray, int]:
    """March rays ``o + t d`` (``[M, 3]`` each, ``d`` unit) against ``shape``.

    Returns ``(t [M] float64, hit [M] bool, unfinished)`` where ``unfinished`` counts rays still marching
    after ``max_steps`` (treated as misses). ``t`` of a hit is refined in float64 so that
    ``0 <= sdf(o + t d) < hit_eps``.
    """
    M = o.shape[0]
    R = shape.bounding_radius() * 1.01 + 1e-3
    b = np.einsum("mi,mi->m", o, d)
    c = np.einsum("mi,mi->m", o, o) - R * R
    disc = b * b - c
    t = np.zeros(M)
    hit = np.zeros(M, dtype=bool)
    inter = disc > 0
    sq = np.sqrt(np.where(inter, disc, 0.0))
    t0 = np.maximum(-b - sq, 0.0)
    t1 = -b + sq
    # tighten with the shape's axis-aligned bounding box (slab test)
    lo, hi = shape.bounds()
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        ta_, tb_ = (lo - 1e-3 - o) * inv, (hi + 1e-3 - o) * inv
        near = np.nan_to_num(np.minimum(ta_, tb_), nan=-np.inf).max(axis=1)
        far = np.nan_to_num(np.maximum(ta_, tb_), nan=np.inf).min(axis=1)
    t0 = np.maximum(t0, near)
    t1 = np.minimum(t1, far)
    active = np.nonzero(inter & (t1 > t0) & (t1 > 0))[0]
    t[active] = t0[active]
    oT, dT = np.ascontiguousarray(o.T, dtype=dtype), np.ascontiguousarray(d.T, dtype=dtype)  # [3, M]
    ta = t[active].astype(dtype)
    t1a = t1[active].astype(dtype)
    for _ in range(max_steps):
        if active.size == 0:
            break
        dist = shape.sdf_T(oT[:, active] + ta * dT[:, active])
        ta = ta + dist
        done_hit = dist < hit_eps
        keep = ~(done_hit | (ta > t1a))
        t[active[done_hit]] = ta[done_hit]
        hit[active[done_hit]] = True
        active, ta, t1a = active[keep], ta[keep], t1a[keep]
    unfinished = int(active.size)
    # float64 refinement of the hits: a few more sphere steps from the float32 result
    idx = np.nonzero(hit)[0]
    for _ in range(4):
        if idx.size == 0:
            break
        dist = shape.sdf(o[idx] + t[idx, None] * d[idx])
        t[idx] += dist
    if idx.size:
        dist = shape.sdf(o[idx] + t[idx, None] * d[idx])
        bad = np.abs(dist) >= hit_eps
        hit[idx[bad]] = False  # did not converge in float64 (should not happen): count it as background
        unfinished += int(bad.sum())
    return t, hit, unfinished


def normals(shape: Shape, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Unit outward normals ``[M, 3]`` by central differences of the SDF (float64)."""
    g = np.empty_like(p)
    for k in range(3):
        e = np.zeros(3)
        e[k] = h
        g[:, k] = shape.sdf(p + e) - shape.sdf(p - e)
    n = np.linalg.norm(g, axis=1, keepdims=True)
    return g / np.maximum(n, 1e-12)


def shade(shape: Shape, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colours ``[M, 3]`` in [0, 1], part ids ``[M]`` and primitive indices ``[M]`` of surface points ``p``."""
    _, prim = shape.sdf_and_primitive(p)
    part = shape.prim_parts[prim]
    n = normals(shape, p)
    light = AMBIENT + (np.maximum(n @ LIGHTS.T, 0.0) * LIGHT_WEIGHTS).sum(axis=1)
    rgb = np.clip(shape.colors[part - 1] * light[:, None], 0.0, 1.0)
    return rgb, part, prim


def _trace_and_shade(shape: Shape, o: np.ndarray, d: np.ndarray, hit_eps: float):
    t, hit, unfinished = sphere_trace(shape, o, d, hit_eps=hit_eps)
    M = o.shape[0]
    rgb = np.full((M, 3), BACKGROUND)
    part = np.zeros(M, dtype=np.int64)
    prim = np.full(M, -1, dtype=np.int64)
    idx = np.nonzero(hit)[0]
    if idx.size:
        rgb[idx], part[idx], prim[idx] = shade(shape, o[idx] + t[idx, None] * d[idx])
    return t, hit, rgb, part, prim, unfinished


def render_views(shape: Shape, c2w: np.ndarray, f: float, size: int, hit_eps: float = 1e-4,
                 antialias: bool = True) -> Dict[str, np.ndarray]:
    """Render ``V`` views of ``shape``.

    Args:
        c2w: ``[V, 4, 4]`` cam2world poses (OpenCV). f: focal length in pixels; the principal point is
            ``(size / 2, size / 2)`` as in SRN's data.
    Returns a dict with ``rgb`` ``[V, S, S, 3]`` float in [0, 1] (white background), ``depth`` ``[V, S, S]``
    camera z (0 = background), ``semantic`` ``[V, S, S]`` part ids (0 = background), ``hit_sdf_max`` (the
    largest |SDF| at a foreground pixel's depth) and ``unfinished`` (rays that did not converge).
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    V, S = c2w.shape[0], size
    cx = cy = S / 2.0
    rows, cols = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    uv = np.stack([cols.ravel(), rows.ravel()], axis=-1).astype(np.float64)  # (column, row), row-major
    d = ray_directions(c2w, f, cx, cy, uv).reshape(-1, 3)
    o = np.repeat(c2w[:, :3, 3], S * S, axis=0)
    t, hit, rgb, part, prim, unfinished = _trace_and_shade(shape, o, d, hit_eps)
    fwd = np.repeat(c2w[:, :3, 2], S * S, axis=0)
    depth = np.where(hit, t * np.einsum("mi,mi->m", d, fwd), 0.0)
    hit_sdf = np.abs(shape.sdf(o[hit] + t[hit, None] * d[hit])) if hit.any() else np.zeros(1)

    rgb = rgb.reshape(V, S, S, 3)
    if antialias:
        lab = prim.reshape(V, S, S)
        edge = np.zeros((V, S, S), dtype=bool)
        diff_r = lab[:, :, 1:] != lab[:, :, :-1]
        diff_d = lab[:, 1:, :] != lab[:, :-1, :]
        edge[:, :, 1:] |= diff_r
        edge[:, :, :-1] |= diff_r
        edge[:, 1:, :] |= diff_d
        edge[:, :-1, :] |= diff_d
        vi, ri, ci = np.nonzero(edge)
        if vi.size:
            acc = np.zeros((vi.size, 3))
            for dx, dy in ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)):
                sub_uv = np.stack([ci + dx, ri + dy], axis=-1).astype(np.float64)
                cam = np.stack([(sub_uv[:, 0] - cx) / f, (sub_uv[:, 1] - cy) / f, np.ones(vi.size)], axis=-1)
                sd = np.einsum("mij,mj->mi", c2w[vi, :3, :3], cam)
                sd /= np.linalg.norm(sd, axis=-1, keepdims=True)
                _, _, srgb, _, _, _ = _trace_and_shade(shape, c2w[vi, :3, 3], sd, hit_eps)
                acc += srgb
            rgb[vi, ri, ci] = acc / 4.0
    return {"rgb": rgb, "depth": depth.reshape(V, S, S), "semantic": part.reshape(V, S, S),
            "hit_sdf_max": float(hit_sdf.max()), "unfinished": unfinished}
