"""The training loop in pieces (issue 12): setup / restore / TrainLoop one by one, log / validation / checkpoint
intervals that are not multiples of each other, a non-finite loss, and the constant-image collapse warning."""
import json
import os

import pytest
import torch

from srn_fast import checkpoint as ckpt_io
from srn_fast.cli import main
from srn_fast.training import TrainConfig, read_metrics, train

COLLAPSE_RATIO = 0.02  # srn_fast.health.COLLAPSE_RATIO (imported in the tests, so that the rest runs on old code)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


TINY = dict(latent_dim=8, phi_hidden=16, rendering_layers=2, tracing_steps=3, lr=1e-3, rays_per_view=24,
            backend="torch", seed=3)
MODEL = ["--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2", "--tracing-steps", "3",
         "--rays-per-view", "24", "--backend", "torch", "--no-progress"]


def strict_records(path):
    """metrics.jsonl parsed as strict JSON (a bare NaN / Infinity fails)."""
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")
    with open(path) as fh:
        return [json.loads(ln, parse_constant=no_constants) for ln in fh if ln.strip()]


def kinds(run, kind):
    return [r["step"] for r in read_metrics(run) if r["kind"] == kind]


def test_cli_val_every_not_a_multiple_of_log_every(tiny_data, tmp_path):
    """`train --val-every 5 --log-every 10` crashed at the first validation (UnboundLocalError: vals)."""
    run = str(tmp_path / "run")
    assert main(["train", "--data", tiny_data, "--out", run, "--sidelengths", "8", "--batch-sizes", "2",
                 "--steps", "10", "--val-every", "5", "--log-every", "10", "--val-views", "2",
                 "--checkpoint-every", "10", *MODEL]) == 0
    assert kinds(run, "train") == [10] and kinds(run, "val") == [5, 10]


def test_intervals_that_are_not_multiples_of_each_other(tiny_data, tmp_path):
    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "run"), sidelengths=[8], batch_sizes=[2], steps=[7],
                      log_every=2, val_every=3, val_views=2, checkpoint_every=4, keep_checkpoints=0, **TINY)
    r = train(cfg, progress=False)
    assert r["step"] == 7 and not r["interrupted"]
    assert kinds(cfg.out, "train") == [2, 4, 6, 7]
    assert kinds(cfg.out, "val") == [3, 6, 7]
    assert [s for s, _ in ckpt_io.list_checkpoints(cfg.out)] == [4, 7]


def test_setup_restore_and_loop_pieces_one_by_one(tiny_data, tmp_path):
    from srn_fast.runfolder import RunLock, RunLockedError
    from srn_fast.train_loop import TrainLoop, restore, setup

    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "run"), sidelengths=[8], batch_sizes=[2], steps=[5],
                      val_views=2, **TINY)
    sess = setup(cfg, log=lambda m: None)
    assert not os.path.exists(cfg.out)  # setup writes nothing
    state = restore(sess)
    try:
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} is training"):
            RunLock(cfg.out).acquire()  # the folder is locked while the run is open
        loop = TrainLoop(sess, state, progress=False)
        before = sess.model.pixel_generator.net[-1].weight.detach().clone()
        losses = loop.step()
        assert loop.global_step == 1 and set(losses) >= {"total", "img", "depth_reg", "latent"}
        assert not torch.equal(before, sess.model.pixel_generator.net[-1].weight)
        res = loop.validate()  # before any log: the case that crashed
        assert res["num_images"] == 2 and os.path.isfile(os.path.join(cfg.out, "val_latest.png"))
        loop.step()
        rec = loop.log()
        assert rec["step"] == 2 and rec["loss"] == pytest.approx(loop.losses["total"].item())
        assert rec["rgb_var_ratio"] is not None and rec["rgb_var_ratio"] >= 0
        path = loop.save()
        assert path.endswith("step_00000002.pth") and ckpt_io.load(path)["srn_fast"]["step"] == 2
        loop.metrics.close()
    finally:
        state.folder.close()
    assert [r["kind"] for r in read_metrics(cfg.out)] == ["val", "train"]
    RunLock(cfg.out).acquire().release()  # released
    assert not os.path.exists(os.path.join(cfg.out, ".lock"))


