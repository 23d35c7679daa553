"""No lost work, tried as a careless user would (issue 12): --overwrite with bad data, baseline-train over a
trained baseline, two trainers in one run folder, options given with --resume, the temporaries of killed runs,
a truncated newest checkpoint."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from srn_fast import checkpoint as ckpt_io
from srn_fast.cli import main

from op_utils import one_line_error
from srn_fast.training import TrainConfig, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2", "--tracing-steps", "3",
         "--rays-per-view", "16", "--backend", "torch", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def train_args(data, out, steps="2", *extra):
    return ["train", "--data", data, "--out", out, "--sidelengths", "8", "--batch-sizes", "2", "--steps", steps,
            "--val-every", "0", "--checkpoint-every", "2", "--log-every", "1", *MODEL, *extra]


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@pytest.fixture
def run(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    assert main(train_args(tiny_data, out)) == 0
    return out


def test_overwrite_checks_the_new_data_before_touching_the_old_run(run, tmp_path, capsys):
    before = snapshot(run)
    one_line_error(capsys, train_args(str(tmp_path / "does_not_exist"), run, "2", "--overwrite"), "not found")
    assert snapshot(run) == before


def test_overwrite_replaces_the_old_run_only_at_the_new_runs_first_checkpoint(run, tiny_data, tmp_path, capsys):
    os.makedirs(os.path.join(run, "eval"))
    with open(os.path.join(run, "eval", "report.json"), "w") as fh:
        fh.write("{}")  # the user's own file in the run folder
    before = snapshot(run)
    # the new run diverges at step 2, before its first checkpoint (step 5): the old run stays as it was
    one_line_error(capsys, train_args(tiny_data, run, "30", "--overwrite", "--lr", "1e8", "--checkpoint-every", "5"),
                   "non-finite")
    assert snapshot(run) == before and sorted(os.listdir(run)) == ["checkpoints", "config.json", "eval",
                                                                   "metrics.jsonl"]
    # a new run that reaches its first checkpoint replaces it; files that are not the run's stay
    assert main(train_args(tiny_data, run, "3", "--overwrite", "--lr", "2e-3", "--checkpoint-every", "3")) == 0
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [3]
    assert ckpt_io.load(run)["srn_fast"]["config"]["lr"] == 2e-3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "eval", "metrics.jsonl"]  # nothing hidden left
    assert Path(os.path.join(run, "eval", "report.json")).read_text() == "{}"


def test_baseline_train_refuses_to_replace_a_trained_baseline(tmp_path, capsys):
    from _spheres import write_sphere_root

    data = write_sphere_root(str(tmp_path / "train"), n_objects=2, n_views=3, size=8, seed=0)
    out = str(tmp_path / "b")
    args = ["baseline-train", "--data", data, "--out", out, "--sidelength", "8", "--steps", "2", "--batch-size",
            "2", "--width", "4", "--code-dim", "16", "--checkpoint-every", "1", "--no-progress"]
    assert main(args) == 0
    before = snapshot(out)
    one_line_error(capsys, args, "already holds a trained baseline", "--resume", "--overwrite")
    assert snapshot(out) == before
    assert main(args + ["--resume", "--steps", "3"]) == 0
    assert torch.load(os.path.join(out, "baseline.pt"), weights_only=False)["step"] == 3
    assert main(args + ["--overwrite"]) == 0
    assert torch.load(os.path.join(out, "baseline.pt"), weights_only=False)["step"] == 2


def test_two_trainers_in_one_run_folder(tiny_data, tmp_path, capsys):
    run = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "srn_fast", *train_args(tiny_data, run, "100000")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt_io.list_checkpoints(run) and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert ckpt_io.list_checkpoints(run), p.stderr.read() if p.poll() is not None else "no checkpoint"
        step = ckpt_io.list_checkpoints(run)[-1][0]  # (--stop-at: without the lock this would train on and on)
        one_line_error(capsys, ["train", "--resume", run, "--stop-at", str(step + 2), "--no-progress"],
                       f"process {p.pid} is training")
        one_line_error(capsys, train_args(tiny_data, run, "2", "--overwrite"), f"process {p.pid} is training")
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    step = ckpt_io.list_checkpoints(run)[-1][0]
    assert main(["train", "--resume", run, "--steps", str(step + 1), "--no-progress"]) == 0  # lock released


def test_resume_options_safe_ones_apply_and_are_recorded(run, tiny_data, tmp_path, capsys):
    assert main(["train", "--resume", run, "--steps", "4", "--log-every", "2", "--lr", "5e-4", "--data", tiny_data,
                 "--no-progress"]) == 0
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [2, 4]
    cfg = TrainConfig.from_json(__import__("json").loads(Path(run, "config.json").read_text()))
    assert cfg.steps == [4] and cfg.log_every == 2 and cfg.lr == 5e-4 and cfg.phi_hidden == 16
    rec = [r for r in read_metrics(run) if r["kind"] == "resume"]
    assert rec == [{"kind": "resume", "step": 2, "from": rec[0]["from"],
                    "changed": {"lr": {"run": 5e-5, "now": 5e-4}, "log_every": {"run": 1, "now": 2},
                                "steps": {"run": [2], "now": [4]}}}]
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 4]
    ck = torch.load(ckpt_io.latest(run), weights_only=False)
    assert all(g["lr"] == 5e-4 for g in ck["optimizer"]["param_groups"])


def test_resume_options_that_change_the_run_are_errors(run, tiny_data, tmp_path, capsys):
    before = snapshot(run)
    one_line_error(capsys, ["train", "--resume", run, "--phi-hidden", "32"], "--phi-hidden 32", "--phi-hidden 16")
    one_line_error(capsys, ["train", "--resume", run, "--rays-per-view", "8"], "--rays-per-view 8",
                   "--rays-per-view 16")
    one_line_error(capsys, ["train", "--resume", run, "--seed", "5"], "--seed 5", "--seed 0")
    one_line_error(capsys, ["train", "--resume", run, "--sidelengths", "16"], "--sidelengths 16", "at step 2")
    one_line_error(capsys, ["train", "--resume", run, "--out", str(tmp_path / "other")], "--out", "in place")
    one_line_error(capsys, ["train", "--resume", run, "--data", os.path.join(tiny_data, "unseen")],
                   "--data", "other objects")
    assert snapshot(run) == before
    # the same objects in another place (a moved data folder) are fine
    moved = str(tmp_path / "moved")
    shutil.copytree(tiny_data, moved)
    assert main(["train", "--resume", run, "--data", moved, "--steps", "3", "--no-progress"]) == 0


def test_resume_schedule_rules():
    from srn_fast.train_loop import ResumeError, resume_changes

    run = TrainConfig(sidelengths=[8, 16], batch_sizes=[4, 2], steps=[10, 10])
    ok = lambda **kw: resume_changes(run, TrainConfig(**{**dict(sidelengths=[8, 16], batch_sizes=[4, 2],
                                                                steps=[10, 10]), **kw}), 15)
    assert ok(steps=[10, 30]) == {"steps": {"run": [10, 10], "now": [10, 30]}}  # longer current stage
    assert ok(steps=[10, 5]) == {"steps": {"run": [10, 10], "now": [10, 5]}}  # ends now (step 15)
    assert "sidelengths" in ok(sidelengths=[8, 16, 32], batch_sizes=[4, 2, 1], steps=[10, 10, 5])  # a new stage
    for bad in (dict(steps=[5, 15]), dict(steps=[10, 4]), dict(batch_sizes=[4, 1]), dict(sidelengths=[8, 32])):
        with pytest.raises(ResumeError, match="is at step 15"):
            ok(**bad)
    with pytest.raises(ResumeError, match="--latent-dim 8: the run was started with --latent-dim 256"):
        ok(latent_dim=8)


def test_stale_training_temporaries_are_removed(run, tiny_data):
    ck = os.path.join(run, "checkpoints")
    junk = [os.path.join(ck, ".step_00000004.pth.k3j_x9.tmp"), os.path.join(run, ".config.json.a1b2c3.tmp")]
    for p in junk:
        Path(p).write_bytes(b"half a checkpoint")  # what atomic_write leaves after a kill -9
    os.makedirs(os.path.join(run, ".staging-999999-0123abcd", "checkpoints"))  # an interrupted --overwrite
    assert main(["train", "--resume", run, "--steps", "3", "--no-progress"]) == 0
    assert not any(os.path.exists(p) for p in junk) and not os.path.exists(os.path.join(run, ".staging-999999-0123abcd"))


def test_make_data_removes_the_temporaries_of_a_killed_run(tmp_path):
    out = str(tmp_path / "ds")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "srn_fast", "make-data", "--kind", "chairs", "--instances", "40",
                          "--views", "8", "--size", "16", "--workers", "1", "--out", out, "--quiet"], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300  # generous: a loaded CI machine starts python slowly
        while time.time() < deadline and p.poll() is None and not any(
                n.startswith(".ds.tmp-") and os.listdir(os.path.join(tmp_path, n, "train")) for n in os.listdir(tmp_path)):
            time.sleep(0.1)
        assert p.poll() is None, "make-data finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".ds.tmp-")]
    assert left and not os.path.exists(out)  # kill -9: the hidden temporary stays behind
    alive = tmp_path / f".ds.tmp-{os.getpid()}-0123abcd"  # a live writer's temporary is not touched
    alive.mkdir()
    assert main(["make-data", "--kind", "mix", "--instances", "1", "--views", "2", "--size", "8", "--test-views", "0",
                 "--unseen-instances", "0", "--out", out, "--quiet"]) == 0
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".ds.")) == [alive.name]
    from srn_fast.runfolder import clean_stale_siblings

    assert clean_stale_siblings(out) == []


def test_truncated_newest_checkpoint_falls_back_to_the_newest_readable(run, tiny_data, tmp_path, capsys):
    assert main(["train", "--resume", run, "--steps", "4", "--no-progress"]) == 0
    newest = ckpt_io.latest(run)
    data = Path(newest).read_bytes()
    Path(newest).write_bytes(data[:len(data) // 3])  # a full disk / killed copy
    assert main(["eval", "--checkpoint", run, "--data", tiny_data, "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "step_00000004.pth: not a readable checkpoint" in err and "using" in err and "step_00000002.pth" in err
    assert main(["train", "--resume", run, "--no-progress"]) == 0
    err = "".join(capsys.readouterr())
    assert "step_00000004.pth: not a readable checkpoint" in err and "step_00000002.pth" in err
    assert ckpt_io.load(newest)["srn_fast"]["step"] == 4  # the resumed run wrote step 4 again
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4]
