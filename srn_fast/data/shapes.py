"""Procedural shapes for the scene generator: unions of boxes and cylinders with exact signed distances.

Every shape is a list of :class:`Part` primitives, each with a part id (its semantic label) and a colour. The
signed distance of the union is the minimum over parts, exact outside the shape, and the label of a surface
point is the part that attains the minimum. Coordinates: z up, objects inside roughly [-0.6, 0.6]^3.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

CHAIR_PARTS = ["background", "seat", "back", "legs", "arms"]
CAR_PARTS = ["background", "body", "cabin", "wheels"]
PART_NAMES: Dict[str, List[str]] = {"chairs": CHAIR_PARTS, "cars": CAR_PARTS}


@dataclass
class Part:
    kind: str  # "box" (centre, half sizes) or "cyl" (centre, radius, half length along `axis`)
    centre: Tuple[float, float, float]
    size: Tuple[float, float, float]  # box: half extents; cyl: (radius, half length, unused)
    label: int
    colour: Tuple[float, float, float]
    axis: int = 2  # cylinders: 0 = x, 1 = y, 2 = z


def _box_sdf(p: torch.Tensor, c, h) -> torch.Tensor:
    q = (p - p.new_tensor(c)).abs() - p.new_tensor(h)
    outside = q.clamp(min=0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp(max=0)
    return outside + inside


def _cyl_sdf(p: torch.Tensor, c, r: float, half: float, axis: int) -> torch.Tensor:
    d = p - p.new_tensor(c)
    other = [i for i in range(3) if i != axis]
    radial = d[..., other].norm(dim=-1) - r
    along = d[..., axis].abs() - half
    q = torch.stack([radial, along], dim=-1)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def part_sdfs(parts: List[Part], p: torch.Tensor) -> torch.Tensor:
    """Signed distances ``[..., P]`` of points ``p [..., 3]`` to each part."""
    out = []
    for part in parts:
        if part.kind == "box":
            out.append(_box_sdf(p, part.centre, part.size))
        else:
            out.append(_cyl_sdf(p, part.centre, part.size[0], part.size[1], part.axis))
    return torch.stack(out, dim=-1)


def sdf(parts: List[Part], p: torch.Tensor) -> torch.Tensor:
    """Signed distance ``[...]`` of the union at points ``p [..., 3]``."""
    return part_sdfs(parts, p).min(dim=-1).values


def labels(parts: List[Part], p: torch.Tensor) -> torch.Tensor:
    """Part id ``[...]`` of the closest part at points ``p [..., 3]``."""
    ids = torch.tensor([part.label for part in parts], device=p.device)
    return ids[part_sdfs(parts, p).argmin(dim=-1)]


def _colour(rng: np.random.Generator) -> Tuple[float, float, float]:
    # saturated, mid-bright colours that stand out on white
    hue = rng.uniform(0, 1)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = 1 - np.clip(np.minimum(k, 4 - k), 0, 1)
    rgb = 0.25 + 0.6 * rgb * rng.uniform(0.8, 1.0)
    return tuple(float(v) for v in rgb)


def make_chair(rng: np.random.Generator) -> List[Part]:
    """A chair: seat, back, four legs, optional arms, with random proportions and per-part colours."""
    w = rng.uniform(0.28, 0.42)  # seat half width (x)
    d = rng.uniform(0.26, 0.40)  # seat half depth (y)
    t = rng.uniform(0.025, 0.06)  # seat half thickness
    leg_h = rng.uniform(0.30, 0.42)  # leg length
    back_h = rng.uniform(0.28, 0.50)
    leg_r = rng.uniform(0.025, 0.05)
    bottom = -0.5
    seat_z = bottom + leg_h + t
    cols = {k: _colour(rng) for k in ("seat", "back", "legs", "arms")}
    parts = [Part("box", (0.0, 0.0, seat_z), (w, d, t), 1, cols["seat"])]
    back_t = rng.uniform(0.02, 0.045)
    back_tilt_y = d - back_t
    parts.append(Part("box", (0.0, back_tilt_y, seat_z + t + back_h / 2), (w * rng.uniform(0.8, 1.0), back_t,
                                                                             back_h / 2), 2, cols["back"]))
    round_legs = rng.uniform() < 0.5
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = (sx * (w - leg_r * 1.2), sy * (d - leg_r * 1.2), bottom + leg_h / 2)
            if round_legs:
                parts.append(Part("cyl", c, (leg_r, leg_h / 2, 0.0), 3, cols["legs"], axis=2))
            else:
                parts.append(Part("box", c, (leg_r, leg_r, leg_h / 2), 3, cols["legs"]))
    if rng.uniform() < 0.5:
        arm_h = rng.uniform(0.12, 0.2)
        arm_t = rng.uniform(0.02, 0.035)
        for sx in (-1, 1):
            parts.append(Part("box", (sx * (w - arm_t), 0.0, seat_z + t + arm_h), (arm_t, d * 0.9, arm_t), 4,
                              cols["arms"]))
            parts.append(Part("box", (sx * (w - arm_t), -d * 0.75, seat_z + t + arm_h / 2), (arm_t, arm_t, arm_h / 2),
                              4, cols["arms"]))
    return parts


def make_car(rng: np.random.Generator) -> List[Part]:
    """A car: body box, cabin box and four cylindrical wheels."""
    L = rng.uniform(0.45, 0.6)  # half length (y)
    W = rng.uniform(0.2, 0.28)  # half width (x)
    H = rng.uniform(0.08, 0.14)  # body half height
    r = rng.uniform(0.08, 0.12)  # wheel radius
    bottom = -0.3
    body_z = bottom + r + H * 0.6
    cols = {k: _colour(rng) for k in ("body", "cabin")}
    parts = [Part("box", (0.0, 0.0, body_z), (W, L, H), 1, cols["body"])]
    cab_l = L * rng.uniform(0.4, 0.6)
    cab_h = rng.uniform(0.07, 0.12)
    parts.append(Part("box", (0.0, rng.uniform(-0.15, 0.1) * L, body_z + H + cab_h), (W * 0.85, cab_l, cab_h), 2,
                      cols["cabin"]))
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(Part("cyl", (sx * (W + 0.01), sy * L * 0.65, bottom + r), (r, rng.uniform(0.03, 0.05), 0.0),
                              3, (0.12, 0.12, 0.14), axis=0))
    return parts


MAKERS = {"chairs": make_chair, "cars": make_car}


def parts_to_json(parts: List[Part]) -> List[dict]:
    return [asdict(p) for p in parts]


def parts_from_json(items: List[dict]) -> List[Part]:
    return [Part(**{**it, "centre": tuple(it["centre"]), "size": tuple(it["size"]), "colour": tuple(it["colour"])})
            for it in items]
