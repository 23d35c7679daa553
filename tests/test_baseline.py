"""The encoder-decoder baseline (Tatarchenko et al. 2016): shapes, loss, pairs, training, checkpoints, CLI."""
import json
import os

import pytest
import torch

from srn_fast.baseline import (PairDataset, locate, TatarchenkoNet, baseline_loss, depth_abs_error, eval_pairs, load_checkpoint,
                               save_checkpoint, to_flat, to_image, train, viewpoint_vector)
from srn_fast.cli import main as cli_main
from srn_fast.data import SRNDataset

from _spheres import write_sphere_root
from op_utils import one_line_error

TINY = dict(width=4, code_dim=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    root = tmp_path_factory.mktemp("spheres")
    write_sphere_root(str(root / "train"), n_objects=3, n_views=5, size=16, seed=0)
    write_sphere_root(str(root / "unseen"), n_objects=2, n_views=4, size=16, seed=1)
    return root


def _poses(B, gen):
    q, _ = torch.linalg.qr(torch.randn(B, 3, 3, generator=gen))
    P = torch.eye(4).repeat(B, 1, 1)
    P[:, :3, :3] = q
    P[:, :3, 3] = torch.randn(B, 3, generator=gen)
    return P


@pytest.mark.parametrize("S", [8, 16, 32])
@pytest.mark.parametrize("pose_mode", ["both", "target", "relative"])
def test_output_shapes_and_range(S, pose_mode, rng):
    net = TatarchenkoNet(S, pose_mode=pose_mode, **TINY)
    img = torch.rand(3, 3, S, S, generator=rng) * 2 - 1
    out = net(img, _poses(3, rng), _poses(3, rng))
    assert out["rgb"].shape == (3, 3, S, S) and out["depth"].shape == (3, 1, S, S)
    assert out["rgb"].abs().max() <= 1.0
    # the prediction depends on the target viewpoint and on the image
    other = net(img, _poses(3, rng), _poses(3, rng))["rgb"]
    assert not torch.allclose(out["rgb"], other)
    assert not torch.allclose(out["rgb"], net(-img, _poses(3, rng), _poses(3, rng))["rgb"])


def test_viewpoint_vector(rng):
    a, b = _poses(2, rng), _poses(2, rng)
    assert viewpoint_vector(a, b, "both").shape == (2, 24)
    assert torch.equal(viewpoint_vector(a, b, "target"), b[:, :3].reshape(2, 12))
    rel = viewpoint_vector(a, b, "relative").reshape(2, 3, 4)
    torch.testing.assert_close((a @ torch.cat([rel, b[:, 3:]], 1)), b, atol=1e-5, rtol=1e-5)
    eye = torch.eye(4).expand(2, 4, 4)
    torch.testing.assert_close(viewpoint_vector(eye, b, "relative"), b[:, :3].reshape(2, 12))


def test_bad_arguments_are_named(rng):
    with pytest.raises(ValueError, match="sidelength"):
        TatarchenkoNet(24)
    with pytest.raises(ValueError, match="pose_mode"):
        TatarchenkoNet(16, pose_mode="euler")
    net = TatarchenkoNet(16, **TINY)
    with pytest.raises(ValueError, match=r"image must have shape \[B, 3, 16, 16\]"):
        net(torch.zeros(1, 3, 32, 32), torch.eye(4)[None], torch.eye(4)[None])
    with pytest.raises(ValueError, match="target_pose must have shape"):
        net(torch.zeros(1, 3, 16, 16), torch.eye(4)[None], torch.eye(3)[None])


def test_loss_depth_only_on_foreground(rng):
    pred = {"rgb": torch.rand(2, 3, 8, 8, generator=rng), "depth": torch.rand(2, 1, 8, 8, generator=rng)}
    trgt = torch.rand(2, 3, 8, 8, generator=rng)
    gt_d = torch.rand(2, 1, 8, 8, generator=rng) + 1
    gt_d[:, :, :4] = 0  # background
    out = baseline_loss(pred, trgt, gt_d, depth_weight=0.5)
    fg = gt_d > 0
    want_d = ((pred["depth"] - gt_d)[fg] ** 2).mean()
    torch.testing.assert_close(out["depth"], want_d)
    torch.testing.assert_close(out["rgb"], ((pred["rgb"] - trgt) ** 2).mean())
    torch.testing.assert_close(out["total"], out["rgb"] + 0.5 * want_d)
    # background depth predictions do not matter
    pred2 = {"rgb": pred["rgb"], "depth": torch.where(fg, pred["depth"], torch.full_like(pred["depth"], 99.0))}
    torch.testing.assert_close(baseline_loss(pred2, trgt, gt_d)["depth"], want_d)
    assert float(baseline_loss(pred, trgt, None)["depth"]) == 0.0
    assert depth_abs_error(gt_d + 0.25, gt_d) == pytest.approx(0.25)
    assert depth_abs_error(gt_d, torch.zeros_like(gt_d)) != depth_abs_error(gt_d, torch.zeros_like(gt_d))  # NaN


def test_image_layout_roundtrip(spheres):
    ds = SRNDataset(str(spheres / "train"), sidelength=16)
    s = ds[1]
    img = to_image(s["rgb"], 16)
    assert img.shape == (3, 16, 16)
    r, c = 5, 11
    assert torch.equal(img[:, r, c], s["rgb"][r * 16 + c])  # row-major, (row, column)
    assert torch.equal(to_flat(img), s["rgb"])


def test_pairs_are_two_views_of_one_object(spheres):
    ds = SRNDataset(str(spheres / "train"), sidelength=16)
    pairs = PairDataset(ds, seed=0)
    assert len(pairs) == 15
    for k in range(len(pairs)):
        p = pairs[k]
        i, v = locate(ds, k)
        assert int(p["instance_idx"]) == i
        assert torch.equal(p["input_rgb"], to_image(ds[k]["rgb"], 16))
        assert not torch.equal(p["input_pose"], p["target_pose"])
        assert p["target_depth"].shape == (1, 16, 16)
        assert any(torch.equal(p["target_pose"], ds[j]["pose"]) for j in range(len(ds)) if locate(ds, j)[0] == i)
    one = SRNDataset(str(spheres / "train"), sidelength=16, max_observations=1)
    with pytest.raises(ValueError, match="at least 2 views"):
        PairDataset(one)
    assert eval_pairs(ds, input_view=2, max_targets=2) == [(i, 2, [0, 3]) for i in range(3)]


def test_training_reduces_loss_and_checkpoints(spheres, tmp_path):
    torch.manual_seed(0)
    rep = train(str(spheres / "train"), str(tmp_path / "run"), sidelength=16, steps=80, batch_size=8, lr=2e-3,
                log_every=10, checkpoint_every=50, progress=False, **TINY)
    h = rep["history"]
    assert rep["step"] == 80 and len(h) == 8
    first, last = sum(e["total"] for e in h[:2]) / 2, sum(e["total"] for e in h[-2:]) / 2
    assert last < 0.5 * first, (first, last)
    assert h[-1]["depth"] < h[0]["depth"] and h[-1]["rgb"] < h[0]["rgb"]
    with open(tmp_path / "run" / "train_report.json") as fh:
        assert json.load(fh)["step"] == 80
    model, ckpt = load_checkpoint(str(tmp_path / "run"))
    assert ckpt["step"] == 80 and model.config["width"] == 4
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    # resume continues from the saved step
    rep2 = train(str(spheres / "train"), str(tmp_path / "run"), sidelength=16, steps=90, batch_size=8, lr=2e-3,
                 log_every=10, progress=False, resume=True, **TINY)
    assert rep2["step"] == 90 and len(rep2["history"]) == 9
    assert rep2["seconds"] > rep["seconds"] and rep2["seconds_this_run"] < rep2["seconds"]  # time accumulates


def test_checkpoint_roundtrip_and_errors(tmp_path, rng):
    net = TatarchenkoNet(16, pose_mode="relative", **TINY)
    path = str(tmp_path / "b.pt")
    save_checkpoint(path, net, step=3)
    net2, ck = load_checkpoint(path)
    x, P, Q = torch.rand(2, 3, 16, 16, generator=rng), _poses(2, rng), _poses(2, rng)
    torch.testing.assert_close(net2(x, P, Q)["rgb"], net(x, P, Q)["rgb"])
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a baseline checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot read"):
        load_checkpoint(str(tmp_path / "junk.pt"))


def test_cli_train_and_bad_input(spheres, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = cli_main(["baseline-train", "--data", str(spheres / "train"), "--out", out, "--sidelength", "16",
                   "--steps", "6", "--batch-size", "4", "--width", "4", "--code-dim", "16", "--no-progress"])
    assert rc == 0 and os.path.isfile(os.path.join(out, "baseline.pt"))
    assert "trained 6 steps" in capsys.readouterr().out
    for argv, msg in [
        (["baseline-train", "--data", str(tmp_path / "nope"), "--out", out], "--data"),
        (["baseline-train", "--data", str(spheres / "train"), "--out", out, "--sidelength", "48"], "power of two"),
        (["baseline-eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(spheres / "unseen")],
         "missing.pt"),
    ]:
        one_line_error(capsys, argv, msg)
