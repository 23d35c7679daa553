"""Exact signed distance functions of simple primitives and their union, in vectorised numpy.

A :class:`Shape` is a list of primitives, each with a part id; its SDF is the minimum over the primitives
(exact outside the union, a lower bound inside, so sphere tracing never overshoots) and the part of a point is
the part of the closest primitive. Shapes round-trip through plain dicts (:meth:`Shape.to_dict`,
:meth:`Shape.from_dict`), which the generator stores in ``meta.json``; :func:`srn_fast.data.load_shape`
rebuilds the exact SDF of any generated instance from it.

Primitive dicts (all lengths in scene units; ``rot`` is a 3x3 matrix whose columns are the primitive's local
axes in world coordinates, identity when absent):

- ``{"type": "box", "center": [3], "half": [3], "round": r}``: a box of half-extents ``half`` with edges
  rounded by ``r`` (``r <= min(half)``; the rounding is inside the half-extents).
- ``{"type": "cylinder", "center": [3], "radius": r, "half_height": h, "round": e}``: a capped cylinder
  along the local z axis, edges rounded by ``e``.
- ``{"type": "sphere", "center": [3], "radius": r}``.
- ``{"type": "torus", "center": [3], "radius": R, "tube": r}``: a ring in the local xy plane.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np


def _local(P: np.ndarray, prim: Dict) -> np.ndarray:
    """World points ``P`` [3, M] (rows x, y, z) -> the primitive's local frame, [3, M]."""
    c = np.asarray(prim["center"], dtype=P.dtype).reshape(3, 1)
    rot = prim.get("rot")
    if rot is None:
        return P - c
    return np.asarray(rot, dtype=P.dtype).T @ (P - c)  # R^T (p - c)


def sdf_box(q: np.ndarray, half: Sequence[float], r: float) -> np.ndarray:
    """Rounded box centred at the origin: local points ``q`` [3, M] -> [M]."""
    hx, hy, hz = (float(h) - r for h in half)
    dx, dy, dz = np.abs(q[0]) - hx, np.abs(q[1]) - hy, np.abs(q[2]) - hz
    ox, oy, oz = np.maximum(dx, 0.0), np.maximum(dy, 0.0), np.maximum(dz, 0.0)
    outside = np.sqrt(ox * ox + oy * oy + oz * oz)
    inside = np.minimum(np.maximum(np.maximum(dx, dy), dz), 0.0)
    return outside + inside - r


def sdf_cylinder(q: np.ndarray, radius: float, half_height: float, e: float) -> np.ndarray:
    """Capped cylinder along local z with rims rounded by ``e``: local points [3, M] -> [M]."""
    a = np.sqrt(q[0] * q[0] + q[1] * q[1]) - (radius - e)
    b = np.abs(q[2]) - (half_height - e)
    oa, ob = np.maximum(a, 0.0), np.maximum(b, 0.0)
    return np.sqrt(oa * oa + ob * ob) + np.minimum(np.maximum(a, b), 0.0) - e


def sdf_sphere(q: np.ndarray, radius: float) -> np.ndarray:
    return np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) - radius


def sdf_torus(q: np.ndarray, radius: float, tube: float) -> np.ndarray:
    a = np.sqrt(q[0] * q[0] + q[1] * q[1]) - radius
    return np.sqrt(a * a + q[2] * q[2]) - tube


def _primitive_sdf_T(P: np.ndarray, prim: Dict) -> np.ndarray:
    q = _local(P, prim)
    t = prim["type"]
    if t == "box":
        return sdf_box(q, prim["half"], prim.get("round", 0.0))
    if t == "cylinder":
        return sdf_cylinder(q, prim["radius"], prim["half_height"], prim.get("round", 0.0))
    if t == "sphere":
        return sdf_sphere(q, prim["radius"])
    if t == "torus":
        return sdf_torus(q, prim["radius"], prim["tube"])
    raise ValueError(f"unknown primitive type {t!r}")


def primitive_sdf(p: np.ndarray, prim: Dict) -> np.ndarray:
    """Signed distance of world points ``p`` [M, 3] to one primitive dict -> [M]."""
    p = np.asarray(p)
    return _primitive_sdf_T(np.ascontiguousarray(p.reshape(-1, 3).T), prim).reshape(p.shape[:-1])


def primitive_radius(prim: Dict) -> float:
    """Distance from the primitive's centre to its farthest point (for bounding spheres)."""
    t = prim["type"]
    if t == "box":
        return float(np.linalg.norm(prim["half"]))
    if t == "cylinder":
        return float(np.hypot(prim["radius"], prim["half_height"]))
    if t == "sphere":
        return float(prim["radius"])
    if t == "torus":
        return float(prim["radius"] + prim["tube"])
    raise ValueError(f"unknown primitive type {t!r}")


