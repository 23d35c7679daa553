"""PSNR/SSIM with the reference's definitions, checked on cases computable by hand and against a plain loop."""
import math

import numpy as np
import pytest
import torch

from srn_fast.metrics import psnr, srn_psnr_ssim, ssim, to_unit_range

C1, C2 = 0.01 ** 2, 0.03 ** 2


def test_psnr_constant_offset_is_20db():
    gt = np.random.default_rng(0).uniform(0.2, 0.8, size=(8, 8, 3))
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    assert psnr(gt, gt) == float("inf")


def test_reference_mapping_clips_prediction_not_target():
    # pred 1.5 -> 1.25 -> clipped to 1; target 1.0 -> 1.0: identical after mapping
    p, g = to_unit_range(torch.full((16, 3), 1.5), torch.full((16, 3), 1.0))
    assert torch.all(p == 1.0) and torch.all(g == 1.0)
    # target 1.5 maps to 1.25 and is NOT clipped: pred 1 vs 1.25 -> MSE 1/16 -> 10 log10(16) dB
    pv, _ = srn_psnr_ssim(torch.full((64, 3), 1.0), torch.full((64, 3), 1.5))
    assert pv == pytest.approx(10 * math.log10(16), abs=1e-9)
    # flattened [S*S, 3] and [S, S, 3] give the same numbers
    x, y = torch.rand(8 * 8, 3) * 2 - 1, torch.rand(8 * 8, 3) * 2 - 1
    assert srn_psnr_ssim(x, y) == srn_psnr_ssim(x.reshape(8, 8, 3), y.reshape(8, 8, 3))


def test_ssim_identical_and_constant_images():
    x = np.random.default_rng(1).uniform(size=(12, 9, 3))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    a, b = 0.2, 0.6  # constant images: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    expect = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ssim(np.full((10, 10, 3), a), np.full((10, 10, 3), b)) == pytest.approx(expect, abs=1e-12)


def test_ssim_single_window_checkerboard_vs_inverse():
    # 7x7 image = exactly one window. x a 0/1 checkerboard (25 ones), y = 1 - x.
    x = (np.add.outer(np.arange(7), np.arange(7)) % 2 == 0).astype(float)
    y = 1.0 - x
    m = 25 / 49
    v = 49 / 48 * (m - m * m)  # sample variance (use_sample_covariance=True)
    expect = (2 * m * (1 - m) + C1) * (-2 * v + C2) / ((m * m + (1 - m) ** 2 + C1) * (2 * v + C2))
    assert ssim(x, y) == pytest.approx(expect, abs=1e-12)
    assert expect < -0.9  # anti-correlated images


def _ssim_loop(x, y):
    """skimage 0.15 compare_ssim(multichannel, data_range=1), written as an explicit loop over 7x7 windows."""
    H, W, C = x.shape
    vals = []
    for c in range(C):
        s = []
        for i in range(H - 6):
            for j in range(W - 6):
                a, b = x[i:i + 7, j:j + 7, c].ravel(), y[i:i + 7, j:j + 7, c].ravel()
                cov = np.cov(a, b, ddof=1)
                ua, ub = a.mean(), b.mean()
                s.append((2 * ua * ub + C1) * (2 * cov[0, 1] + C2) /
                         ((ua * ua + ub * ub + C1) * (cov[0, 0] + cov[1, 1] + C2)))
        vals.append(np.mean(s))
    return float(np.mean(vals))


def test_ssim_matches_window_loop_and_channel_mean():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(11, 13, 3))
    y = np.clip(x + rng.normal(scale=0.2, size=x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_ssim_loop(x, y), abs=1e-12)
    # mean over channels: one perfect channel and two noisy ones
    y2 = y.copy()
    y2[..., 0] = x[..., 0]
    per = [ssim(x[..., c], y2[..., c]) for c in range(3)]
    assert per[0] == pytest.approx(1.0) and ssim(x, y2) == pytest.approx(np.mean(per), abs=1e-12)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(np.zeros((5, 5, 3)), np.zeros((5, 5, 3)))
    with pytest.raises(ValueError, match="square"):
        srn_psnr_ssim(torch.zeros(10, 3), torch.zeros(10, 3))


def test_view_scores_and_their_means():
    from srn_fast.metrics import mean_scores, psnr_from_mse, view_scores

    assert psnr_from_mse(0.04) == pytest.approx(20.0)  # colours in [-1, 1]: data range 2
    gt = {"rgb": torch.zeros(3, 8, 8), "depth": torch.zeros(1, 8, 8)}  # no foreground: depth error NaN
    row = view_scores({"rgb": torch.full((3, 8, 8), 0.2), "depth": torch.ones(1, 8, 8)}, gt)
    assert row["psnr"] == pytest.approx(20.0) and math.isnan(row["depth_abs_error"])
    gt["depth"][0, 2:4, 2:4] = 2.0
    row2 = view_scores({"rgb": gt["rgb"], "depth": torch.full((1, 8, 8), 1.5)}, gt)
    assert row2["depth_abs_error"] == pytest.approx(0.5) and row2["psnr"] == math.inf
    assert "depth_abs_error" not in view_scores({"rgb": gt["rgb"]}, {"rgb": gt["rgb"]})
    m = mean_scores([dict(row, instance="a"), dict(row2, instance="a", psnr=30.0)])
    assert m["num_views"] == 2 and m["num_objects"] == 1
    assert m["psnr"] == pytest.approx(25.0) and m["depth_abs_error"] == pytest.approx(0.5)
