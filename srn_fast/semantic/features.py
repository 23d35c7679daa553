"""Surface features of a frozen SRN: which labelled views to use (and their class names), and rendering them once,
without gradients.

The feature of a ray is phi evaluated at the point the ray marcher stops at, ``SRNModel.render(...)["features"]``,
exactly what the pixel generator reads; one march per ray gives colour, depth, feature and (with a head) the part
logits, so the semantic map costs no second march.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from ..data import DataError, load_meta
from ..metrics import check_labels
from ..model import SRNModel
from .head import SemanticHead, SemanticInputError

EVAL_SEED = 1234  # seed of the initial marching depths of feature renders (reproducible features and scores)


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack dataset samples into the batch dict SRNModel takes."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def initial_depth(B: int, N: int, seed: int) -> torch.Tensor:
    """``[B, N, 1]`` the reference's initial depths N(0.05, 5e-4), from a seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.empty(B, N, 1).normal_(mean=0.05, std=5e-4, generator=g)


def class_names_for(data: str, labels_max: Optional[int] = None) -> List[str]:
    """Class names of labelled data: "background" then the part names of the generator's ``meta.json`` (in ``data``
    or its parent folder); without one, ``part_1..part_P`` for ``labels_max`` = P, else :class:`SemanticInputError`."""
    try:
        names = list(load_meta(data).get("part_names") or [])
    except DataError:
        names = []
    if names:  # the generator lists the parts 1..P; class 0 is the background
        return names if names[0] == "background" else ["background"] + names
    if labels_max is None:
        raise SemanticInputError(f"{data}: no meta.json with part_names; cannot tell the number of classes")
    return ["background"] + [f"part_{c}" for c in range(1, labels_max + 1)]


def select_views(dataset, k: Union[int, str, None], seed: int = 0) -> List[int]:
    """Dataset indices of ``k`` labelled views spread across objects, deterministic for a seed.

    Views are taken round robin over the instances (in a seeded order), each instance's views in a seeded random
    order, so K = 30 over 3 objects is 10 views of each. ``k`` = None, "all" or >= len(dataset) takes every view.
    Returned sorted.
    """
    n = len(dataset)
    if k is None or (isinstance(k, str) and k.lower() == "all"):
        return list(range(n))
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"number of labelled views must be a positive integer or 'all', got {k!r}") from None
    if k < 1:
        raise ValueError(f"number of labelled views must be >= 1, got {k}")
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    per_inst: Dict[int, List[int]] = {}
    for idx, (i, _v) in enumerate(dataset.index):
        per_inst.setdefault(i, []).append(idx)
    order = [int(i) for i in rng.permutation(sorted(per_inst))]
    queues = {i: [per_inst[i][j] for j in rng.permutation(len(per_inst[i]))] for i in order}
    out: List[int] = []
    r = 0
    while len(out) < k:
        for i in order:
            if r < len(queues[i]) and len(out) < k:
                out.append(queues[i][r])
        r += 1
    return sorted(out)


def map_instances(data_names: Sequence[str], model_names: Optional[Sequence[str]], num_model: int,
                  where: str = "data") -> torch.Tensor:
    """``[len(data_names)]`` latent-code index of each data instance, matched by instance name.

    Without stored names (a reference checkpoint) the data instances must be the model's, in the same order.
    """
    if model_names is None:
        if len(data_names) > num_model:
            raise SemanticInputError(f"{where}: {len(data_names)} instances but the model has only {num_model} latent "
                                     f"codes (and the checkpoint stores no instance names to match them)")
        return torch.arange(len(data_names))
    pos = {n: j for j, n in enumerate(model_names)}
    missing = [n for n in data_names if n not in pos]
    if missing:
        raise SemanticInputError(f"{where}: instance(s) {missing[:3]} are not among the model's training objects "
                                 f"(held-out views must be of the training objects, with the same folder names)")
    return torch.tensor([pos[n] for n in data_names], dtype=torch.int64)


