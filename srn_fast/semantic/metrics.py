"""Segmentation scores: confusion matrix, per-class IoU, mean IoU and pixel accuracy.

Convention (used everywhere in srn_fast.semantic): background (label 0) IS a class. ``miou`` is the mean IoU over
all classes 0..P that occur in the ground truth or the prediction of the evaluated set (a class absent from both
has no IoU and is left out); ``miou_parts`` is the same mean over the part classes 1..P only. ``pixel_accuracy``
counts every pixel, background included; ``foreground_accuracy`` only pixels whose true label is a part.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .head import SemanticInputError, check_labels


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class, of int64 ``pred`` and ``gt`` (same
    shape)."""
    if pred.shape != gt.shape:
        raise SemanticInputError(f"pred and gt must have the same shape, got {list(pred.shape)} and {list(gt.shape)}")
    check_labels(pred, num_classes, name="pred")
    check_labels(gt, num_classes, name="gt")
    idx = gt.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(conf: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict:
    """Scores of a confusion matrix (see the module docstring for the conventions)."""
    conf = conf.double()
    C = conf.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(C)]
    tp = conf.diag()
    gt_n, pred_n = conf.sum(1), conf.sum(0)
    union = gt_n + pred_n - tp
    iou = {}
    for c in range(C):
        iou[names[c]] = float(tp[c] / union[c]) if union[c] > 0 else None
    present = [v for v in iou.values() if v is not None]
    parts = [iou[names[c]] for c in range(1, C) if iou[names[c]] is not None]
    total = float(conf.sum())
    fg = float(gt_n[1:].sum())
    return {"miou": sum(present) / len(present) if present else float("nan"),
            "miou_parts": sum(parts) / len(parts) if parts else float("nan"),
            "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
            "foreground_accuracy": float(tp[1:].sum()) / fg if fg else float("nan"),
            "iou": iou, "pixels": int(total), "class_pixels": {names[c]: int(gt_n[c]) for c in range(C)}}


def majority_baseline(train_labels: torch.Tensor, gt: torch.Tensor, num_classes: int,
                      class_names: Optional[Sequence[str]] = None) -> Dict:
    """Scores of predicting the most frequent training class everywhere."""
    major = int(torch.bincount(train_labels.reshape(-1), minlength=num_classes).argmax())
    return dict(scores(confusion_matrix(torch.full_like(gt, major), gt, num_classes), class_names), majority_class=major)
