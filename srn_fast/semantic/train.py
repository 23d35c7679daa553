"""Training the semantic head on a frozen SRN (Semantic SRN's few-label protocol).

Every SRN parameter gets ``requires_grad = False``; the SRN renders each labelled view once under ``no_grad``
(:func:`srn_fast.semantic.features.extract_features`) and only the head is optimised, with cross-entropy, on the
cached (feature, label) pairs. Since the frozen SRN is a fixed function of the ray, this equals rendering every
step, at a fraction of the cost.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model import SRNModel
from .features import EVAL_SEED, extract_features
from ..metrics import check_labels
from .head import SemanticHead, SemanticInputError, check_features


def freeze(model: SRNModel) -> SRNModel:
    """``requires_grad = False`` on every parameter of ``model`` and eval mode; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes, bytes): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, hidden: Sequence[int] = (),
               steps: int = 1000, lr: float = 1e-2, batch_rays: int = 8192, weight_decay: float = 0.0,
               class_weights: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = True,
               history: Optional[List[Dict]] = None) -> SemanticHead:
    """Fit a :class:`SemanticHead` to ``features [M, F]`` and ``labels [M]`` (int64 in [0, C)) with
    cross-entropy, Adam and random mini-batches of ``batch_rays`` rays (seeded)."""
    if features.dim() != 2:
        raise SemanticInputError(f"features must have shape [M, F], got {list(features.shape)}")
    check_features(features, features.shape[1])
    check_labels(labels, num_classes, (features.shape[0],), error=SemanticInputError)
    if steps < 0 or batch_rays < 1:
        raise ValueError(f"steps must be >= 0 and batch_rays >= 1, got {steps}, {batch_rays}")
    torch.manual_seed(seed)
    head = SemanticHead(features.shape[1], num_classes, hidden)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    M = features.shape[0]
    features = features.float()
    for step in tqdm(range(steps), desc="semantic head", unit="step", disable=not progress, leave=False):
        sel = torch.randint(0, M, (min(batch_rays, M),), generator=g) if batch_rays < M else slice(None)
        logits = head(features[sel])
        loss = F.cross_entropy(logits, labels[sel], weight=class_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None and (step % 50 == 0 or step == steps - 1):
            with torch.no_grad():
                acc = float((logits.argmax(-1) == labels[sel]).float().mean())
            history.append({"step": step + 1, "loss": float(loss.detach()), "train_accuracy": acc})
    head.eval()
    return head


def fit_semantic_head(model: SRNModel, dataset, indices: Sequence[int], num_classes: int, hidden: Sequence[int] = (),
                      steps: int = 1000, lr: float = 1e-2, batch_rays: int = 8192, weight_decay: float = 0.0,
                      instance_map: Optional[torch.Tensor] = None, rays_per_view: Optional[int] = None,
                      seed: int = 0, chunk_rays: int = 8192, progress: bool = True,
                      cache: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[SemanticHead, Dict]:
    """Freeze ``model``, render the labelled views ``indices`` once (no grad) and train a head on them.

    ``cache``: the output of :func:`~srn_fast.semantic.features.extract_features` for a superset of ``indices``
    with an added ``"indices"`` list (so several K share one render); the rows of ``indices`` are taken from it.
    Returns ``(head, info)`` with ``info = {"history", "num_rays", "class_counts", "digest_before",
    "digest_after", "train_labels"}``; the two digests are equal (checked here: a changed SRN raises
    ``RuntimeError``).
    """
    freeze(model)
    before = parameter_digest(model)
    if cache is None:
        data = extract_features(model, dataset, indices, instance_map=instance_map, rays_per_view=rays_per_view,
                                chunk_rays=chunk_rays, seed=EVAL_SEED + seed, num_classes=num_classes,
                                progress=progress)
    else:
        pos = {int(i): p for p, i in enumerate(cache["indices"])}
        missing = [i for i in indices if int(i) not in pos]
        if missing:
            raise ValueError(f"cache lacks the features of dataset views {missing[:5]}")
        keep = torch.isin(cache["view"], torch.tensor([pos[int(i)] for i in indices]))
        data = {"features": cache["features"][keep], "labels": cache["labels"][keep]}
        check_labels(data["labels"], num_classes, name="semantic labels of the dataset",
                     error=SemanticInputError)
    history: List[Dict] = []
    head = train_head(data["features"], data["labels"], num_classes, hidden=hidden, steps=steps, lr=lr,
                      batch_rays=batch_rays, weight_decay=weight_decay, seed=seed, progress=progress, history=history)
    after = parameter_digest(model)
    if after != before:
        raise RuntimeError("the SRN's parameters changed during semantic-head training (they must stay frozen)")
    counts = torch.bincount(data["labels"], minlength=num_classes).tolist()
    return head, {"history": history, "num_rays": int(data["labels"].numel()), "class_counts": counts,
                  "digest_before": before, "digest_after": after, "train_labels": data["labels"]}