def render_semantic(model: SRNModel, batch: Dict[str, torch.Tensor], head: Optional[SemanticHead] = None,
                    chunk_rays: int = 8192, seed: int = EVAL_SEED, keep_features: bool = True) -> Dict[str, torch.Tensor]:
    """Render every ray of ``batch`` (``uv [B, N, 2]``) in chunks, without gradients, with one march per ray.

    Returns CPU float32 ``rgb [B, N, 3]``, ``depth [B, N, 1]``, ``features [B, N, F]`` (if ``keep_features``) and,
    with a head, ``logits [B, N, C]`` and ``pred [B, N]`` (int64 class ids).
    """
    was_training = model.training
    model.eval()
    B, N = batch["uv"].shape[:2]
    d0 = initial_depth(B, N, seed)
    device = next(model.parameters()).device
    inp = {k: v.to(device) for k, v in batch.items() if k in ("instance_idx", "pose", "intrinsics", "z")}
    acc: Dict[str, List[torch.Tensor]] = {"rgb": [], "depth": [], "features": [], "logits": []}
    try:
        with torch.no_grad():
            for s in range(0, N, chunk_rays):
                out = model.render(dict(inp, uv=batch["uv"][:, s:s + chunk_rays].to(device)),
                                   initial_depth=d0[:, s:s + chunk_rays].to(device))
                acc["rgb"].append(out["rgb"].float().cpu())
                acc["depth"].append(out["depth"].float().cpu())
                if keep_features:
                    acc["features"].append(out["features"].float().cpu())
                if head is not None:
                    acc["logits"].append(head(out["features"].to(next(head.parameters()).device)).float().cpu())
    finally:
        model.train(was_training)
    res = {k: torch.cat(v, 1) for k, v in acc.items() if v}
    if "logits" in res:
        res["pred"] = res["logits"].argmax(-1)
    return res


def extract_features(model: SRNModel, dataset, indices: Sequence[int], instance_map: Optional[torch.Tensor] = None,
                     rays_per_view: Optional[int] = None, batch_views: int = 4, chunk_rays: int = 8192,
                     seed: int = EVAL_SEED, num_classes: Optional[int] = None, progress: bool = True
                     ) -> Dict[str, torch.Tensor]:
    """Surface features and labels of the views ``indices`` of ``dataset`` (which must carry ``semantic``).

    ``instance_map`` maps the dataset's instance index to the model's latent code (see :func:`map_instances`).
    ``rays_per_view``: keep a seeded random subset of each view's rays (all by default). Returns CPU tensors
    ``features [M, F]``, ``labels [M]`` (int64), ``view [M]`` (position in ``indices``) with M = rays kept.
    """
    if len(indices) == 0:
        raise ValueError("extract_features: no views selected")
    feats, labels, views = [], [], []
    g = torch.Generator().manual_seed(int(seed) + 1)
    bar = tqdm(total=len(indices), desc="features", unit="view", disable=not progress, leave=False)
    for b0 in range(0, len(indices), batch_views):
        ids = list(indices[b0:b0 + batch_views])
        samples = [dataset[i] for i in ids]
        if "semantic" not in samples[0]:
            raise SemanticInputError(f"{getattr(dataset, 'root', 'dataset')}: views have no part labels (expected a "
                                     f"semantic/ folder per instance, e.g. from `make-data`)")
        batch = collate(samples)
        B, N = batch["uv"].shape[:2]
        if num_classes is not None:
            check_labels(batch["semantic"], num_classes, (B, N), name="semantic labels of the dataset",
                         error=SemanticInputError)
        if instance_map is not None:
            batch["instance_idx"] = instance_map[batch["instance_idx"]]
        out = render_semantic(model, batch, None, chunk_rays=chunk_rays, seed=seed + b0)
        for j in range(B):
            f, lab = out["features"][j], batch["semantic"][j]
            if rays_per_view is not None and rays_per_view < N:
                sel = torch.randperm(N, generator=g)[:rays_per_view]
                f, lab = f[sel], lab[sel]
            feats.append(f)
            labels.append(lab)
            views.append(torch.full((len(lab),), b0 + j, dtype=torch.int64))
        bar.update(B)
    bar.close()
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "view": torch.cat(views)}