class Shape:
    """A union of primitives with part labels and per-part colours.

    Args:
        primitives: primitive dicts (see the module docstring), each with a ``"part"`` key (1..P).
        part_names: names of parts 1..P (``part_names[k - 1]`` names id ``k``).
        colors: ``[P, 3]`` albedo in [0, 1] per part.
    """

    def __init__(self, primitives: List[Dict], part_names: Sequence[str], colors: np.ndarray):
        if not primitives:
            raise ValueError("a Shape needs at least one primitive")
        self.primitives = primitives
        self.part_names = list(part_names)
        self.colors = np.asarray(colors, dtype=np.float64).reshape(len(self.part_names), 3)
        self.prim_parts = np.array([int(p["part"]) for p in primitives], dtype=np.int64)
        if self.prim_parts.min() < 1 or self.prim_parts.max() > len(self.part_names):
            raise ValueError(f"primitive part ids must lie in 1..{len(self.part_names)}")

    def sdf_and_primitive(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``p`` [M, 3] -> (signed distance [M], index of the closest primitive [M])."""
        P = np.ascontiguousarray(np.asarray(p).reshape(-1, 3).T)
        best = None
        arg = np.zeros(P.shape[1], dtype=np.int64)
        for k, prim in enumerate(self.primitives):
            d = _primitive_sdf_T(P, prim)
            if best is None:
                best = d
            else:
                closer = d < best
                best = np.where(closer, d, best)
                arg[closer] = k
        return best, arg

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Signed distance [M] of world points ``p`` [M, 3] (or ``[..., 3]``, returning ``[...]``)."""
        p = np.asarray(p)
        return self.sdf_T(np.ascontiguousarray(p.reshape(-1, 3).T)).reshape(p.shape[:-1])

    def sdf_T(self, P: np.ndarray) -> np.ndarray:
        """Signed distance [M] of world points given as rows ``P`` [3, M] (x, y, z; the fast layout)."""
        best = _primitive_sdf_T(P, self.primitives[0])
        for prim in self.primitives[1:]:
            np.minimum(best, _primitive_sdf_T(P, prim), out=best)
        return best

    def part(self, p: np.ndarray) -> np.ndarray:
        """Part id (1..P) [M] of the primitive closest to each point."""
        return self.prim_parts[self.sdf_and_primitive(np.asarray(p).reshape(-1, 3))[1]]

    def bounding_radius(self) -> float:
        """Radius of a sphere centred at the origin that holds the whole shape."""
        return max(float(np.linalg.norm(p["center"])) + primitive_radius(p) for p in self.primitives)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lo [3], hi [3]) from each primitive's own bounding box."""
        lo, hi = [], []
        for prim in self.primitives:
            c = np.asarray(prim["center"], dtype=np.float64)
            R = np.asarray(prim.get("rot", np.eye(3)), dtype=np.float64)
            t = prim["type"]
            if t == "box":
                ext = np.asarray(prim["half"], dtype=np.float64)
            elif t == "cylinder":
                ext = np.array([prim["radius"], prim["radius"], prim["half_height"]])
            elif t == "sphere":
                ext = np.full(3, prim["radius"])
            else:
                ext = np.array([prim["radius"] + prim["tube"]] * 2 + [prim["tube"]])
            half = np.abs(R) @ ext  # world half-extent of the rotated local box
            lo.append(c - half)
            hi.append(c + half)
        return np.min(lo, axis=0), np.max(hi, axis=0)

    def transformed(self, scale: float, shift: np.ndarray) -> "Shape":
        """The shape scaled by ``scale`` about the origin, then translated by ``shift``."""
        prims = []
        for prim in self.primitives:
            q = dict(prim)
            q["center"] = (np.asarray(prim["center"], dtype=np.float64) * scale + shift).tolist()
            for key in ("half",):
                if key in q:
                    q[key] = (np.asarray(q[key], dtype=np.float64) * scale).tolist()
            for key in ("radius", "half_height", "round", "tube"):
                if key in q:
                    q[key] = float(q[key]) * scale
            prims.append(q)
        return Shape(prims, self.part_names, self.colors)

    def to_dict(self) -> Dict:
        prims = []
        for prim in self.primitives:
            q = {}
            for k, v in prim.items():
                q[k] = np.asarray(v).tolist() if isinstance(v, (np.ndarray, list, tuple)) else v
            prims.append(q)
        return {"part_names": self.part_names, "colors": self.colors.tolist(), "primitives": prims}

    @classmethod
    def from_dict(cls, d: Dict) -> "Shape":
        return cls(d["primitives"], d["part_names"], np.asarray(d["colors"]))