def test_non_finite_loss_stops_before_saving(tiny_data, tmp_path, capsys):
    """lr 1e8 drives the tiny model to NaN at step 2: one-line error naming the cause, nothing saved after step 1."""
    run = str(tmp_path / "run")
    rc = main(["train", "--data", tiny_data, "--out", run, "--sidelengths", "8", "--batch-sizes", "2", "--steps",
               "30", "--lr", "1e8", "--log-every", "1", "--val-every", "0", "--checkpoint-every", "1", *MODEL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "non-finite" in err and "at step 2" in err and "--lr 1e+08" in err and "learning rate" in err
    assert "step_00000001.pth" in err and f"--resume {run}" in err
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [1]
    recs = strict_records(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1]
    ckpt_io.build_model(ckpt_io.load(run), backend="torch")  # loads: the saved weights are finite


def test_non_finite_loss_python_api_raises(tiny_data, tmp_path):
    from srn_fast.health import NonFiniteLossError

    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "run"), sidelengths=[8], batch_sizes=[2], steps=[30],
                      log_every=10, val_every=0, checkpoint_every=10, **dict(TINY, lr=1e8))
    with pytest.raises(NonFiniteLossError, match="at step 2; training stopped.*No checkpoint was written"):
        train(cfg, progress=False)
    assert ckpt_io.list_checkpoints(cfg.out) == []  # the check runs before the first save (step 10)


def test_collapse_monitor_rules():
    from srn_fast.health import COLLAPSE_RATIO as ratio, CollapseMonitor

    assert ratio == COLLAPSE_RATIO
    m = CollapseMonitor(warmup=100, patience=50)
    low, ok = COLLAPSE_RATIO / 10, COLLAPSE_RATIO * 10
    assert m.update(40, low, 1.0, 5.0, 0.1) is None  # low from step 1, but inside the warm-up
    assert m.update(80, ok, 1.0, 1.0, 0.1) is None  # recovered: the streak resets
    assert m.update(100, low, 1.0, 5.0, 0.1) is None  # low since 81: only 20 steps
    ev = m.update(130, low, 1.0, 5.0, 0.1)
    assert ev is not None and ev["since"] == 81 and ev["step"] == 130 and ev["event"] == "collapse"
    assert m.update(160, low, 1.0, 5.0, 0.1) is None  # reported once
    slow = CollapseMonitor(warmup=10, patience=15, depth_limit=3.0)  # constant images, depths short of the surfaces:
    assert all(slow.update(s, low, 1.0, 0.3, 0.01) is None for s in range(10, 2000, 10))  # a slow start, no verdict
    assert slow.update(2000, low, 1.0, 3.5, 0.01) is None  # past the limit: a streak begins (steps 1991-2000)
    assert slow.update(2010, low, 1.0, 12.0, 0.01)["since"] == 1991  # 20 steps of overshoot: collapse
    m2 = CollapseMonitor(warmup=10, patience=5)
    assert m2.update(50, 0.0, 0.0, 1.0, 0.0) is None  # blank targets say nothing
    assert CollapseMonitor(warmup=0).update(5000, 0.0, 1.0, 1.0, 0.0) is None  # check off
    # the end of the schedule: a late streak shorter than patience is still a verdict once it spans patience / 4
    late = CollapseMonitor(warmup=100, patience=200)
    assert late.update(1000, ok, 1.0, 1.0, 0.1) is None
    assert late.update(1040, low, 1.0, 5.0, 0.1) is None  # low since 1001
    assert late.at_end(1040, low, 1.0, 5.0, 0.1) is None  # 40 steps < 200 / 4
    assert late.update(1060, low, 1.0, 5.0, 0.1) is None  # 60 steps: not a verdict during training ...
    ev = late.at_end(1060, low, 1.0, 5.0, 0.1)  # ... but the run ends collapsed
    assert ev is not None and ev["since"] == 1001 and ev["event"] == "collapse"
    assert late.at_end(1060, low, 1.0, 5.0, 0.1) is None  # reported once
    healthy = CollapseMonitor(warmup=100, patience=200)
    assert healthy.update(1060, ok, 1.0, 1.0, 0.1) is None and healthy.at_end(1060, ok, 1.0, 1.0, 0.1) is None
    early = CollapseMonitor(warmup=500, patience=200)  # inside the warm-up: no verdict at the end either
    assert early.update(300, low, 1.0, 5.0, 0.1) is None and early.at_end(300, low, 1.0, 5.0, 0.1) is None


