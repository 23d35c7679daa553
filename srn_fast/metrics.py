"""Every image score of srn_fast: PSNR and SSIM with the reference SRN evaluation's definitions, the depth error of
the baseline comparison, and the segmentation scores (mIoU, pixel accuracy) of Semantic SRN.

Colour scores. 
The reference scores a rendered view as follows: the prediction (colours in [-1, 1]) is mapped to [0, 1] and
clipped, the target is mapped to [0, 1] but *not* clipped; then

* PSNR = ``10 log10(1 / MSE)`` (scikit-image ``compare_psnr`` with ``data_range=1``);
* SSIM as scikit-image 0.15 ``compare_ssim(pred, target, multichannel=True, data_range=1)``: per channel, local
  means/variances/covariance over a 7x7 uniform window, variances and covariance scaled by the sample
  normalisation ``49 / 48`` (``use_sample_covariance=True``), ``C1 = (0.01 * 1)^2``, ``C2 = (0.03 * 1)^2``,
  the SSIM map averaged over the pixels whose window lies inside the image (a 3-pixel border is cropped), then
  the mean over channels.

The score of a test set is the mean of the per-image values over all test images (:func:`mean_scores`).
Everything is computed in float64 here (scikit-image converts to float64 too); no scikit-image dependency.

Depth: :func:`depth_abs_error`, the mean absolute error over the ground truth's foreground pixels.

Segmentation (background, label 0, IS a class): ``miou`` is the mean IoU over all classes 0..P that occur in the
ground truth or the prediction of the evaluated set (a class absent from both has no IoU and is left out);
``miou_parts`` is the same mean over the part classes 1..P only. ``pixel_accuracy`` counts every pixel, background
included; ``foreground_accuracy`` only pixels whose true label is a part.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_image(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().to("cpu", torch.float64)
    if t.dim() == 2:
        t = t[..., None]
    if t.dim() != 3:
        raise ValueError(f"{name} must be an image [H, W, C] (or [H, W]), got shape {tuple(t.shape)}")
    return t


def to_unit_range(pred: ArrayLike, gt: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's mapping of [-1, 1] colours: ``pred -> clip((pred + 1) / 2, 0, 1)``, ``gt -> (gt + 1) / 2``.

    Accepts images ``[H, W, C]`` or flattened square images ``[S*S, C]``; returns float64 ``[H, W, C]``.
    """
    def img(x, name):
        t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().to("cpu", torch.float64)
        if t.dim() == 2 and t.shape[-1] in (1, 3):  # flattened [S*S, C]
            S = int(round(t.shape[0] ** 0.5))
            if S * S != t.shape[0]:
                raise ValueError(f"{name}: a flattened image [N, C] needs N to be a square, got N={t.shape[0]}")
            t = t.reshape(S, S, t.shape[-1])
        return _as_image(t, name)

    p, g = img(pred, "pred"), img(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    return ((p + 1.0) / 2.0).clamp(0.0, 1.0), (g + 1.0) / 2.0


def psnr(pred: ArrayLike, gt: ArrayLike, data_range: float = 1.0) -> float:
    """PSNR in dB of two images already in [0, 1] (``[H, W, C]``): ``10 log10(data_range^2 / MSE)``.

    Identical images give ``inf``. Use :func:`srn_psnr_ssim` for [-1, 1] model colours.
    """
    p, g = _as_image(pred, "pred"), _as_image(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    mse = torch.mean((p - g) ** 2).item()
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def ssim(pred: ArrayLike, gt: ArrayLike, data_range: float = 1.0) -> float:
    """SSIM of two images ``[H, W, C]`` (or ``[H, W]``) as scikit-image 0.15 ``compare_ssim`` (multichannel).

    7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (``N / (N - 1)``, N = 49), mean of the SSIM map
    over the valid (border-cropped) region, then mean over channels. Both sides must be at least 7 pixels.
    """
    p, g = _as_image(pred, "pred"), _as_image(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    H, W = p.shape[:2]
    if H < SSIM_WIN or W < SSIM_WIN:
        raise ValueError(f"ssim needs images of at least {SSIM_WIN}x{SSIM_WIN} pixels, got {H}x{W}")
    x = p.permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = g.permute(2, 0, 1)[:, None]

    def box(t):  # the uniform filter, evaluated only where the window fits (= skimage's filter + crop)
        return F.avg_pool2d(t, SSIM_WIN, stride=1)

    n = SSIM_WIN * SSIM_WIN
    cov_norm = n / (n - 1.0)
    ux, uy = box(x), box(y)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_channel = s.mean(dim=(1, 2, 3))
    return float(per_channel.mean().item())


def srn_psnr_ssim(pred: ArrayLike, gt: ArrayLike) -> Tuple[float, float]:
    """(PSNR, SSIM) of one view with the reference's definitions; inputs are [-1, 1] colours, ``[H, W, 3]`` or
    flattened ``[S*S, 3]``."""
    p, g = to_unit_range(pred, gt)
    return psnr(p, g), ssim(p, g)


def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB of a mean squared error, ``10 log10(data_range^2 / mse)`` (default: colours in [-1, 1])."""
    return float(10.0 * np.log10(data_range ** 2 / max(float(mse), 1e-12)))


def image_scores(pred_rgb: torch.Tensor, gt_rgb: torch.Tensor) -> Dict[str, float]:
    """``{"psnr", "ssim"}`` (:func:`srn_psnr_ssim`) of channel-first images ``[3, S, S]`` in [-1, 1]."""
    p, s = srn_psnr_ssim(pred_rgb.permute(1, 2, 0), gt_rgb.permute(1, 2, 0))
    return {"psnr": float(p), "ssim": float(s)}


def depth_abs_error(pred_depth: torch.Tensor, gt_depth: torch.Tensor) -> float:
    """Mean absolute depth error over the ground truth's foreground pixels (gt depth > 0), in scene units.

    ``pred_depth`` and ``gt_depth`` hold the same pixels in any layout (``[1, S, S]``, ``[S*S, 1]``, ...).
    Returns NaN when the view has no foreground.
    """
    if pred_depth.numel() != gt_depth.numel():
        raise ValueError(f"pred_depth and gt_depth must hold the same number of pixels, got {list(pred_depth.shape)}"
                         f" and {list(gt_depth.shape)}")
    p, g = pred_depth.detach().reshape(-1).double().cpu(), gt_depth.detach().reshape(-1).double().cpu()
    fg = g > 0
    if not bool(fg.any()):
        return float("nan")
    return float((p[fg] - g[fg]).abs().mean())


def view_scores(pred: Dict[str, torch.Tensor], gt: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Scores of one predicted view against its truth, channel-first images: ``psnr`` and ``ssim`` of ``rgb
    [3, S, S]``, and ``depth_abs_error`` of ``depth [1, S, S]`` when the truth has depth."""
    row = image_scores(pred["rgb"], gt["rgb"])
    if "depth" in gt:
        row["depth_abs_error"] = depth_abs_error(pred["depth"], gt["depth"])
    return row


def mean_scores(rows: List[Dict], keys: Sequence[str] = ("psnr", "ssim", "depth_abs_error")) -> Dict:
    """``num_views``, ``num_objects`` (distinct ``instance`` values) and the mean of each score in ``keys`` over the
    rows that have it (NaNs, e.g. the depth error of a view without foreground, skipped; None when no row has it)."""
    out = {"num_views": len(rows), "num_objects": len({r["instance"] for r in rows})}
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] == r[k]]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


# ---------------------------------------------------------------------------------------------- segmentation
class LabelError(ValueError):
    """Part labels with the wrong type, dtype, shape or value range."""


def check_labels(labels: torch.Tensor, num_classes: int, shape: Optional[Sequence[int]] = None,
                 name: str = "labels", error: type = LabelError) -> None:
    """``labels`` int64 in ``[0, num_classes)`` (0 = background), of ``shape`` when given; else ``error`` (a
    :class:`LabelError` class: callers may name their own domain's, e.g. ``SemanticInputError``)."""
    if not isinstance(labels, torch.Tensor):
        raise error(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise error(f"{name} must be int64 part ids (0 = background), got {labels.dtype}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise error(f"{name} must have shape [{', '.join(str(s) for s in shape)}] (one label per ray), "
                    f"got [{', '.join(str(s) for s in labels.shape)}]")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise error(f"{name} must lie in [0, {num_classes - 1}] (0 = background, 1..{num_classes - 1}"
                        f" = parts), got values in [{lo}, {hi}]; is num_classes right?")


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class, of int64 ``pred`` and ``gt`` (same
    shape)."""
    if pred.shape != gt.shape:
        raise LabelError(f"pred and gt must have the same shape, got {list(pred.shape)} and {list(gt.shape)}")
    check_labels(pred, num_classes, name="pred")
    check_labels(gt, num_classes, name="gt")
    idx = gt.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict:
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
    return dict(segmentation_scores(confusion_matrix(torch.full_like(gt, major), gt, num_classes), class_names),
                majority_class=major)
