"""Training, checkpoints and evaluation of the encoder-decoder baseline (:class:`TatarchenkoNet`)."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import SRNDataset
from ..files import save_torch, write_json
from ..metrics import mean_scores, view_scores
from ..runfolder import RunLock, clean_run_temporaries
from .data import PairDataset, eval_pairs, image_sample
from .model import TatarchenkoNet, baseline_loss

CHECKPOINT_KIND = "srn_fast.baseline.TatarchenkoNet"
CHECKPOINT_NAME = "baseline.pt"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
def save_checkpoint(path: str, model: TatarchenkoNet, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: int = 0, extra: Optional[Dict] = None) -> None:
    """Atomically write ``{'kind', 'config', 'model', 'optimizer', 'step', 'extra'}`` to ``path``."""
    state = {"kind": CHECKPOINT_KIND, "config": dict(model.config), "model": model.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": int(step),
             "extra": extra or {}}
    save_torch(path, state, makedirs=True)


def load_checkpoint(path: str, map_location="cpu"):
    """Returns ``(model, checkpoint dict)``; raises ValueError naming the file when it is not a baseline one."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "baseline checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path}: not a baseline checkpoint (expected one written by baseline-train)")
    model = TatarchenkoNet(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model, ckpt


# ----------------------------------------------------------------------------------------------------------------
# training
def _batch_to(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(data_root: str, out_dir: str, sidelength: int = 64, steps: int = 2000, batch_size: int = 32,
          lr: float = 1e-4, width: int = 32, code_dim: int = 1024, pose_mode: str = "both",
          depth_weight: float = 1.0, max_instances: int = -1, max_observations: int = -1,
          checkpoint_every: int = 500, log_every: int = 10, seed: int = 0, device: str = "cpu",
          resume: bool = False, progress: bool = True, overwrite: bool = False) -> Dict:
    """Train the baseline on (input view, target view) pairs of the objects under ``data_root``.

    Writes ``out_dir/baseline.pt`` (latest, atomically, every ``checkpoint_every`` steps and at the end) and
    ``out_dir/train_report.json`` (configuration, loss curve, timings). Returns the report. A folder that
    already holds ``baseline.pt`` needs ``resume`` (continue it) or ``overwrite`` (replace it: the old file stays
    until the new run's first checkpoint). The folder is locked while training.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    ds = SRNDataset(data_root, sidelength=sidelength, max_num_instances=max_instances,
                    max_observations=max_observations, with_semantic=False)
    os.makedirs(out_dir, exist_ok=True)
    lock = RunLock(out_dir, "baseline run folder").acquire()
    try:
        clean_run_temporaries(out_dir, log=print)
        if os.path.isfile(os.path.join(out_dir, CHECKPOINT_NAME)) and not (resume or overwrite):
            raise ValueError(f"{out_dir}: already holds a trained baseline ({CHECKPOINT_NAME}); continue it with "
                             f"--resume or replace it with --overwrite")
        resume = resume and not overwrite
        use_depth = ds.has_depth and depth_weight != 0
        if not ds.has_depth and depth_weight != 0:
            print(f"note: {data_root} has no depth/ folders; training on colour only")
        pairs = PairDataset(ds, seed=seed)
        ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
        start, history, before = 0, [], 0.0
        if resume and os.path.isfile(ckpt_path):
            model, ckpt = load_checkpoint(ckpt_path)
            if model.sidelength != sidelength:
                raise ValueError(f"{ckpt_path}: trained at sidelength {model.sidelength}, asked for {sidelength}")
            start, history = ckpt["step"], ckpt["extra"].get("history", [])
            before = float(ckpt["extra"].get("seconds", 0.0))
        else:
            ckpt = None
            model = TatarchenkoNet(sidelength=sidelength, width=width, code_dim=code_dim, pose_mode=pose_mode)
        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        if ckpt is not None and ckpt.get("optimizer"):
            opt.load_state_dict(ckpt["optimizer"])
        gen = torch.Generator().manual_seed(seed + start)
        loader = DataLoader(pairs, batch_size=min(batch_size, len(pairs)), shuffle=True, drop_last=True, generator=gen)
        config = dict(model.config, data_root=os.path.abspath(data_root), steps=steps, batch_size=batch_size, lr=lr,
                      depth_weight=depth_weight, use_depth=use_depth, max_instances=max_instances,
                      max_observations=max_observations, seed=seed, num_instances=ds.num_instances, num_views=len(ds))

        def report(step, elapsed):
            return {"config": config, "step": step, "seconds": before + elapsed, "seconds_this_run": elapsed,
                    "history": history, "final": history[-1] if history else None}

        t0 = time.time()
        step = start
        bar = tqdm(total=steps, initial=start, desc="baseline-train", disable=not progress, dynamic_ncols=True)
        run = {"total": 0.0, "rgb": 0.0, "depth": 0.0, "n": 0}
        while step < steps:
            for batch in loader:
                b = _batch_to(batch, device)
                pred = model(b["input_rgb"], b["input_pose"], b["target_pose"])
                losses = baseline_loss(pred, b["target_rgb"], b.get("target_depth") if use_depth else None,
                                       depth_weight)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()
                step += 1
                for k in ("total", "rgb", "depth"):
                    run[k] += float(losses[k].detach())
                run["n"] += 1
                if step % log_every == 0 or step == steps:
                    entry = {"step": step, **{k: run[k] / run["n"] for k in ("total", "rgb", "depth")}}
                    history.append(entry)
                    run = {"total": 0.0, "rgb": 0.0, "depth": 0.0, "n": 0}
                    bar.set_postfix(loss=f"{entry['total']:.4f}", rgb=f"{entry['rgb']:.4f}",
                                    depth=f"{entry['depth']:.4f}")
                bar.update(1)
                if step % checkpoint_every == 0 or step == steps:
                    save_checkpoint(ckpt_path, model, opt, step, {"history": history, "config": config,
                                                                 "seconds": before + time.time() - t0})
                if step >= steps:
                    break
        bar.close()
        rep = report(step, time.time() - t0)
        write_json(os.path.join(out_dir, "train_report.json"), rep, indent=2)
        return rep
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# prediction and evaluation
@torch.no_grad()
def predict_views(model: TatarchenkoNet, ds: SRNDataset, instance: int, input_view: int, target_views: List[int],
                  device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Baseline prediction of ``target_views`` of ``instance`` from its single ``input_view``.

    Returns ``input_rgb [3, S, S]``, ``rgb [T, 3, S, S]``, ``depth [T, 1, S, S]`` (on the CPU).
    """
    if ds.sidelength != model.sidelength:
        raise ValueError(f"the baseline was trained at {model.sidelength} px but the data is read at "
                         f"{ds.sidelength} px")
    model.eval().to(device)
    a = image_sample(ds, instance, input_view)
    poses = torch.stack([image_sample(ds, instance, t)["pose"] for t in target_views])
    T = len(target_views)
    pred = model(a["rgb"][None].expand(T, -1, -1, -1).to(device), a["pose"][None].expand(T, -1, -1).to(device),
                 poses.to(device))
    return {"input_rgb": a["rgb"], "rgb": pred["rgb"].cpu(), "depth": pred["depth"].cpu()}


def evaluate(model: TatarchenkoNet, data_root: str, input_view: int = 0, max_targets: Optional[int] = None,
             max_instances: int = -1, device: str = "cpu", progress: bool = True) -> Dict:
    """Mean PSNR / SSIM / foreground depth error of the baseline on the held-out views of every object under
    ``data_root``, each predicted from the object's ``input_view`` alone."""
    ds = SRNDataset(data_root, sidelength=model.sidelength, max_num_instances=max_instances, with_semantic=False)
    rows = []
    for i, iv, targets in tqdm(eval_pairs(ds, input_view, max_targets), desc="baseline-eval", disable=not progress):
        pred = predict_views(model, ds, i, iv, targets, device)
        for k, t in enumerate(targets):
            gt = image_sample(ds, i, t)
            rows.append({"instance": ds.instance_names[i], "view": int(gt["observation_idx"]),
                         **view_scores({"rgb": pred["rgb"][k], "depth": pred["depth"][k]}, gt)})
    return {"summary": mean_scores(rows), "per_view": rows}