# A tiny model at lr 0.1 collapses at once (the marcher overshoots to depth ~14, every pixel one colour); the same
# model with 6 marching steps at lr 3e-3 leaves its low-variance start by step ~50 (measured: ratio 0.07 at 100,
# 0.58 at 300). Warm-up 100 / patience 50 separates them.
HEALTH = dict(latent_dim=8, phi_hidden=16, rendering_layers=2, rays_per_view=64, backend="fused", seed=0,
              log_every=10, val_every=0, collapse_warmup=100, collapse_patience=50)


def test_forced_collapse_warns_once(tiny_data, tmp_path):
    said = []
    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "run"), sidelengths=[16], batch_sizes=[4], steps=[150],
                      lr=0.1, tracing_steps=3, checkpoint_every=150, **HEALTH)
    r = train(cfg, progress=False, log=said.append)
    warnings = [m for m in said if "collapsed" in m]
    assert len(warnings) == 1 and r["collapse"]["step"] == 100 and r["step"] == 150  # warned, not stopped
    assert "--lr 0.1" in warnings[0] and "5e-5" in warnings[0]
    health = [rec for rec in strict_records(os.path.join(cfg.out, "metrics.jsonl")) if rec["kind"] == "health"]
    assert len(health) == 1 and health[0]["message"] == warnings[0] and health[0]["rgb_var_ratio"] < COLLAPSE_RATIO
    assert health[0]["depth_mean"] > health[0]["depth_limit"] == pytest.approx(3.0)  # cameras 1.5 from the centre


def test_stop_on_collapse(tiny_data, tmp_path, capsys):
    run = str(tmp_path / "run")
    rc = main(["train", "--data", tiny_data, "--out", run, "--sidelengths", "16", "--batch-sizes", "4", "--steps",
               "1000", "--lr", "0.1", "--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2",
               "--tracing-steps", "3", "--rays-per-view", "64", "--backend", "fused", "--val-every", "0",
               "--collapse-warmup", "100", "--collapse-patience", "50", "--stop-on-collapse", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 3 and "collapsed" in out.out + out.err and "--stop-on-collapse" in out.err
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [100]  # stopped where it was detected, with a checkpoint


def test_good_run_does_not_warn(tiny_data, tmp_path):
    said = []
    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "run"), sidelengths=[16], batch_sizes=[4], steps=[150],
                      lr=3e-3, tracing_steps=6, checkpoint_every=150, **HEALTH)
    r = train(cfg, progress=False, log=said.append)
    assert r["collapse"] is None and not [m for m in said if "collapsed" in m]
    ratios = [rec["rgb_var_ratio"] for rec in read_metrics(cfg.out) if rec["kind"] == "train"]
    assert min(ratios[-5:]) > 2 * COLLAPSE_RATIO  # it really trains (images are not constant at the end)


def test_device_is_the_local_ranks_gpu_and_must_exist(monkeypatch):
    """auto / cuda under torchrun: GPU local_rank; more processes than GPUs is a clear error, not a CUDA one."""
    from srn_fast.train_parts import TrainConfig, _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for dev in ("auto", "cuda"):
        assert _device(TrainConfig(data="x", out="y", device=dev), 0) == torch.device("cuda", 0)
        with pytest.raises(ValueError, match=rf"--device {dev}: the process of local rank 1 needs GPU 1 but this "
                                             r"machine has 1; .* --device cpu"):
            _device(TrainConfig(data="x", out="y", device=dev), 1)
    assert _device(TrainConfig(data="x", out="y", device="cuda:0"), 1) == torch.device("cuda", 0)
    assert _device(TrainConfig(data="x", out="y", device="cpu"), 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(TrainConfig(data="x", out="y", device="auto"), 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        _device(TrainConfig(data="x", out="y", device="cuda"), 0)


def test_process_group_backend_follows_the_device(monkeypatch):
    """--device cpu on a GPU machine under torchrun joins a gloo group (NCCL has no CPU tensors)."""
    from srn_fast import train_parts

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_parts.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_parts.dist, "init_process_group", lambda backend: seen.append(backend))
    train_parts._dist_info(torch.device("cpu"))
    train_parts._dist_info(torch.device("cuda", 0))
    assert seen == ["gloo", "nccl"]
