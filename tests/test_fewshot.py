"""Few-shot reconstruction (srn_fast/fewshot.py, ``eval --few-shot``, ``reconstruct``): the fast protocol beats the
reference protocol at equal steps, objects are fitted independently (own code, own optimiser state), the fit is
reproducible and does not depend on its cap or chunking, and the commands write their files and refuse bad input."""
import json
import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import srn_fast
from srn_fast import checkpoint as ckpt_io
from srn_fast.cli import main
from srn_fast.data import SRNDataset
from srn_fast.evaluation import render_full
from srn_fast.fewshot import PROTOCOLS, PerObjectAdam, fit_latents

from op_utils import one_line_error


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


S = 8
MODEL = ["--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2", "--tracing-steps", "3"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A tiny SRN trained for 60 steps on the 2 training chairs (8 px)."""
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("fewshot") / "run")
    assert main(["train", "--data", tiny_data, "--out", out, "--sidelengths", str(S), "--batch-sizes", "4",
                 "--steps", "60", "--lr", "1e-3", "--rays-per-view", "32", "--val-every", "60", "--val-views", "2",
                 "--checkpoint-every", "60", "--no-progress", "--backend", "torch", *MODEL]) == 0
    return out


@pytest.fixture(scope="module")
def model(run):
    return ckpt_io.build_model(ckpt_io.load(run))   # fused kernels when built, else torch


def views(root, idcs, n=-1):
    return SRNDataset(root, sidelength=S, specific_observation_idcs=idcs, max_num_instances=n, with_depth=False,
                      with_semantic=False)


def image_loss(fitted, ds) -> float:
    """Mean squared colour error of full renders of ``ds``'s views with the fitted codes (a fixed seed)."""
    samples = [ds[i] for i in range(len(ds))]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("instance_idx", "pose", "intrinsics", "uv")}
    out = render_full(fitted, batch)
    return float(((out["rgb"] - torch.stack([s["rgb"] for s in samples])) ** 2).mean())


