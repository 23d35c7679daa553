"""Semantic SRN: head, view choice, metrics, frozen training on a tiny generated set, joint training, CLI."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from srn_fast import checkpoint as ckpt_io
from srn_fast.cli import main as cli_main
from srn_fast.data import SRNDataset, generate
from srn_fast.model import SRNModel
from srn_fast.semantic import (LabelError, SemanticHead, SemanticInputError, check_labels, confusion_matrix, extract_features,
                               fit_semantic_head, load_head, majority_baseline, map_instances, parameter_digest,
                               save_head, scores, select_views, train_head)
from srn_fast.cli.semantic_train import k_list
from srn_fast.semantic.joint import SemanticLoss
from srn_fast.training import TrainConfig, prepare_batch, train

S = 12
NUM_CLASSES = 5  # chairs: background, seat, back, legs, arms


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sem") / "chairs"
    generate("chairs", instances=2, views=4, size=S, seed=3, out=str(root), test_views=2, unseen_instances=0,
             progress=False)
    return str(root)


def tiny_model(n=2, backend="auto"):
    torch.manual_seed(0)
    return SRNModel(n, latent_dim=8, tracing_steps=2, phi_hidden=16, rendering_layers=1, lstm_hidden=4,
                    backend=backend)


# ---------------------------------------------------------------------------------------------------------------
def test_head_beats_majority_on_held_out_synthetic_features():
    g = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(4, 16, generator=g)

    def draw(n):
        lab = torch.multinomial(torch.tensor([0.7, 0.15, 0.1, 0.05]), n, replacement=True, generator=g)
        return centres[lab] + torch.randn(n, 16, generator=g), lab

    f_tr, l_tr = draw(3000)
    f_te, l_te = draw(3000)
    hist = []
    head = train_head(f_tr, l_tr, 4, steps=150, lr=3e-2, batch_rays=1024, progress=False, history=hist)
    s = scores(confusion_matrix(head.predict(f_te), l_te, 4))
    base = majority_baseline(l_tr, l_te, 4)
    assert base["majority_class"] == 0
    assert s["pixel_accuracy"] > base["pixel_accuracy"] + 0.2
    assert s["miou"] > 0.8 > base["miou"] + 0.5
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    # the MLP option trains too
    mlp = train_head(f_tr, l_tr, 4, hidden=[32], steps=150, lr=1e-2, batch_rays=1024, progress=False)
    assert mlp.kind == "mlp" and scores(confusion_matrix(mlp.predict(f_te), l_te, 4))["miou"] > 0.8


def test_head_shapes_and_clear_errors(tmp_path):
    head = SemanticHead(16, NUM_CLASSES)
    assert head.kind == "linear" and head(torch.randn(2, 7, 16)).shape == (2, 7, NUM_CLASSES)
    assert head.predict(torch.randn(3, 16)).dtype == torch.int64
    with pytest.raises(SemanticInputError, match=r"features must have shape \[\.\.\., 16\].*\[2, 7, 15\]"):
        head(torch.randn(2, 7, 15))
    with pytest.raises(SemanticInputError, match="floating point"):
        head(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(LabelError, match="int64"):
        check_labels(torch.zeros(4), NUM_CLASSES)
    with pytest.raises(LabelError, match=r"must lie in \[0, 4\].*\[0, 5\]"):
        check_labels(torch.tensor([0, 5]), NUM_CLASSES)
    with pytest.raises(LabelError, match=r"\[-1, 2\]"):
        check_labels(torch.tensor([-1, 2]), NUM_CLASSES)
    with pytest.raises(SemanticInputError, match=r"shape \[3\]"):
        train_head(torch.randn(3, 16), torch.zeros(4, dtype=torch.int64), NUM_CLASSES, steps=1, progress=False)
    with pytest.raises(LabelError, match="same shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SemanticHead(16, 1)
    # head files: round trip, and a clear error for a file that is not one
    path = save_head(str(tmp_path / "h.pth"), head, {"k": 3})
    h2, extra = load_head(path)
    assert extra == {"k": 3} and torch.equal(h2.net[0].weight, head.net[0].weight)
    torch.save({"model": {}}, tmp_path / "srn.pth")
    with pytest.raises(SemanticInputError, match="not a semantic head file"):
        load_head(str(tmp_path / "srn.pth"))
    with pytest.raises(FileNotFoundError):
        load_head(str(tmp_path / "missing.pth"))


def test_metrics_known_values():
    gt = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    s = scores(confusion_matrix(pred, gt, 4), ["bg", "a", "b", "c"])
    assert s["iou"] == {"bg": 2 / 3, "a": 1 / 3, "b": 1 / 2, "c": None}  # c absent from truth and prediction
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert s["miou_parts"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6) and s["foreground_accuracy"] == pytest.approx(2 / 3)


class _FakeDS:
    def __init__(self, views):
        self.index = [(i, v) for i, n in enumerate(views) for v in range(n)]

    def __len__(self):
        return len(self.index)


def test_select_views_spreads_across_objects_deterministically():
    ds = _FakeDS([40, 40, 40])
    a, b = select_views(ds, 30, seed=0), select_views(ds, 30, seed=0)
    assert a == b and len(set(a)) == 30 and select_views(ds, 30, seed=1) != a
    per = [sum(ds.index[i][0] == k for i in a) for k in range(3)]
    assert per == [10, 10, 10]
    per10 = sorted(sum(ds.index[i][0] == k for i in select_views(ds, 10, seed=0)) for k in range(3))
    assert per10 == [3, 3, 4]
    assert select_views(ds, "all") == list(range(120)) == select_views(ds, 500)
    uneven = _FakeDS([2, 9])
    assert len(select_views(uneven, 6)) == 6
    for bad in (0, "x", -3):
        with pytest.raises(ValueError, match="labelled views"):
            select_views(ds, bad)
    assert k_list("all,30, 10") == ["all", 30, 10]
    with pytest.raises(ValueError, match="--views"):
        k_list("all,zero")


# ---------------------------------------------------------------------------------------------------------------
def test_frozen_training_keeps_srn_bit_identical(tiny):
    ds = SRNDataset(os.path.join(tiny, "train"), sidelength=S)
    model = tiny_model()
    for p in model.parameters():
        assert p.requires_grad
    before = parameter_digest(model)
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    idx = select_views(ds, 4, seed=0)
    head, info = fit_semantic_head(model, ds, idx, NUM_CLASSES, steps=40, lr=3e-2, batch_rays=64, seed=0,
                                   progress=False)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert parameter_digest(model) == before == info["digest_after"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, copies[k]), k
    assert info["num_rays"] == 4 * S * S and sum(info["class_counts"]) == 4 * S * S
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]  # the head did train
    # features: one per ray, phi's width; labels from the data
    data = extract_features(model, ds, idx, num_classes=NUM_CLASSES, progress=False)
    assert data["features"].shape == (4 * S * S, 16) and data["labels"].dtype == torch.int64
    assert int(data["labels"].max()) < NUM_CLASSES and int(data["labels"].min()) == 0
    # the labels of the generated chairs do not fit a 3-class head: a clear error
    with pytest.raises(SemanticInputError, match="semantic labels of the dataset must lie in"):
        fit_semantic_head(model, ds, idx, 3, steps=1, progress=False)
    # held-out views: instances matched by name, unknown names refused
    test = SRNDataset(os.path.join(tiny, "test"), sidelength=S)
    assert map_instances(test.instance_names, ds.instance_names, 2).tolist() == [0, 1]
    with pytest.raises(SemanticInputError, match="not among the model's training objects"):
        map_instances(["chair_9999"], ds.instance_names, 2)


def test_prepare_batch_cuts_labels_to_the_same_rays(tiny):
    ds = SRNDataset(os.path.join(tiny, "train"), sidelength=S)
    samples = [ds[0], ds[5]]
    inp, gt, d0 = prepare_batch(samples, [0, 5], seed=0, step=3, rays=20, device="cpu", extra_keys=("semantic",))
    assert gt["semantic"].shape == (2, 20) and gt["semantic"].dtype == torch.int64
    for b, s in enumerate(samples):
        pix = (inp["uv"][b, :, 1] * S + inp["uv"][b, :, 0]).long()  # uv = (column, row)
        assert torch.equal(gt["semantic"][b], s["semantic"][pix])
        assert torch.equal(gt["rgb"][b], s["rgb"][pix])


def test_joint_training_updates_srn_and_head_and_resumes(tiny, tmp_path):
    cfg = TrainConfig(data=tiny, out=str(tmp_path / "joint"), sidelengths=[S], batch_sizes=[2], steps=[3], lr=1e-3,
                      latent_dim=8, tracing_steps=2, phi_hidden=16, rendering_layers=1, lstm_hidden=4,
                      rays_per_view=32, val_every=0, checkpoint_every=2, log_every=1, backend="auto", device="cpu")
    torch.manual_seed(0)
    head = SemanticHead(16, NUM_CLASSES)
    h0 = head.net[0].weight.clone()
    res = train(cfg, progress=False, log=lambda *a: None, extra_loss=SemanticLoss(head), stop_at=2)
    assert res["step"] == 2 and not torch.equal(head.net[0].weight, h0)
    ck = ckpt_io.load(res["checkpoint"])
    assert ck["srn_fast"]["extra_name"] == "semantic"
    assert torch.equal(ck["srn_fast"]["extra_module"]["net.0.weight"], head.net[0].weight)
    head2 = SemanticHead(16, NUM_CLASSES)
    res2 = train(cfg, resume=True, progress=False, log=lambda *a: None, extra_loss=SemanticLoss(head2))
    assert res2["step"] == 3
    recs = [json.loads(ln) for ln in Path(cfg.out, "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert all("semantic_ce" in r for r in recs if r["kind"] == "train")
    srn0 = tiny_model()  # the training run starts from torch.manual_seed(cfg.seed) = the same init
    assert not torch.equal(res2["model"].pixel_generator.net[-1].weight, srn0.pixel_generator.net[-1].weight)
    with pytest.raises(ckpt_io.CheckpointError, match="no 'semantic' module state"):
        plain = dict(vars(cfg))
        plain["out"] = str(tmp_path / "plain")
        c2 = TrainConfig(**{**plain, "steps": [1]})
        train(c2, progress=False, log=lambda *a: None)
        train(TrainConfig(**{**plain, "steps": [2]}), resume=True, progress=False, log=lambda *a: None,
              extra_loss=SemanticLoss(SemanticHead(16, NUM_CLASSES)))


def test_cli_train_and_eval(tiny, tmp_path, capsys):
    ds = SRNDataset(os.path.join(tiny, "train"), sidelength=S)
    model = tiny_model()
    ckpt = ckpt_io.save(str(tmp_path / "srn.pth"), model, None,
                        {"instance_names": ds.instance_names, "config": {"sidelengths": [S]},
                         "camera": {"radius": 2.0, "elevation_deg": 30.0}})
    heads = str(tmp_path / "heads")
    assert cli_main(["semantic-train", "--checkpoint", ckpt, "--data", tiny, "--out", heads, "--views", "all,3",
                     "--steps", "20", "--no-progress"]) == 0
    assert sorted(os.listdir(heads)) == ["head_k3.pth", "head_kall.pth", "semantic_train.json"]
    _, extra = load_head(os.path.join(heads, "head_k3.pth"))
    assert extra["k"] == 3 and len(extra["views"]) == 3 and extra["class_names"][0] == "background"
    out = str(tmp_path / "eval")
    assert cli_main(["semantic-eval", "--heads", heads, "--data", tiny, "--out", out, "--gif-frames", "2",
                     "--gif-head", "3", "--embed-points", "200", "--no-progress"]) == 0
    rep = json.loads(Path(os.path.join(out, "report.json")).read_text())
    assert set(rep["heads"]) == {"K=all", "K=3"} and rep["num_views"] == 4
    for v in rep["heads"].values():
        assert 0 <= v["miou"] <= 1 and 0 <= v["pixel_accuracy"] <= 1 and "majority_baseline" in v
    assert rep["heads"]["K=all"]["miou_relative_to_all"] == 1.0
    for f in ("miou_vs_k.png", "views.png", "features_pca.png", "orbit.gif"):
        assert os.path.getsize(os.path.join(out, f)) > 100, f
    # user errors: one line, exit code 2
    assert cli_main(["semantic-train", "--data", tiny, "--out", heads]) == 2
    assert cli_main(["semantic-eval", "--heads", str(tmp_path / "nope"), "--data", tiny, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint is required" in err and "head file or folder not found" in err
    if importlib.util.find_spec("sklearn") is None:  # t-SNE is an optional extra: a clear message without it
        assert cli_main(["semantic-eval", "--heads", heads, "--data", tiny, "--out", out, "--embedding", "tsne"]) == 2
        assert "pip install .[viz]" in capsys.readouterr().err
