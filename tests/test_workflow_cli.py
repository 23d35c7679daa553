"""The train / eval / render / demo commands: produced files, and one-line errors for bad input."""
import json
import os
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch

from srn_fast import checkpoint as ckpt_io
from srn_fast.cli import main

from op_utils import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


MODEL = ["--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2", "--tracing-steps", "3",
         "--backend", "torch"]


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--sidelengths", "8", "--batch-sizes", "2", "--steps", "2",
            "--rays-per-view", "16", "--val-every", "2", "--val-views", "2", "--checkpoint-every", "2",
            "--no-progress", *MODEL, *extra]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    assert main(train_args(tiny_data, out)) == 0
    return out


def test_train_writes_run_folder(run):
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "metrics.jsonl", "val_latest.png"]
    recs = [json.loads(l) for l in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"train", "val"} and recs[-1]["num_images"] == 2


def test_eval_heldout_and_few_shot(run, tiny_data, tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert main(["eval", "--checkpoint", run, "--data", tiny_data, "--out", out, "--grid-images", "3",
                 "--no-progress"]) == 0
    rep = json.loads(Path(os.path.join(out, "report.json")).read_text())
    assert rep["num_images"] == 4 and len(rep["per_image"]) == 4  # 2 objects x 2 held-out views
    assert rep["psnr"] == pytest.approx(sum(r["psnr"] for r in rep["per_image"]) / 4)
    grid = imageio.imread(os.path.join(out, "grid.png"))
    assert grid.shape[0] > grid.shape[1] / 4 * 2 and grid.shape[2] == 3  # 3 rows of 4 panels
    out2 = str(tmp_path / "fs")
    assert main(["eval", "--checkpoint", run, "--data", tiny_data, "--out", out2, "--few-shot", "--observations",
                 "1", "--fit-steps", "2", "--no-progress"]) == 0
    rep = json.loads(Path(os.path.join(out2, "report.json")).read_text())
    assert rep["protocol"] == "few-shot" and rep["num_images"] == 3  # 4 views of the unseen chair minus view 1
    assert all(r["observation"] != 1 for r in rep["per_image"])
    assert "few-shot: PSNR" in capsys.readouterr().out


def test_render_orbit_gif_and_frames(run, tmp_path):
    out = str(tmp_path / "r")
    assert main(["render", "--checkpoint", run, "--out", out, "--frames", "3", "--instance", "chairs_0001",
                 "--no-progress"]) == 0
    frames = imageio.mimread(os.path.join(out, "orbit.gif"))
    assert len(frames) == 3
    assert sorted(os.listdir(os.path.join(out, "frames"))) == sorted(
        f"{k}_{i:04d}.png" for k in ("rgb", "depth", "normals") for i in range(3))


def test_bad_inputs_are_one_line_errors(run, tiny_data, tmp_path, capsys):
    one_line_error(capsys, train_args(str(tmp_path / "nope"), str(tmp_path / "o1")), "nope", "not found")
    assert not os.path.exists(tmp_path / "o1")  # nothing half-written
    os.makedirs(tmp_path / "empty")
    one_line_error(capsys, train_args(str(tmp_path / "empty"), str(tmp_path / "o2")), "no instance folders")
    assert not os.path.exists(tmp_path / "o2")
    # unwritable output folder (its parent is a file)
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, train_args(tiny_data, str(tmp_path / "afile" / "run")), "cannot create")
    # a run folder that already holds a run
    one_line_error(capsys, train_args(tiny_data, run), "--resume")
    # checkpoint that does not fit: other number of instances, other latent size
    one_line_error(capsys, train_args(tiny_data, str(tmp_path / "o3"), "--init-checkpoint", run,
                                      "--max-num-instances", "1"), "2 latent codes", "model has 1")
    one_line_error(capsys, [*train_args(tiny_data, str(tmp_path / "o4"), "--init-checkpoint", run),
                            "--latent-dim", "4"], "latent codes of size 8", "size 4")
    # a truncated checkpoint
    bad = tmp_path / "bad.pth"
    bad.write_bytes(Path(ckpt_io.latest(run)).read_bytes()[:100])
    one_line_error(capsys, ["eval", "--checkpoint", str(bad), "--data", tiny_data, "--out", str(tmp_path / "e")],
                   "not a readable checkpoint")
    one_line_error(capsys, ["render", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "e")],
                   "no checkpoints")
    one_line_error(capsys, ["train", "--resume", str(tmp_path / "empty")], "not a run folder")
    one_line_error(capsys, ["eval", "--checkpoint", run, "--data", os.path.join(tiny_data, "unseen"),
                            "--out", str(tmp_path / "e")], "not among the model's 2 training instances")


def test_non_finite_weights_are_refused(run, tiny_data, tmp_path, capsys):
    ck = torch.load(ckpt_io.latest(run), weights_only=False)
    ck["model"]["pixel_generator.net.1.net.0.weight"][0, 0] = float("nan")
    bad = str(tmp_path / "nan.pth")
    torch.save(ck, bad)
    for argv in (["eval", "--checkpoint", bad, "--data", tiny_data, "--out", str(tmp_path / "e")],
                 ["render", "--checkpoint", bad, "--out", str(tmp_path / "r"), "--frames", "1"]):
        one_line_error(capsys, argv, "nan.pth: holds non-finite weights", "pixel_generator.net.1.net.0.weight")
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "r")


def test_run_folder_json_is_strict(run):
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")

    json.loads(Path(run, "config.json").read_text(), parse_constant=no_constants)
    for line in Path(run, "metrics.jsonl").read_text().splitlines(keepends=True):
        json.loads(line, parse_constant=no_constants)


def test_reference_checkpoint_config_is_inferred():
    import srn_fast

    m = srn_fast.SRNModel(5, latent_dim=12, phi_hidden=20, rendering_layers=3, lstm_hidden=6, backend="torch")
    cfg = ckpt_io.infer_model_config(m.state_dict())
    assert cfg == {"num_instances": 5, "latent_dim": 12, "phi_hidden": 20, "phi_layers": 4, "rendering_layers": 3,
                   "lstm_hidden": 6, "fit_single_srn": False, "tracing_steps": None}
    m2 = ckpt_io.build_model({"model": m.state_dict()}, backend="torch")
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in m.state_dict().items())
    single = srn_fast.SRNModel(1, fit_single_srn=True, phi_hidden=16, backend="torch")
    assert ckpt_io.infer_model_config(single.state_dict())["fit_single_srn"] is True
    msg = ckpt_io.describe_mismatch(srn_fast.SRNModel(4, latent_dim=12, phi_hidden=20, rendering_layers=3,
                                                      lstm_hidden=6, backend="torch"), m.state_dict())
    assert "5 latent codes" in msg and "model has 4" in msg


def test_demo_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--no-progress", "--frames", "2", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "held-out PSNR" in text and "mean-colour baseline" in text and "orbit.gif" in text
    s = json.loads(Path(os.path.join(out, "demo.json")).read_text())
    assert os.path.isfile(s["gif"]) and os.path.isfile(s["checkpoint"]) and os.path.isfile(s["grid"])
    # a non-demo folder is never replaced
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    one_line_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "mine")], "not a demo folder")
    assert (tmp_path / "mine" / "thesis.tex").exists()
