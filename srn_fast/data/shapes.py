"""Procedural shape families built from SDF primitives (z is up, the object's front faces -y or +x).

Each ``make_<kind>(rng)`` draws random proportions and per-part colours and returns ``(params, shape)``:
``params`` the drawn high-level parameters (plain floats/strings, stored in ``meta.json``) and ``shape`` an
un-normalised :class:`~srn_fast.data.sdf.Shape`; :func:`make_shape` then centres the shape's bounding box at
the origin and scales it so that the box's half-diagonal is ``object_radius`` (the whole object lies inside
a sphere of that radius).

Kinds and part ids (1-based, 0 is background):

- ``chairs``: seat, back, legs, arms. Legs are four square or round legs or a pedestal with a base; backs are
  a solid panel or a frame of posts and rails, tilted back; arms are optional (rests on supports).
- ``cars``: body, cabin, wheels. A rounded body, a rounded cabin on top, four rounded cylinders.
- ``mix``: sphere, box, cylinder, torus. Two to four randomly sized and oriented primitives, each placed a
  random step (about its size) from the previous one.
"""
from __future__ import annotations

import colorsys
from typing import Callable, Dict, Tuple

import numpy as np

from .sdf import Shape

PART_NAMES = {
    "chairs": ["seat", "back", "legs", "arms"],
    "cars": ["body", "cabin", "wheels"],
    "mix": ["sphere", "box", "cylinder", "torus"],
}


