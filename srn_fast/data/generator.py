"""Procedural multi-view datasets in the SRN format, with exact depth and part labels.

:func:`generate` writes::

    DIR/meta.json                      kind, seed, cameras, part names, per-instance shape parameters
    DIR/preview.png                    first view of up to 8 training objects (rows: rgb, depth, parts)
    DIR/train/<instance>/rgb/000000.png ...        8-bit RGB, white background
                        /pose/000000.txt ...       cam2world (OpenCV), four lines of four numbers
                        /depth/000000.png ...      16-bit grey: camera z = value * 1e-4, 0 = background
                        /semantic/000000.png ...   palette PNG: pixel value = part id, 0 = background
                        /intrinsics.txt            "f cx cy 0." / "0. 0. 0." / "1." / "S S"
    DIR/test/<instance>/...            held-out views of the SAME training instances (same names)
    DIR/unseen/<instance>/...          new objects (few-shot), ``unseen_views`` views each

Cameras sit at ``distance`` from the origin looking at it (``srn_fast.geometry.look_at``, z up). Training and
unseen views cover the sphere evenly (a Fibonacci lattice under a random rotation per instance; the upper
hemisphere only with ``upper_hemisphere=True``); test views follow a spiral over the upper hemisphere (as
SRN's ShapeNet test sets). Objects are scaled so their bounding box's half-diagonal is ``object_radius``.

Defaults (distance 1.5, object radius 0.6, focal length 1.025 * size as SRN's 131.25 px at 128 px) put every
surface between 0.9 and 2.1 units from the camera, the range of SRN's ShapeNet renders (cars about
0.8-1.8, chairs about 1.25-2.75): the learned ray marcher starts at depth 0.05 and reaches the object in its
10 steps, and the object fills most of the view without leaving it.

Everything is deterministic per ``seed``: instance ``i`` of a kind gets its own random stream
(``SeedSequence([seed, crc32(kind), split, i])``), so it is the same object whatever ``instances`` is. The
dataset is written into a hidden temporary folder next to ``out`` (``.NAME.tmp-<pid>-<id>``) and renamed to ``out``
only when complete; the next run removes the temporaries of a killed one (whose pid is gone). Its files are written
by :mod:`srn_fast.files` without an fsync each (the folder's rename is what makes the dataset appear).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import sys
import time
import zlib
from typing import Dict, Optional

import numpy as np
from tqdm import tqdm

from ..files import write_json, write_text
from ..geometry import look_at
from ..runfolder import clean_stale_siblings, sibling_temp_name
from . import io
from .io import DataError
from .render import render_views
from .sdf import Shape
from .shapes import KINDS, PART_NAMES, make_shape

FORMAT = "srn_fast-synthetic-1"
SPLIT_CODES = {"train": 0, "unseen": 1}


def instance_names(kind: str, n: int, unseen: bool = False):
    width = max(4, len(str(max(n - 1, 0))))
    return [f"{kind}_{'unseen_' if unseen else ''}{i:0{width}d}" for i in range(n)]


def fibonacci_directions(n: int, upper: bool = False) -> np.ndarray:
    """``[n, 3]`` unit vectors evenly spread over the sphere (or the upper hemisphere, z > 0)."""
    k = np.arange(n) + 0.5
    z = (k / n) if upper else (1.0 - 2.0 * k / n)
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = k * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def spiral_directions(n: int, turns: float = 3.0, elev=(0.15, 1.25), phase: float = 0.0) -> np.ndarray:
    """``[n, 3]`` unit vectors on a spiral over the upper hemisphere (elevation in radians from ``elev``)."""
    s = (np.arange(n) + 0.5) / max(n, 1)
    e = elev[0] + (elev[1] - elev[0]) * s
    a = phase + 2.0 * np.pi * turns * s
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1)


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _instance_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(kind.encode()), SPLIT_CODES[split],
                                                         index]))


def _sphere_views(rng, n, upper):
    from .shapes import random_rotation
    dirs = fibonacci_directions(n, upper)
    R = _rot_z(rng.uniform(0, 2 * np.pi)) if upper else random_rotation(rng)
    return dirs @ R.T


def _write_instance(folder: str, render: Dict, c2w: np.ndarray, f: float, size: int) -> None:
    for sub in ("rgb", "pose", "depth", "semantic"):
        os.makedirs(os.path.join(folder, sub))
    write_text(os.path.join(folder, "intrinsics.txt"), f"{f!r} {size / 2!r} {size / 2!r} 0.\n0. 0. 0.\n1.\n{size} {size}\n",
               fsync=False)
    for v in range(c2w.shape[0]):
        name = f"{v:06d}"
        io.save_rgb(os.path.join(folder, "rgb", name + ".png"), render["rgb"][v])
        io.save_depth(os.path.join(folder, "depth", name + ".png"), render["depth"][v])
        io.save_semantic(os.path.join(folder, "semantic", name + ".png"), render["semantic"][v])
        write_text(os.path.join(folder, "pose", name + ".txt"),
                   "\n".join(" ".join(f"{x:.17g}" for x in row) for row in c2w[v]) + "\n", fsync=False)


def _job(task) -> Dict:
    """Make, render and write one instance (its train and test views, or its unseen views)."""
    (tmp, kind, split, index, name, seed, size, f, distance, object_radius, views, test_views, upper) = task
    rng = _instance_rng(seed, kind, split, index)
    params, shape = make_shape(kind, rng, object_radius)
    c2w_sets = {}
    if split == "train":
        c2w_sets["train"] = np.stack([look_at(distance * d) for d in _sphere_views(rng, views, upper)])
        if test_views:
            dirs = spiral_directions(test_views, phase=rng.uniform(0, 2 * np.pi))
            c2w_sets["test"] = np.stack([look_at(distance * d) for d in dirs])
    else:
        c2w_sets["unseen"] = np.stack([look_at(distance * d) for d in _sphere_views(rng, views, upper)])
    stats = {"hit_sdf_max": 0.0, "unfinished": 0, "foreground": 0.0}
    first = None
    for sub, c2w in c2w_sets.items():
        out = render_views(shape, c2w, f, size)
        _write_instance(os.path.join(tmp, sub, name), out, c2w, f, size)
        stats["hit_sdf_max"] = max(stats["hit_sdf_max"], out["hit_sdf_max"])
        stats["unfinished"] += out["unfinished"]
        stats["foreground"] += float((out["semantic"] > 0).mean()) * c2w.shape[0]
        if first is None:
            first = (out["rgb"][0], out["depth"][0], out["semantic"][0])
    stats["foreground"] /= sum(c.shape[0] for c in c2w_sets.values())
    return {"name": name, "split": split, "params": params, "shape": shape.to_dict(), "stats": stats,
            "first": first}


def _preview(path: str, firsts) -> None:
    rows = []
    for rgb, depth, sem in firsts:
        fg = depth > 0
        dimg = np.ones_like(depth)
        if fg.any():
            lo, hi = depth[fg].min(), depth[fg].max()
            dimg[fg] = 0.15 + 0.7 * (depth[fg] - lo) / max(hi - lo, 1e-6)
        pal = np.array(io._PALETTE, dtype=np.float64).reshape(-1, 3) / 255.0
        rows.append(np.concatenate([rgb, np.repeat(dimg[..., None], 3, axis=2), pal[sem]], axis=0))
    io.save_rgb(path, np.concatenate(rows, axis=1))  # one column per instance: rgb / depth / parts


def generate(kind: str = "chairs", instances: int = 8, views: int = 50, size: int = 64, seed: int = 0,
             out: Optional[str] = None, test_views: int = 10, unseen_instances: int = 2,
             unseen_views: Optional[int] = None, distance: float = 1.5, focal: float = 1.025,
             object_radius: float = 0.6, upper_hemisphere: bool = False, overwrite: bool = False,
             workers: Optional[int] = None, progress: bool = True) -> str:
    """Generate a dataset of ``kind`` (``"chairs"``, ``"cars"`` or ``"mix"``) into ``out``; returns ``out``.

    Args:
        instances: training objects (views + test_views each). views: training views per object.
        size: image side in pixels. seed: everything is a function of it.
        test_views: held-out views per training object (``DIR/test``; 0 for none).
        unseen_instances, unseen_views: new objects for few-shot (``DIR/unseen``; views default ``views``).
        distance: camera distance from the origin. focal: focal length as a multiple of ``size``.
        object_radius: half-diagonal of each object's bounding box. upper_hemisphere: train/unseen cameras
            with z > 0 only. overwrite: replace an existing ``out`` (only once the new one is complete).
        workers: processes (default: up to 2, one per CPU). progress: tqdm bar over instances.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if out is None:
        raise ValueError("out: an output folder is required")
    for arg, val, lo in (("instances", instances, 1), ("views", views, 1), ("size", size, 2),
                         ("test_views", test_views, 0), ("unseen_instances", unseen_instances, 0)):
        if int(val) != val or val < lo:
            raise ValueError(f"{arg} must be an integer >= {lo}, got {val!r}")
    unseen_views = views if unseen_views is None else unseen_views
    if not 0 < object_radius < distance - 0.05:
        raise ValueError(f"object_radius must be positive and the camera (distance {distance}) must stay "
                         f"outside the object with room for the SRN initial depth 0.05; got {object_radius}")
    if distance + object_radius > io.DEPTH_MAX:
        raise ValueError(f"distance + object_radius = {distance + object_radius} exceeds the depth PNG range "
                         f"({io.DEPTH_MAX} units)")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise DataError(f"{out}: output folder exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # hidden temporaries carry our pid: those of killed runs (pid gone) are removed here
    clean_stale_siblings(out, log=lambda m: print(m, file=sys.stderr))
    tmp = sibling_temp_name(out, "tmp")
    f = focal * size
    tasks = []
    for split, n, v, tv in (("train", instances, views, test_views), ("unseen", unseen_instances, unseen_views, 0)):
        for i, name in enumerate(instance_names(kind, n, unseen=split == "unseen")):
            tasks.append((tmp, kind, split, i, name, seed, size, f, distance, object_radius, v, tv,
                          upper_hemisphere))
    workers = min(len(tasks), workers or min(2, os.cpu_count() or 1))
    t_start = time.time()
    old_term = _raise_on_sigterm()
    try:
        os.makedirs(tmp)
        for sub in ("train", "test", "unseen"):
            os.makedirs(os.path.join(tmp, sub))
        bar = tqdm(total=len(tasks), desc=f"make-data {kind}", unit="object", disable=not progress)
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                results = []
                for r in pool.imap(_job, tasks):
                    results.append(r)
                    bar.update(1)
        else:
            results = []
            for t in tasks:
                results.append(_job(t))
                bar.update(1)
        bar.close()
        meta = {
            "format": FORMAT, "kind": kind, "seed": seed, "size": size, "views": views, "test_views": test_views,
            "unseen_instances": unseen_instances, "unseen_views": unseen_views,
            "camera": {"distance": distance, "focal": f, "cx": size / 2, "cy": size / 2, "convention": "opencv",
                       "up": [0.0, 0.0, 1.0], "upper_hemisphere": upper_hemisphere},
            "object_radius": object_radius,
            "part_names": PART_NAMES[kind],
            "semantic_ids": {"background": 0, **{p: i + 1 for i, p in enumerate(PART_NAMES[kind])}},
            "depth": {"format": "16-bit PNG", "scale": io.DEPTH_SCALE, "meaning": "camera z (OpenCV), 0 = background"},
            "splits": {"train": [r["name"] for r in results if r["split"] == "train"],
                       "test": [r["name"] for r in results if r["split"] == "train" and test_views],
                       "unseen": [r["name"] for r in results if r["split"] == "unseen"]},
            "instances": {r["name"]: {"split": r["split"], "params": r["params"], "shape": r["shape"],
                                      "stats": r["stats"]} for r in results},
            "stats": {"hit_sdf_max": max(r["stats"]["hit_sdf_max"] for r in results),
                      "unfinished_rays": sum(r["stats"]["unfinished"] for r in results),
                      "seconds": round(time.time() - t_start, 2), "workers": workers},
        }
        if not test_views:
            os.rmdir(os.path.join(tmp, "test"))
        if not unseen_instances:
            os.rmdir(os.path.join(tmp, "unseen"))
        _preview(os.path.join(tmp, "preview.png"), [r["first"] for r in results if r["split"] == "train"][:8])
        write_json(os.path.join(tmp, "meta.json"), meta, indent=1, fsync=False)
        if os.path.exists(out):  # overwrite: swap in the complete new folder, then drop the old one
            old = sibling_temp_name(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return out


def _worker_init():
    """Pool workers: the parent handles Ctrl-C and cleans up; it stops workers with SIGTERM (default action)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt (so the temporary folder is removed); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    return signal.signal(signal.SIGTERM, handler)


def load_meta(root: str) -> Dict:
    """``meta.json`` of a generated dataset (``root`` is its top folder or one of its split folders)."""
    root = os.fspath(root)
    for cand in (os.path.join(root, "meta.json"), os.path.join(os.path.dirname(os.path.abspath(root)), "meta.json")):
        if os.path.isfile(cand):
            with open(cand) as fh:
                return json.load(fh)
    raise DataError(f"{root}: no meta.json here or in the parent folder (not a generated dataset?)")


def load_shape(root: str, name: str) -> Shape:
    """The exact SDF (a :class:`~srn_fast.data.sdf.Shape`) of generated instance ``name`` under ``root``."""
    meta = load_meta(root)
    if name not in meta["instances"]:
        raise DataError(f"{root}: meta.json has no instance {name!r}")
    return Shape.from_dict(meta["instances"][name]["shape"])