def test_fast_protocol_reaches_a_lower_fit_loss_than_the_reference_in_the_same_steps(model, tiny_data):
    ds = views(os.path.join(tiny_data, "unseen"), [1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fit_latents(model, ds, 40, "fast", progress=False)
    ref = fit_latents(model, ds, 40, "reference", progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())        # input model untouched
    for res in (fast, ref):
        sd = res.model.state_dict()
        assert res.codes.shape == (1, 8) and res.model.num_instances == 1
        assert all(torch.equal(sd[k], before[k]) for k in before if k != "latent_codes.weight")  # frozen
        assert len(res.history) == res.steps_taken[0] and res.loss_per_object.shape == (len(res.history), 1)
    assert ref.steps_taken == [40]
    lf, lr = image_loss(fast.model, ds), image_loss(ref.model, ds)
    assert lf < lr, (lf, lr)
    assert fast.history[-1]["loss"] < fast.history[0]["loss"]


# a plateau rule that stops an object at its first plateau (so that stopping happens within a few steps)
FAST_STOP = dict(lr=2e-2, patience=3, rel_tol=0.02, min_lr=1.5e-2)


def test_objects_are_fitted_independently(model, tiny_data):
    """Object 0 fitted alone gets the code it gets when fitted together with object 1 (own loss, own Adam state,
    own learning rate and stopping), and the fit does not depend on how views are chunked."""
    root = os.path.join(tiny_data, "train")
    both = fit_latents(model, views(root, [0, 3]), 30, progress=False, **FAST_STOP)
    alone = fit_latents(model, views(root, [0, 3], n=1), 30, progress=False, **FAST_STOP)
    chunked = fit_latents(model, views(root, [0, 3]), 30, progress=False, max_rays=S * S, **FAST_STOP)
    assert min(both.steps_taken) < 30  # the plateau rule stopped at least one object on its own
    assert alone.steps_taken[0] == both.steps_taken[0]
    torch.testing.assert_close(alone.codes[0], both.codes[0], atol=1e-5, rtol=1e-4)
    assert chunked.steps_taken == both.steps_taken
    torch.testing.assert_close(chunked.codes, both.codes, atol=1e-5, rtol=1e-4)


def test_snapshots_equal_fits_with_that_cap(model, tiny_data):
    ds = views(os.path.join(tiny_data, "unseen"), [0, 2])
    long = fit_latents(model, ds, 25, progress=False, snapshots=(0, 10, 25), rays_per_view=20, init="mean")
    short = fit_latents(model, ds, 10, progress=False, rays_per_view=20, init="mean")
    assert torch.equal(long.snapshots[10], short.codes)
    mean = model.latent_codes.weight.detach().mean(0)
    torch.testing.assert_close(long.snapshots[0][0], mean)
    assert torch.equal(long.snapshots[25], long.codes) and set(long.snapshot_seconds) == {0, 10, 25}
    assert not torch.equal(long.codes, short.codes)


def test_several_starts_keep_the_best(model, tiny_data):
    """starts=2: the two best candidate codes fitted side by side; start 0 is the single-start fit (the same init
    and draws; rounding may differ with the batch size), and the kept code is the start whose code renders the
    given views best."""
    ds = views(os.path.join(tiny_data, "unseen"), [1])
    one = fit_latents(model, ds, 12, progress=False, rays_per_view=20)
    two = fit_latents(model, ds, 12, progress=False, rays_per_view=20, starts=2)
    assert two.start_codes.shape == (1, 2, 8) and one.start_codes.shape == (1, 1, 8)
    torch.testing.assert_close(two.start_codes[0, 0], one.codes[0], atol=1e-5, rtol=1e-4)
    assert not torch.equal(two.start_codes[0, 0], two.start_codes[0, 1])
    k = int(two.chosen_start[0])
    assert torch.equal(two.codes[0], two.start_codes[0, k])
    losses = [image_loss(srn_fast.fewshot.with_codes(model, two.start_codes[:, j]), ds) for j in range(2)]
    assert losses[k] <= losses[1 - k] * 1.05, losses  # kept by its render of the given view (other depths here)
    with pytest.raises(ValueError, match="only 3 candidate codes"):
        fit_latents(model, ds, 2, starts=4)


def test_per_object_adam_is_adam_and_updates_only_its_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = a.clone().requires_grad_(True)
    mine, ref = PerObjectAdam(a, lr=0.1), torch.optim.Adam([b], lr=0.1)
    for _ in range(5):
        grad = torch.randn(3, 5, generator=g, dtype=torch.float64)
        mine.step(torch.arange(3), grad)
        b.grad = grad.clone()
        ref.step()
    torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-10)
    frozen = a[1].clone()
    mine.lr[2] = 0.01
    mine.step(torch.tensor([0, 2]), torch.ones(2, 5, dtype=torch.float64))
    assert torch.equal(a[1], frozen) and mine.t.tolist() == [6, 5, 6]


def test_fit_latents_rejects_bad_arguments(model, tiny_data):
    ds = views(os.path.join(tiny_data, "unseen"), [0])
    with pytest.raises(ValueError, match="protocol must be one of"):
        fit_latents(model, ds, 2, "quick")
    with pytest.raises(ValueError, match="unknown option"):
        fit_latents(model, ds, 2, batch_size=8)
    with pytest.raises(ValueError, match="init must be one of"):
        fit_latents(model, ds, 2, init="zeros")
    with pytest.raises(ValueError, match="whole views"):
        fit_latents(model, SRNDataset(os.path.join(tiny_data, "unseen"), sidelength=S, num_rays=5,
                                      with_depth=False, with_semantic=False), 2)
    single = srn_fast.SRNModel(1, fit_single_srn=True, phi_hidden=16, rendering_layers=2, tracing_steps=3)
    with pytest.raises(ValueError, match="no latent codes"):
        fit_latents(single, ds, 2)
    assert PROTOCOLS["reference"].lr == 5e-5 and PROTOCOLS["reference"].init == "random"


def test_eval_few_shot_reports_steps_time_and_plots_the_fit_loss(run, tiny_data, tmp_path, capsys):
    out = str(tmp_path / "fs")
    assert main(["eval", "--checkpoint", run, "--data", tiny_data, "--out", out, "--few-shot", "--observations",
                 "1", "--fit-steps", "15", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "few-shot: PSNR" in text and "s per object" in text
    rep = json.loads(Path(os.path.join(out, "report.json")).read_text())
    assert rep["fit"]["protocol"] == "fast" and rep["fit"]["objects"] == 1 and rep["num_images"] == 3
    assert 1 <= rep["fit"]["steps_taken"][0] <= 15 and rep["fit"]["seconds_per_object"] > 0
    assert rep["fit_per_object"][0]["num_images"] == 3 and len(rep["fit_history"]) == rep["fit"]["steps_taken"][0]
    assert imageio.imread(rep["fit_loss_plot"]).shape[2] == 3 and os.path.isfile(os.path.join(out, "grid.png"))
    out2 = str(tmp_path / "ref")
    assert main(["eval", "--checkpoint", run, "--data", tiny_data, "--out", out2, "--few-shot", "--observations",
                 "1,2", "--protocol", "reference", "--fit-steps", "3", "--no-progress"]) == 0
    rep = json.loads(Path(os.path.join(out2, "report.json")).read_text())
    assert rep["fit"]["config"]["lr"] == 5e-5 and rep["fit"]["steps_taken"] == [3] and rep["num_images"] == 2


def test_reconstruct_writes_orbit_and_code(run, tiny_data, tmp_path, capsys):
    obj = os.path.join(tiny_data, "unseen", sorted(os.listdir(os.path.join(tiny_data, "unseen")))[0])
    out = str(tmp_path / "rec")
    argv = ["reconstruct", "--checkpoint", run, "--image", os.path.join(obj, "rgb", "000000.png"), "--pose",
            os.path.join(obj, "pose", "000000.txt"), "--intrinsics", os.path.join(obj, "intrinsics.txt"),
            "--image", os.path.join(obj, "rgb", "000002.png"), "--pose", os.path.join(obj, "pose", "000002.txt"),
            "--out", out, "--frames", "3", "--fit-steps", "10", "--no-progress"]
    assert main(argv) == 0
    assert "orbit.gif" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["code.pt", "fit_loss.png", "frames", "orbit.gif", "report.json", "views.png"]
    assert len(imageio.mimread(os.path.join(out, "orbit.gif"))) == 3
    saved = torch.load(os.path.join(out, "code.pt"))
    assert saved["code"].shape == (8,) and saved["fit"]["objects"] == 1
    views_png = imageio.imread(os.path.join(out, "views.png"))
    assert views_png.shape[0] > views_png.shape[1] / 2  # two rows: given view | render
    rep = json.loads(Path(os.path.join(out, "report.json")).read_text())
    assert rep["fit"]["steps_taken"][0] <= 10 and len(rep["images"]) == 2
    # without --intrinsics: the training camera stored in the checkpoint (square images)
    assert main(argv[:7] + ["--out", str(tmp_path / "rec2"), "--frames", "2", "--fit-steps", "2",
                            "--no-progress"]) == 0


def test_reconstruct_refuses_bad_inputs(run, tiny_data, tmp_path, capsys):
    obj = os.path.join(tiny_data, "unseen", sorted(os.listdir(os.path.join(tiny_data, "unseen")))[0])
    img, pose, K = (os.path.join(obj, "rgb", "000000.png"), os.path.join(obj, "pose", "000000.txt"),
                    os.path.join(obj, "intrinsics.txt"))
    out = str(tmp_path / "o")
    base = ["reconstruct", "--checkpoint", run, "--out", out, "--fit-steps", "1", "--no-progress"]
    # an image whose size does not match the intrinsics (16 px data; a 12 x 16 crop)
    small = str(tmp_path / "small.png")
    imageio.imwrite(small, imageio.imread(img)[:12])
    one_line_error(capsys, base + ["--image", small, "--pose", pose, "--intrinsics", K], "16x12", "16x16")
    # a pose that is not a rigid transform: scaled rotation, or a wrong last row
    P = np.loadtxt(pose).reshape(4, 4)
    scaled = str(tmp_path / "scaled.txt")
    np.savetxt(scaled, np.diag([2.0, 2.0, 2.0, 1.0]) @ P)
    one_line_error(capsys, base + ["--image", img, "--pose", scaled, "--intrinsics", K], "not a rigid transform",
                   "a scale")
    row = str(tmp_path / "row.txt")
    np.savetxt(row, np.vstack([P[:3], [0.0, 0.0, 1.0, 1.0]]))
    one_line_error(capsys, base + ["--image", img, "--pose", row], "not a rigid transform", "last row 0 0 1 1")
    # a checkpoint without latent codes (a single SRN)
    single = srn_fast.SRNModel(1, fit_single_srn=True, phi_hidden=16, rendering_layers=2, tracing_steps=3)
    ck = str(tmp_path / "single.pth")
    ckpt_io.save(ck, single)
    one_line_error(capsys, ["reconstruct", "--checkpoint", ck, "--image", img, "--pose", pose, "--intrinsics", K,
                            "--out", out], "no latent codes")
    # one pose per image
    one_line_error(capsys, base + ["--image", img, "--image", img, "--pose", pose], "one --pose per --image")
    # without --intrinsics a non-square image cannot use the training camera
    one_line_error(capsys, base + ["--image", small, "--pose", pose], "must be square")
    assert not os.path.exists(out)  # nothing written for refused input