def _color(rng: np.random.Generator, sat=(0.35, 0.9), val=(0.35, 0.85)) -> list:
    h = rng.uniform(0.0, 1.0)
    return list(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)))


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# wheel / pedestal axis along world y: columns are the local axes (x -> x, y -> -z, z -> y)
_AXIS_Y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def make_chair(rng: np.random.Generator) -> Tuple[Dict, Shape]:
    P = {}
    W = P["seat_width"] = rng.uniform(0.8, 1.2)
    D = P["seat_depth"] = rng.uniform(0.75, 1.15)
    T = P["seat_thickness"] = rng.uniform(0.06, 0.14)
    H = P["seat_height"] = rng.uniform(0.7, 1.05)
    P["seat_rounding"] = rng.uniform(0.0, 0.45) * T
    P["leg_style"] = str(rng.choice(["square", "round", "pedestal"], p=[0.4, 0.4, 0.2]))
    lt = P["leg_thickness"] = rng.uniform(0.05, 0.11)
    inset = P["leg_inset"] = rng.uniform(0.0, 0.1)
    P["back_style"] = str(rng.choice(["panel", "frame"], p=[0.6, 0.4]))
    Hb = P["back_height"] = rng.uniform(0.55, 1.1)
    bt = P["back_thickness"] = rng.uniform(0.05, 0.12)
    tilt = P["back_tilt"] = rng.uniform(0.0, 0.25)
    bw = P["back_width"] = W * rng.uniform(0.75, 1.0)
    P["has_arms"] = bool(rng.uniform() < 0.35)

    prims = []
    z_seat = H + T / 2
    prims.append({"type": "box", "part": 1, "center": [0.0, 0.0, z_seat], "half": [W / 2, D / 2, T / 2],
                  "round": P["seat_rounding"]})
    # legs reach into the seat so the union has no gaps
    leg_h = H + T / 2
    if P["leg_style"] == "pedestal":
        base_r = P["base_radius"] = min(W, D) * rng.uniform(0.3, 0.45)
        base_t = P["base_thickness"] = rng.uniform(0.04, 0.08)
        post_r = P["post_radius"] = rng.uniform(0.04, 0.08)
        prims.append({"type": "cylinder", "part": 3, "center": [0.0, 0.0, base_t / 2], "radius": base_r,
                      "half_height": base_t / 2, "round": base_t / 3})
        prims.append({"type": "cylinder", "part": 3, "center": [0.0, 0.0, (base_t + leg_h) / 2],
                      "radius": post_r, "half_height": (leg_h - base_t) / 2 + 0.01, "round": 0.0})
    else:
        x, y = W / 2 - inset - lt / 2, D / 2 - inset - lt / 2
        for sx in (-1, 1):
            for sy in (-1, 1):
                c = [sx * x, sy * y, leg_h / 2]
                if P["leg_style"] == "square":
                    prims.append({"type": "box", "part": 3, "center": c, "half": [lt / 2, lt / 2, leg_h / 2],
                                  "round": 0.0})
                else:
                    prims.append({"type": "cylinder", "part": 3, "center": c, "radius": lt / 2,
                                  "half_height": leg_h / 2, "round": 0.0})
    # back: rises from the seat's rear edge (+y), tilted back about the x axis
    R = _rot_x(-tilt)  # local z leans towards +y
    axis = R[:, 2]
    foot = np.array([0.0, D / 2 - bt / 2, H + T / 2])
    if P["back_style"] == "panel":
        c = foot + axis * (Hb / 2)
        prims.append({"type": "box", "part": 2, "center": c.tolist(), "half": [bw / 2, bt / 2, Hb / 2],
                      "round": bt * 0.3, "rot": R.tolist()})
    else:
        post = P["post_width"] = rng.uniform(0.05, 0.09)
        rails = P["rails"] = int(rng.integers(1, 4))
        rail_h = P["rail_height"] = rng.uniform(0.06, 0.14)
        for sx in (-1, 1):
            c = foot + axis * (Hb / 2) + R[:, 0] * sx * (bw / 2 - post / 2)
            prims.append({"type": "box", "part": 2, "center": c.tolist(), "half": [post / 2, bt / 2, Hb / 2],
                          "round": 0.0, "rot": R.tolist()})
        for k in range(rails):
            h = Hb - rail_h / 2 - k * (Hb * 0.8 / rails)
            c = foot + axis * h
            prims.append({"type": "box", "part": 2, "center": c.tolist(), "half": [bw / 2, bt / 2 * 0.8, rail_h / 2],
                          "round": 0.0, "rot": R.tolist()})
    if P["has_arms"]:
        ha = P["arm_height"] = rng.uniform(0.18, 0.32)
        at = P["arm_thickness"] = rng.uniform(0.04, 0.08)
        al = P["arm_length"] = D * rng.uniform(0.7, 0.95)
        z0 = H + T
        for sx in (-1, 1):
            x = sx * (W / 2 - at / 2)
            prims.append({"type": "box", "part": 4, "center": [x, D / 2 - al / 2, z0 + ha], "half":
                          [at / 2, al / 2, at / 2], "round": at * 0.3})
            prims.append({"type": "box", "part": 4, "center": [x, D / 2 - al + at, z0 + ha / 2], "half":
                          [at / 2, at / 2, ha / 2 + 0.01], "round": 0.0})
    seat_col = _color(rng)
    colors = [seat_col,
              seat_col if rng.uniform() < 0.5 else _color(rng),
              _color(rng, sat=(0.1, 0.6), val=(0.15, 0.6)),
              _color(rng)]
    return P, Shape(prims, PART_NAMES["chairs"], np.array(colors))


