"""Scoring semantic heads on held-out views, and the pictures: part maps beside RGB, orbit GIFs, the feature
embedding and the mIoU-against-K plot.

The held-out views are rendered once per SRN (one march per ray, features kept); every head trained on that SRN is
then applied to the same features, so comparing K = all / 30 / 10 costs one render.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import geometry
from ..model import SRNModel
from . import viz
from .features import EVAL_SEED, collate, render_semantic
from ..metrics import check_labels, confusion_matrix, majority_baseline
from ..metrics import segmentation_scores as scores
from .head import SemanticHead, SemanticInputError


@torch.no_grad()
def render_views(model: SRNModel, dataset, indices: Sequence[int], instance_map: Optional[torch.Tensor] = None,
                 num_classes: Optional[int] = None, batch_views: int = 4, chunk_rays: int = 8192,
                 seed: int = EVAL_SEED, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Render the views ``indices`` of ``dataset``: ``features [V, N, F]``, ``rgb [V, N, 3]``, ``depth [V, N, 1]``
    and the truth ``rgb_gt [V, N, 3]``, ``labels [V, N]`` (int64), ``instance_idx [V]`` (dataset's)."""
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in ("features", "rgb", "depth", "rgb_gt", "labels",
                                                          "instance_idx")}
    for b0 in tqdm(range(0, len(indices), batch_views), desc="render views", unit="batch", disable=not progress,
                   leave=False):
        samples = [dataset[i] for i in indices[b0:b0 + batch_views]]
        if "semantic" not in samples[0]:
            raise ValueError(f"{getattr(dataset, 'root', 'dataset')}: views have no part labels (semantic/ folder)")
        batch = collate(samples)
        B, N = batch["uv"].shape[:2]
        if num_classes is not None:
            check_labels(batch["semantic"], num_classes, (B, N), name="semantic labels of the dataset",
                         error=SemanticInputError)
        out["instance_idx"].append(batch["instance_idx"].clone())
        if instance_map is not None:
            batch["instance_idx"] = instance_map[batch["instance_idx"]]
        r = render_semantic(model, batch, None, chunk_rays=chunk_rays, seed=seed + b0)
        for k in ("features", "rgb", "depth"):
            out[k].append(r[k])
        out["rgb_gt"].append(batch["rgb"])
        out["labels"].append(batch["semantic"])
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def score_head(head: SemanticHead, views: Dict[str, torch.Tensor], class_names: Sequence[str],
               train_labels: Optional[torch.Tensor] = None) -> Dict:
    """Scores of ``head`` on rendered ``views`` (from :func:`render_views`); with ``train_labels`` also the
    majority-class baseline. Adds ``pred [V, N]`` to ``views``-sized output under key ``"pred"``."""
    C = head.num_classes
    pred = head.predict(views["features"].reshape(-1, views["features"].shape[-1])).reshape(views["labels"].shape)
    res = scores(confusion_matrix(pred, views["labels"], C), class_names)
    if train_labels is not None:
        base = majority_baseline(train_labels, views["labels"], C, class_names)
        res["majority_baseline"] = {k: base[k] for k in ("miou", "miou_parts", "pixel_accuracy", "majority_class")}
    res["pred"] = pred
    return res


def view_grid(views: Dict[str, torch.Tensor], preds: Dict[str, torch.Tensor], class_names: Sequence[str], S: int,
              rows: Sequence[int], upscale: int = 2) -> np.ndarray:
    """One row per view: RGB truth | RGB render | part truth | part prediction of each head (columns named by
    ``preds`` keys, in order), with a header row of column names and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    C = len(class_names)
    cols = ["rgb truth", "rgb render", "parts truth"] + [f"parts {k}" for k in preds]
    out_rows = []
    for v in rows:
        ims = [viz.rgb_image(views["rgb_gt"][v], S), viz.rgb_image(views["rgb"][v], S),
               viz.label_image(views["labels"][v], S, C)] + [viz.label_image(p[v], S, C) for p in preds.values()]
        out_rows.append(viz.hstack([viz.upscale(im, upscale) for im in ims], gap=3))
    body = viz.vstack(out_rows, gap=3)
    cell = S * upscale + 3
    header = Image.new("RGB", (body.shape[1], 14), "white")
    d = ImageDraw.Draw(header)
    for j, name in enumerate(cols):
        d.text((j * cell + 2, 1), name[: max(4, cell // 6)], fill="black", font=ImageFont.load_default())
    return viz.vstack([np.asarray(header), body, viz.legend_strip(class_names, body.shape[1])], gap=2)


@torch.no_grad()
def orbit_frames(model: SRNModel, head: SemanticHead, instance: int, poses: np.ndarray, K: torch.Tensor, S: int,
                 chunk_rays: int = 8192, upscale: int = 2, progress: bool = True) -> List[np.ndarray]:
    """RGB | part map frames of one training object (latent code ``instance``) along ``poses [F, 4, 4]``."""
    uv = geometry.uv_grid(S)[None]
    frames = []
    for f in tqdm(range(len(poses)), desc="orbit", unit="frame", disable=not progress, leave=False):
        batch = {"pose": torch.as_tensor(poses[f], dtype=torch.float32)[None], "intrinsics": K[None].float(),
                 "uv": uv, "instance_idx": torch.tensor([instance])}
        r = render_semantic(model, batch, head, chunk_rays=chunk_rays, seed=EVAL_SEED + f, keep_features=False)
        frames.append(viz.hstack([viz.upscale(viz.rgb_image(r["rgb"][0], S), upscale),
                                  viz.upscale(viz.label_image(r["pred"][0], S, head.num_classes), upscale)], gap=3))
    return frames


def orbit_poses(n: int, radius: float, elevation_deg: float = 30.0) -> np.ndarray:
    """``[n, 4, 4]`` cam2world poses circling the z axis (the generator's up) at ``radius``, looking at the origin."""
    out = []
    el = np.radians(elevation_deg)
    for k in range(n):
        az = 2 * np.pi * k / n
        eye = radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        out.append(geometry.look_at(eye))
    return np.stack(out).astype(np.float32)


def embedding_png(path: str, views: Dict[str, torch.Tensor], class_names: Sequence[str], method: str = "pca",
                  max_points: int = 4000, include_background: bool = False, seed: int = 0, title: str = "") -> Dict:
    """2-D embedding of surface features coloured by their true part (background rays left out unless
    ``include_background``), at most ``max_points`` points, the same number from each class where possible."""
    f = views["features"].reshape(-1, views["features"].shape[-1])
    lab = views["labels"].reshape(-1)
    keep = torch.ones_like(lab, dtype=torch.bool) if include_background else lab > 0
    f, lab = f[keep], lab[keep]
    if lab.numel() == 0:
        raise ValueError("no labelled surface rays to embed")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(lab).tolist()
    per = max(1, max_points // len(classes))
    sel = torch.cat([torch.nonzero(lab == c).squeeze(1)[torch.randperm(int((lab == c).sum()), generator=g)[:per]]
                     for c in classes])
    xy = viz.embed_2d(f[sel], method, seed=seed)
    viz.scatter_png(path, xy, lab[sel].numpy(), class_names, title or f"SRN surface features ({method.upper()}), "
                    f"coloured by part", seed=seed)
    return {"path": path, "method": method, "points": int(len(sel)), "classes": [class_names[c] for c in classes]}
