"""Generator of multi-view scenes with exact ground truth, written in the SRN dataset format.

Each object is a union of analytic primitives (:mod:`srn_fast.data.shapes`), rendered by sphere tracing its exact
signed distance function, with Lambert shading on a white background. Cameras sit on a sphere of radius
``radius`` around the origin (elevations between -10 and 70 degrees), looking at the centre, OpenCV convention.

Layout written to ``out``::

    out/meta.json                         kind, seed, sizes, camera, part names, every object's parts
    out/train/<instance>/rgb/000000.png   views of the training objects
                        pose/000000.txt   cam2world, 16 numbers on one line
                        depth/000000.png  16-bit camera-space z in units of 1/DEPTH_SCALE (0 = background)
                        semantic/000000.png  8-bit part id (0 = background)
                        intrinsics.txt
    out/test/<instance>/...               held-out views of the same training objects (same names)
    out/unseen/<instance>/...             views of objects not in train (few-shot reconstruction)

The folder is written under a temporary name next to ``out`` and renamed when complete, so an interrupted run
never leaves a half dataset.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import List, Optional

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm

from .. import geometry
from . import shapes

DEPTH_SCALE = 10000.0  # depth PNG value = round(z * DEPTH_SCALE); 1 unit = 10000, max 6.5535 units
DEFAULT_RADIUS = 2.0
DEFAULT_FOCAL = 1.4  # focal length in units of the image size
TRACE_EPS = 1e-5
TRACE_ITERS = 160


def sample_cameras(rng: np.random.Generator, n: int, radius: float) -> List[np.ndarray]:
    """``n`` cam2world matrices on a sphere of ``radius`` (elevation -10..70 deg), looking at the origin."""
    out = []
    for _ in range(n):
        az = rng.uniform(0, 2 * math.pi)
        el = math.radians(rng.uniform(-10, 70))
        eye = radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        out.append(geometry.look_at(eye))
    return out


def render_views(parts, poses: List[np.ndarray], size: int, focal: float):
    """Sphere-trace ``parts`` from each pose. Returns uint8 rgb [V,S,S,3], float depth [V,S,S], uint8 labels."""
    V = len(poses)
    f = focal * size
    c2w = torch.tensor(np.stack(poses), dtype=torch.float32)
    K = geometry.intrinsics_matrix(f, size / 2, size / 2).expand(V, 3, 3)
    uv = geometry.uv_grid(size)[None].expand(V, -1, -1)
    dirs = geometry.get_ray_directions(uv, c2w, K).reshape(-1, 3)
    origin = c2w[:, :3, 3][:, None].expand(V, size * size, 3).reshape(-1, 3)
    # start on the bounding sphere (radius 1) to save iterations
    b = (origin * dirs).sum(-1)
    disc = b * b - (origin * origin).sum(-1) + 1.0
    t = torch.where(disc > 0, (-b - disc.clamp(min=0).sqrt()).clamp(min=0), torch.full_like(b, 1e9))
    active = disc > 0
    hit = torch.zeros_like(active)
    idx = active.nonzero().squeeze(1)
    for _ in range(TRACE_ITERS):
        if idx.numel() == 0:
            break
        p = origin[idx] + t[idx, None] * dirs[idx]
        s = shapes.sdf(parts, p)
        t[idx] += s
        done = s.abs() < TRACE_EPS
        hit[idx[done]] = True
        far = t[idx] > 10.0
        idx = idx[~done & ~far]
    t = torch.where(hit, t, torch.zeros_like(t))
    p = origin + t[:, None] * dirs
    rgb = torch.ones(V * size * size, 3)
    labels = torch.zeros(V * size * size, dtype=torch.uint8)
    hidx = hit.nonzero().squeeze(1)
    if hidx.numel():
        ph = p[hidx]
        e = 1e-4
        n = torch.stack([shapes.sdf(parts, ph + ph.new_tensor(dv)) - shapes.sdf(parts, ph - ph.new_tensor(dv))
                         for dv in ([e, 0, 0], [0, e, 0], [0, 0, e])], dim=-1)
        n = torch.nn.functional.normalize(n, dim=-1)
        lab = shapes.labels(parts, ph)
        colours = torch.zeros(len(parts) + 8, 3)
        for part in parts:
            colours[part.label] = torch.tensor(part.colour)
        light1 = torch.nn.functional.normalize(torch.tensor([0.4, -0.3, 0.85]), dim=0)
        view = -dirs[hidx]
        shade = 0.35 + 0.45 * (n @ light1).clamp(min=0) + 0.25 * (n * view).sum(-1).clamp(min=0)
        rgb[hidx] = (colours[lab.long()] * shade[:, None]).clamp(0, 1)
        labels[hidx] = lab.to(torch.uint8)
    # camera-space z of the hit points
    w2c = torch.linalg.inv(c2w)
    pv = p.reshape(V, size * size, 3)
    z = (pv @ w2c[:, 2, :3].unsqueeze(-1)).squeeze(-1) + w2c[:, 2, 3:4]
    z = torch.where(hit.reshape(V, -1), z, torch.zeros_like(z))
    rgb8 = (rgb.reshape(V, size, size, 3) * 255).round().to(torch.uint8).numpy()
    return rgb8, z.reshape(V, size, size).numpy(), labels.reshape(V, size, size).numpy()


def _write_instance(folder: str, parts, poses, size: int, focal: float, start_index: int = 0):
    for sub in ("rgb", "pose", "depth", "semantic"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rgb, depth, lab = render_views(parts, poses, size, focal)
    f = focal * size
    with open(os.path.join(folder, "intrinsics.txt"), "w") as fh:
        fh.write(f"{f:.10g} {size / 2:.10g} {size / 2:.10g} 0.\n0. 0. 0.\n1.\n{size} {size}\n")
    for v, pose in enumerate(poses):
        name = f"{start_index + v:06d}"
        imageio.imwrite(os.path.join(folder, "rgb", name + ".png"), rgb[v])
        with open(os.path.join(folder, "pose", name + ".txt"), "w") as fh:
            fh.write(" ".join(f"{x:.10g}" for x in pose.reshape(-1)) + "\n")
        d16 = np.clip(np.round(depth[v] * DEPTH_SCALE), 0, 65535).astype(np.uint16)
        imageio.imwrite(os.path.join(folder, "depth", name + ".png"), d16)
        imageio.imwrite(os.path.join(folder, "semantic", name + ".png"), lab[v])


def generate(kind: str = "chairs", instances: int = 8, views: int = 50, size: int = 64, seed: int = 0,
             out: str = "data/chairs", test_views: Optional[int] = None, unseen_instances: Optional[int] = None,
             unseen_views: Optional[int] = None, radius: float = DEFAULT_RADIUS, focal: float = DEFAULT_FOCAL,
             overwrite: bool = False, progress: bool = True) -> str:
    """Render a dataset (see the module docstring for the layout); returns ``out``.

    ``test_views`` held-out views per training object (default max(4, views // 5)), ``unseen_instances``
    objects for few-shot (default max(2, instances // 4)) with ``unseen_views`` views each (default ``views``).
    Deterministic for a given seed and arguments.
    """
    if kind not in shapes.MAKERS:
        raise ValueError(f"kind must be one of {sorted(shapes.MAKERS)}, got {kind!r}")
    for name, val in (("instances", instances), ("views", views), ("size", size)):
        if int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    test_views = max(4, views // 5) if test_views is None else test_views
    unseen_instances = max(2, instances // 4) if unseen_instances is None else unseen_instances
    unseen_views = views if unseen_views is None else unseen_views
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {parent}")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
    rng = np.random.default_rng(seed)
    maker = shapes.MAKERS[kind]
    meta = {"kind": kind, "seed": seed, "size": size, "focal": focal * size, "radius": radius,
            "depth_scale": DEPTH_SCALE, "part_names": shapes.PART_NAMES[kind], "train": {}, "unseen": {},
            "views": views, "test_views": test_views, "unseen_views": unseen_views}
    jobs = []
    for i in range(instances):
        name = f"{kind[:-1]}_{i:04d}"
        parts = maker(rng)
        meta["train"][name] = shapes.parts_to_json(parts)
        jobs.append(("train", name, parts, sample_cameras(rng, views, radius), 0))
        jobs.append(("test", name, parts, sample_cameras(rng, test_views, radius), 0))
    for i in range(unseen_instances):
        name = f"unseen_{i:04d}"
        parts = maker(rng)
        meta["unseen"][name] = shapes.parts_to_json(parts)
        jobs.append(("unseen", name, parts, sample_cameras(rng, unseen_views, radius), 0))
    try:
        for split, name, parts, poses, start in tqdm(jobs, desc=f"make-data {kind}", unit="object",
                                                     disable=not progress):
            if poses:
                _write_instance(os.path.join(tmp, split, name), parts, poses, size, focal, start)
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        if os.path.exists(out):
            old = out + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_meta(root: str) -> dict:
    """``meta.json`` of a generated dataset (root = the folder holding train/test/unseen)."""
    with open(os.path.join(root, "meta.json")) as fh:
        return json.load(fh)


def instance_parts(root: str, split: str, name: str):
    meta = load_meta(root)
    key = "unseen" if split == "unseen" else "train"
    return shapes.parts_from_json(meta[key][name])