def make_car(rng: np.random.Generator) -> Tuple[Dict, Shape]:
    P = {}
    L = P["length"] = rng.uniform(1.6, 2.3)
    Wd = P["width"] = rng.uniform(0.75, 0.95)
    cl = P["clearance"] = rng.uniform(0.08, 0.16)
    Hb = P["body_height"] = rng.uniform(0.28, 0.42)
    rb = P["body_rounding"] = rng.uniform(0.04, 0.12)
    Lc = P["cabin_length"] = L * rng.uniform(0.4, 0.65)
    xc = P["cabin_offset"] = L * rng.uniform(-0.15, 0.08)
    Hc = P["cabin_height"] = rng.uniform(0.22, 0.38)
    Wc = P["cabin_width"] = Wd * rng.uniform(0.8, 0.95)
    rc = P["cabin_rounding"] = rng.uniform(0.05, 0.11)
    rw = P["wheel_radius"] = rng.uniform(0.14, 0.21)
    ww = P["wheel_width"] = rng.uniform(0.08, 0.14)
    xw = P["wheel_base"] = L / 2 - rng.uniform(0.22, 0.35)
    yw = P["wheel_track"] = Wd / 2 - ww / 2 + rng.uniform(0.0, 0.04)
    prims = [
        {"type": "box", "part": 1, "center": [0.0, 0.0, cl + Hb / 2], "half": [L / 2, Wd / 2, Hb / 2], "round": rb},
        {"type": "box", "part": 2, "center": [xc, 0.0, cl + Hb + Hc / 2 - 0.03], "half": [Lc / 2, Wc / 2, Hc / 2],
         "round": rc},
    ]
    for sx in (-1, 1):
        for sy in (-1, 1):
            prims.append({"type": "cylinder", "part": 3, "center": [sx * xw, sy * yw, rw], "radius": rw,
                          "half_height": ww / 2, "round": 0.025, "rot": _AXIS_Y.tolist()})
    body = _color(rng, sat=(0.5, 0.95), val=(0.45, 0.9))
    cabin = _color(rng, sat=(0.1, 0.5), val=(0.15, 0.4))
    wheel = [rng.uniform(0.08, 0.2)] * 3
    return P, Shape(prims, PART_NAMES["cars"], np.array([body, cabin, wheel]))


def make_mix(rng: np.random.Generator) -> Tuple[Dict, Shape]:
    types = ["sphere", "box", "cylinder", "torus"]
    n = int(rng.integers(2, 5))
    P = {"count": n, "types": []}
    prims = []
    pos = np.zeros(3)
    for k in range(n):
        t = int(rng.integers(0, 4))
        P["types"].append(types[t])
        R = random_rotation(rng)
        s = rng.uniform(0.25, 0.45)
        if t == 0:
            prim = {"type": "sphere", "radius": s}
        elif t == 1:
            half = rng.uniform(0.4, 1.0, 3) * s
            prim = {"type": "box", "half": half.tolist(), "round": float(rng.uniform(0.0, 0.4) * half.min())}
        elif t == 2:
            prim = {"type": "cylinder", "radius": s * rng.uniform(0.4, 0.9), "half_height": s * rng.uniform(0.5, 1.2),
                    "round": 0.02}
        else:
            prim = {"type": "torus", "radius": s * 0.8, "tube": s * rng.uniform(0.2, 0.35)}
        if k > 0:  # a random step of about the primitive's size from the previous centre
            d = rng.standard_normal(3)
            pos = pos + d / np.linalg.norm(d) * s * rng.uniform(0.8, 1.3)
        prim.update({"part": t + 1, "center": pos.tolist(), "rot": R.tolist()})
        prims.append(prim)
    colors = [_color(rng) for _ in types]
    return P, Shape(prims, PART_NAMES["mix"], np.array(colors))


KINDS: Dict[str, Callable[[np.random.Generator], Tuple[Dict, Shape]]] = {
    "chairs": make_chair,
    "cars": make_car,
    "mix": make_mix,
}


def make_shape(kind: str, rng: np.random.Generator, object_radius: float = 0.6) -> Tuple[Dict, Shape]:
    """Draw one object of ``kind``, centred and scaled so its bounding box's half-diagonal is ``object_radius``.

    Returns ``(params, shape)``; ``params["normalisation"]`` records the scale and shift applied.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    params, shape = KINDS[kind](rng)
    lo, hi = shape.bounds()
    centre = (lo + hi) / 2
    scale = object_radius / (np.linalg.norm(hi - lo) / 2)
    shift = -centre * scale
    params["normalisation"] = {"scale": float(scale), "shift": shift.tolist()}
    params = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in params.items()}
    return params, shape.transformed(scale, shift)
