"""Training: exact resume, the two-process DDP equivalence (gloo), Ctrl-C (few-shot fitting: test_fewshot.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from srn_fast import checkpoint as ckpt_io
from srn_fast.data import SRNDataset
from srn_fast.training import BatchStream, TrainConfig, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(latent_dim=8, phi_hidden=16, rendering_layers=2, tracing_steps=3, lr=1e-3, rays_per_view=24,
            log_every=1, val_every=1000, backend="torch", seed=3)


def losses(run):
    return [(r["step"], r["loss"], r["img_loss"]) for r in read_metrics(run) if r["kind"] == "train"]


def test_batch_stream_covers_each_epoch_once():
    s = BatchStream(5, seed=0)
    got = s.take(0, 5)
    assert sorted(got) == list(range(5))
    assert sorted(s.take(5, 5)) == list(range(5)) and s.take(3, 4) == got[3:] + s.take(5, 2)


def test_resume_gives_the_same_losses(tiny_data, tmp_path):
    """Two stages (8 px then 16 px, batch 4 then 2); interrupted after step 4 (inside stage 2) and resumed."""
    sched = dict(sidelengths=[8, 16], batch_sizes=[4, 2], steps=[3, 3], checkpoint_every=2)
    full = TrainConfig(data=tiny_data, out=str(tmp_path / "full"), **sched, **TINY)
    train(full, progress=False)
    part = TrainConfig(data=tiny_data, out=str(tmp_path / "part"), **sched, **TINY)
    r = train(part, stop_at=4, progress=False)
    assert r["step"] == 4 and not r["interrupted"]
    assert [s for s, _ in ckpt_io.list_checkpoints(part.out)] == [2, 4]
    # pretend the process died after logging step 5: the resumed run drops the stale line
    with open(os.path.join(part.out, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 5, "loss": -1.0, "img_loss": -1.0}) + "\n")
    r = train(part, resume=True, progress=False)
    assert r["step"] == 6
    a, b = losses(full.out), losses(part.out)
    assert [s for s, *_ in a] == [1, 2, 3, 4, 5, 6] and [s for s, *_ in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # bitwise: same batches, rays, initial depths, Adam state
    ma, mb = ckpt_io.load(full.out)["model"], ckpt_io.load(part.out)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_checkpoint_format_and_init_checkpoint(tiny_data, tmp_path):
    cfg = TrainConfig(data=tiny_data, out=str(tmp_path / "a"), sidelengths=[8], batch_sizes=[2], steps=[2],
                      checkpoint_every=2, **TINY)
    train(cfg, progress=False)
    ck = torch.load(ckpt_io.latest(cfg.out), weights_only=False)
    assert set(ck) == {"model", "optimizer", "srn_fast"}  # the reference reads "model" and "optimizer"
    assert ck["srn_fast"]["step"] == 2 and ck["srn_fast"]["instance_names"] == \
        SRNDataset(os.path.join(tiny_data, "train")).instance_names
    # a reference-style checkpoint (no srn_fast entry) is accepted as a starting point
    ref = str(tmp_path / "ref.pth")
    torch.save({"model": ck["model"], "optimizer": ck["optimizer"]}, ref)
    cfg2 = TrainConfig(data=tiny_data, out=str(tmp_path / "b"), sidelengths=[8], batch_sizes=[2], steps=[1],
                       checkpoint_every=1, init_checkpoint=ref, **TINY)
    r = train(cfg2, progress=False)
    assert r["step"] == 1
    # ... but not when it does not fit (other latent size)
    cfg3 = TrainConfig(data=tiny_data, out=str(tmp_path / "c"), sidelengths=[8], batch_sizes=[2], steps=[1],
                       init_checkpoint=ref, **dict(TINY, latent_dim=4))
    with pytest.raises(ckpt_io.CheckpointError, match="latent codes of size 8 but the model uses size 4"):
        train(cfg3, progress=False)


def _torchrun(args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "srn_fast", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ddp_two_processes_gloo_match_one_process(tiny_data, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 4 (2 per process) vs one process with batch 4.

    Tolerance: the inputs are identical by construction; only float reductions differ (per-process means then
    an all-reduce average instead of one mean). Losses must agree to 1e-4 relative over 4 Adam steps."""
    common = ["train", "--data", tiny_data, "--sidelengths", "8", "--batch-sizes", "4", "--steps", "4",
              "--latent-dim", "8", "--phi-hidden", "16", "--rendering-layers", "2", "--tracing-steps", "3",
              "--rays-per-view", "24", "--lr", "1e-3", "--log-every", "1", "--val-every", "0",
              "--checkpoint-every", "4", "--backend", "torch", "--seed", "3", "--no-progress", "--device", "cpu"]
    p = _torchrun(common + ["--out", str(tmp_path / "ddp")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    from srn_fast.cli import main

    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    a, b = losses(str(tmp_path / "ddp")), losses(str(tmp_path / "one"))
    assert [s for s, *_ in a] == [1, 2, 3, 4] == [s for s, *_ in b]
    for (_, la, ia), (_, lb, ib) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-4) and ia == pytest.approx(ib, rel=1e-4)
    ma = ckpt_io.load(str(tmp_path / "ddp"))["model"]
    mb = ckpt_io.load(str(tmp_path / "one"))["model"]
    assert max((ma[k] - mb[k]).abs().max().item() for k in ma) < 1e-4
    assert ckpt_io.load(str(tmp_path / "ddp"))["srn_fast"]["world_size"] == 2


def test_ctrl_c_saves_a_clean_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "srn_fast", "train", "--data", tiny_data, "--out", str(run),
                          "--sidelengths", "8", "--batch-sizes", "2", "--steps", "100000", "--latent-dim", "8",
                          "--phi-hidden", "16", "--tracing-steps", "2", "--rendering-layers", "2", "--log-every",
                          "1", "--checkpoint-every", "5", "--val-every", "0", "--backend", "torch", "--no-progress"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ckpt_io.list_checkpoints(str(run)) and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert ckpt_io.list_checkpoints(str(run)), p.stderr.read() if p.poll() is not None else "no checkpoint"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err + _
    step, path = ckpt_io.list_checkpoints(str(run))[-1]
    ck = ckpt_io.load(path)
    assert ck["srn_fast"]["step"] == step >= 5  # the final checkpoint is the step it stopped at
    assert max(r["step"] for r in read_metrics(str(run))) == step
    assert not [f for f in os.listdir(run / "checkpoints") if f.endswith(".tmp")]
