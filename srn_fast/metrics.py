"""Image metrics with the reference SRN evaluation's definitions.

The reference scores a rendered view as follows: the prediction (colours in [-1, 1]) is mapped to [0, 1] and
clipped, the target is mapped to [0, 1] but *not* clipped; then

* PSNR = ``10 log10(1 / MSE)`` (scikit-image ``compare_psnr`` with ``data_range=1``);
* SSIM as scikit-image 0.15 ``compare_ssim(pred, target, multichannel=True, data_range=1)``: per channel, local
  means/variances/covariance over a 7x7 uniform window, variances and covariance scaled by the sample
  normalisation ``49 / 48`` (``use_sample_covariance=True``), ``C1 = (0.01 * 1)^2``, ``C2 = (0.03 * 1)^2``,
  the SSIM map averaged over the pixels whose window lies inside the image (a 3-pixel border is cropped), then
  the mean over channels.

The score of a test set is the mean of the per-image values over all test images. Everything is computed in
float64 here (scikit-image converts to float64 too); no scikit-image dependency.
"""
from __future__ import annotations

from typing import Tuple, Union

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
