"""The training loop, :func:`train` (public as :func:`srn_fast.training.train`), in pieces that can be tested one
by one.

* :func:`setup`: everything that can fail on bad options or bad data, before any file is written: the training
  and validation datasets, the model, the optimiser.
* :func:`restore`: opens the run folder (:class:`srn_fast.runfolder.RunFolder`: lock, stale temporaries, staging
  for ``--overwrite``) and the state to continue from: on ``resume`` the newest readable checkpoint, with the
  options checked against the run's (:func:`resume_changes`: safe changes apply and are recorded, the others are
  an error); else ``init_checkpoint`` if given.
* :class:`TrainLoop`: :meth:`~TrainLoop.step` (one optimiser step), :meth:`~TrainLoop.log`,
  :meth:`~TrainLoop.validate`, :meth:`~TrainLoop.save`; :meth:`~TrainLoop.run` calls them on the schedule
  (``--log-every``, ``--val-every`` and ``--checkpoint-every`` independent of each other) and watches the run's
  health (:mod:`srn_fast.health`: a non-finite loss stops it before anything new is saved; a collapse to a
  constant image is reported once, and with ``stop_on_collapse`` stops it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import files
from .evaluation import evaluate, write_grid
from .health import CollapseMonitor, NonFiniteLossError, batch_stats, collapse_message
from .metrics import psnr_from_mse
from .model import SRNModel
from .ops._layers import cpu_has_bf16_matmul
from .ops.precision import bf16_pays, describe_rates
from .runfolder import RunFolder
from .train_parts import (BatchStream, ExtraLoss, MetricsLog, TrainConfig, _autocast, _device, _dist_info, _local_rank,
                          _Renderer, _StopFlag, camera_facts_of, prepare_batch, rng_state, set_rng_state, split_roots)

# Options that may differ from the run's own on --resume (they change neither the model nor the data stream).
RESUME_SAFE = ("lr", "val_data", "val_every", "val_views", "checkpoint_every", "keep_checkpoints", "log_every",
               "backend", "march_mode", "device", "chunk_rays", "collapse_warmup", "collapse_patience",
               "stop_on_collapse")
PATH_FIELDS = ("data", "val_data", "init_checkpoint")


class ResumeError(ValueError):
    """An option given on resume that would change what the run is (its model, data or past schedule)."""


@dataclass
class Session:
    """What :func:`setup` builds: the configuration, process layout, datasets, model and optimiser."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    ds: object
    val_ds: object
    val_idx: Optional[List[int]]
    val_map: Optional[torch.Tensor]
    model: SRNModel
    optimizer: torch.optim.Optimizer
    extra_loss: Optional[ExtraLoss]
    log: Callable[[str], None]

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Restored:
    """What :func:`restore` found: where to continue, and the open run folder (rank 0 only)."""

    folder: Optional[RunFolder]
    step: int = 0
    pos: int = 0
    resumed_from: Optional[str] = None
    changes: Optional[Dict] = None
    loop_state: Optional[Dict] = None


def setup(cfg: TrainConfig, extra_loss: Optional[ExtraLoss] = None, log=print) -> Session:
    """Build datasets, model and optimiser for ``cfg``; writes nothing (bad data fails here, before the run
    folder is touched)."""
    device = _device(cfg, _local_rank())
    rank, world, local_rank = _dist_info(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for B in cfg.batch_sizes:
        if B % world:
            raise ValueError(f"batch size {B} must be divisible by the number of processes ({world})")
    train_root, val_root = split_roots(cfg.data)
    val_root = cfg.val_data or val_root

    from .data import SRNDataset  # imported here: the data module is only needed for training

    kw = dict(dict(with_depth=False, with_semantic=False), **(extra_loss.dataset_kwargs if extra_loss else {}))
    ds = SRNDataset(train_root, sidelength=cfg.sidelengths[0], max_num_instances=cfg.max_num_instances,
                    max_observations=cfg.max_observations, specific_observation_idcs=cfg.specific_observation_idcs,
                    **kw)
    val_ds = val_idx = val_map = None
    if val_root and cfg.val_every > 0 and rank == 0:
        val_ds = SRNDataset(val_root, sidelength=cfg.sidelengths[0], with_depth=False, with_semantic=False)
        known = {n: i for i, n in enumerate(ds.instance_names)}
        # held-out views of the objects being trained (others, e.g. beyond --max-num-instances, are skipped)
        cand = [k for k, (i, _) in enumerate(val_ds.index) if val_ds.instance_names[i] in known]
        if cand:
            pick = np.linspace(0, len(cand) - 1, num=min(len(cand), cfg.val_views)).round().astype(int)
            val_idx = [cand[int(k)] for k in pick]
            val_map = torch.tensor([known.get(n, 0) for n in val_ds.instance_names], dtype=torch.long)
        else:
            log(f"validation off: no instance of {val_root} is among the training instances")
            val_ds = None

    torch.manual_seed(cfg.seed)
    model = SRNModel(num_instances=ds.num_instances, latent_dim=cfg.latent_dim, tracing_steps=cfg.tracing_steps,
                     fit_single_srn=cfg.fit_single_srn, backend=cfg.backend, phi_hidden=cfg.phi_hidden,
                     phi_layers=cfg.phi_layers, rendering_layers=cfg.rendering_layers, lstm_hidden=cfg.lstm_hidden,
                     march_mode=cfg.march_mode).to(device)
    if cfg.bf16 is True:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; train in fp32")
        if model.backend_name == "fused":
            model.matmul_dtype = torch.bfloat16  # bf16 matmuls inside the fused kernels, fp32 accumulation
        if device.type == "cpu" and not bf16_pays(device):
            why = "it has bf16 instructions, but" if cpu_has_bf16_matmul() else "it has no bf16 instructions;"
            warnings.warn(f"--bf16: this CPU runs bf16 matmuls no faster than float32 ({why} tile GEMM rates: "
                          f"{describe_rates()}), so training will be slower and less precise; "
                          "--bf16 auto uses bf16 only where it is faster", RuntimeWarning, stacklevel=2)
    elif cfg.bf16 == "auto" and model.backend_name == "fused":
        model.matmul_dtype = "auto"  # resolved (and logged) by the model: bf16 where it measures faster
    params = list(model.parameters())
    if extra_loss is not None:
        extra_loss.module.to(device)
        params += list(extra_loss.module.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    return Session(cfg, rank, world, device, ds, val_ds, val_idx, val_map, model, optimizer, extra_loss, log)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _started_stages(cfg: TrainConfig, step: int) -> int:
    """How many schedule stages have begun before global step ``step`` (0-based count of steps done)."""
    return 0 if step <= 0 else cfg.stage(step - 1) + 1


def resume_changes(run: TrainConfig, new: TrainConfig, step: int) -> Dict[str, Dict]:
    """Compare the options of a resume (``new``) with the run's own (``run``) at global step ``step``.

    Safe changes (:data:`RESUME_SAFE`; a schedule that keeps the stages already begun, e.g. more steps in the
    current stage or new stages after it; ``data`` elsewhere, which :func:`restore` accepts only when it holds
    the run's objects and views) are returned as ``{field: {"run": old, "now": new}}``. Anything else
    raises :class:`ResumeError` naming the option and the run's value. ``out`` is where the run is now.
    """
    changes = {}
    for f in dataclasses.fields(TrainConfig):
        k = f.name
        old, now = getattr(run, k), getattr(new, k)
        if k in PATH_FIELDS:
            same = (old or None) == (now or None) or (old and now and os.path.abspath(old) == os.path.abspath(now))
        else:
            same = old == now
        if same or k in ("out", "sidelengths", "batch_sizes", "steps"):
            continue
        if k in RESUME_SAFE or k == "data":  # data: the caller checks it holds the run's objects
            changes[k] = {"run": old, "now": now}
            continue
        raise ResumeError(f"{_flag(k)} {now}: the run was started with {_flag(k)} {old}, which cannot change on "
                          f"--resume (it changes the model or the data); start a new run with --out instead")
    sched_old = (run.sidelengths, run.batch_sizes, run.steps)
    sched_new = (new.sidelengths, new.batch_sizes, new.steps)
    if sched_new != sched_old:
        n = _started_stages(run, step)
        ok = len(new.steps) >= n and new.sidelengths[:n] == run.sidelengths[:n] and \
            new.batch_sizes[:n] == run.batch_sizes[:n] and new.steps[:max(n - 1, 0)] == run.steps[:max(n - 1, 0)]
        if ok and n:
            ok = sum(new.steps[:n]) >= step
        if not ok:
            raise ResumeError(
                f"--sidelengths {','.join(map(str, new.sidelengths))} --batch-sizes "
                f"{','.join(map(str, new.batch_sizes))} --steps {','.join(map(str, new.steps))}: the run (schedule "
                f"--sidelengths {','.join(map(str, run.sidelengths))} --batch-sizes "
                f"{','.join(map(str, run.batch_sizes))} --steps {','.join(map(str, run.steps))}) is at step {step}; "
                f"on --resume a schedule may only lengthen the current stage or add stages after it")
        for k, o, v in zip(("sidelengths", "batch_sizes", "steps"), sched_old, sched_new):
            if o != v:
                changes[k] = {"run": o, "now": v}
    return changes


def restore(sess: Session, resume: bool = False, overwrite: bool = False) -> Restored:
    """Open the run folder (rank 0) and load the state to start from. On any error the folder is released."""
    cfg, model, log = sess.cfg, sess.model, sess.log
    folder = None
    if sess.main:
        folder = RunFolder(cfg.out, "resume" if resume else ("overwrite" if overwrite else "new"), log=log).open()
    try:
        res = Restored(folder)
        if resume:
            ck = ckpt_io.load(cfg.out, log=log if sess.main else None)
            meta = ck.get("srn_fast") or {}
            if "step" not in meta:
                raise ckpt_io.CheckpointError(f"{ck['path']}: not a checkpoint of an srn_fast run (no step)")
            res.step, res.pos = int(meta["step"]), int(meta["stream_pos"])
            run_cfg = _run_config(cfg.out, meta)
            res.changes = resume_changes(run_cfg, cfg, res.step)
            if "data" in res.changes:
                _check_same_objects(sess.ds, meta, cfg.data, run_cfg.data)
            ckpt_io.load_model_state(model, ck)
            if sess.extra_loss is not None:
                if "extra_module" not in meta:
                    raise ckpt_io.CheckpointError(f"{ck['path']}: has no '{sess.extra_loss.name}' module state to "
                                                  f"resume")
                sess.extra_loss.module.load_state_dict(meta["extra_module"])
            sess.optimizer.load_state_dict(ck["optimizer"])
            for g in sess.optimizer.param_groups:
                g["lr"] = cfg.lr
            set_rng_state(meta["rng"])
            res.resumed_from, res.loop_state = ck["path"], meta.get("loop")
            if sess.main:
                log(f"resuming {cfg.out} at step {res.step} from {ck['path']}")
                if res.changes:
                    log("changed on resume: " + ", ".join(f"{_flag(k)} {v['run']} -> {v['now']}"
                                                          for k, v in res.changes.items()))
        elif cfg.init_checkpoint:
            ck = ckpt_io.load(cfg.init_checkpoint)
            ckpt_io.load_model_state(model, ck)
            if ck.get("optimizer"):
                try:
                    sess.optimizer.load_state_dict(ck["optimizer"])
                except (ValueError, KeyError) as e:
                    raise ckpt_io.CheckpointError(f"{ck['path']}: optimizer state does not fit the model ({e})") \
                        from None
            if sess.main:
                log(f"initialised from {ck['path']}")
        if sess.main and (not resume or res.changes):
            files.write_json(folder.join("config.json"), cfg.to_json())
        return res
    except BaseException:
        if folder is not None:
            folder.close()
        raise


def _run_config(out: str, meta: Dict) -> TrainConfig:
    path = os.path.join(out, "config.json")
    if os.path.isfile(path):
        with open(path) as fh:
            return TrainConfig.from_json(json.load(fh))
    return TrainConfig.from_json(meta["config"])


def _check_same_objects(ds, meta: Dict, data: str, run_data: str) -> None:
    names = meta.get("instance_names")
    n_views = meta.get("num_views")
    if (names is not None and list(names) != list(ds.instance_names)) or (n_views is not None and n_views != len(ds)):
        raise ResumeError(f"--data {data}: the run was trained on --data {run_data}, and this folder holds other "
                          f"objects or views ({ds.num_instances} objects, {len(ds)} views; the run: "
                          f"{len(names or [])} objects, {n_views if n_views is not None else '?'} views); a moved "
                          f"data folder is fine, other data is not")


class TrainLoop:
    """One training run from a restored state: ``step()``, ``log()``, ``validate()``, ``save()``, ``run()``."""

    def __init__(self, sess: Session, state: Restored, stop_at: Optional[int] = None, progress: bool = True):
        self.s, self.cfg, self.folder = sess, sess.cfg, state.folder
        self.global_step, self.pos = state.step, state.pos
        self.end = self.cfg.total_steps if stop_at is None else min(self.cfg.total_steps, stop_at)
        self.stream = BatchStream(len(sess.ds), self.cfg.seed)
        net = _Renderer(sess.model, sess.extra_loss.module if sess.extra_loss is not None else None)
        if sess.world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[sess.device.index] if sess.device.type == "cuda" else None)
        self.net = net
        # overshoot: a mean marched depth beyond twice the cameras' (median) distance from the scene centre
        radius = camera_facts_of(sess.ds)["radius"]
        self.health = CollapseMonitor(self.cfg.collapse_warmup, self.cfg.collapse_patience,
                                      depth_limit=2 * radius if radius > 1e-6 else None)
        self.acc = torch.zeros(4, device=sess.device)  # health sums (batch_stats) since the last log
        self.acc_n = 0
        ls = state.loop_state or {}
        if ls:
            self.health.load_state_dict(ls.get("health", {}))
            self.acc = torch.tensor(ls.get("acc", [0.0] * 4), device=sess.device)
            self.acc_n = int(ls.get("acc_n", 0))
        self.first_bad = torch.full((), -1, dtype=torch.long, device=sess.device)  # first non-finite step
        self.first_bad_host = -1
        self.stage, self.S, self.B, self.b = -1, None, None, None
        self.losses: Dict[str, torch.Tensor] = {}
        self.extra_logs: Dict[str, torch.Tensor] = {}
        self.last_ckpt, self.last_val, self.last_log, self.collapse = state.resumed_from, None, None, None
        self.metrics = None
        if sess.main:
            os.makedirs(self.folder.join("checkpoints"), exist_ok=True)
            self.metrics = MetricsLog(self.folder.join("metrics.jsonl"),
                                      truncate_after=state.step if state.resumed_from else None)
            if state.changes:
                self.metrics.write({"kind": "resume", "step": state.step, "from": state.resumed_from,
                                    "changed": state.changes})
        self.bar = tqdm(total=self.cfg.total_steps, initial=state.step, desc="train", unit="step",
                        disable=not (progress and sess.main), dynamic_ncols=True)
        self.t0 = time.time()

    # ------------------------------------------------------------------------------------------------ pieces
    def step(self) -> Dict[str, torch.Tensor]:
        """One optimiser step on the next global batch (this process's rows of it); returns the loss tensors."""
        s, cfg = self.s, self.cfg
        k = self.global_step
        if cfg.stage(k) != self.stage:
            self.stage = cfg.stage(k)
            self.S, self.B = cfg.sidelengths[self.stage], cfg.batch_sizes[self.stage]
            s.ds.set_sidelength(self.S)
            if s.val_ds is not None:
                s.val_ds.set_sidelength(self.S)
            self.b = self.B // s.world
        gidx = self.stream.take(self.pos, self.B)
        mine = gidx[s.rank * self.b:(s.rank + 1) * self.b]
        inp, gt, d0 = prepare_batch([s.ds[i] for i in mine], mine, cfg.seed, k, cfg.rays_per_view, s.device,
                                    extra_keys=s.extra_loss.keys if s.extra_loss is not None else ())
        with _autocast(cfg, s.model, s.device):
            outs = self.net(inp, d0)
        rgb, depth, z = outs[:3]
        losses = s.model.losses((rgb.float(), depth.float()), gt, z=None if z is None else z.float())
        if s.extra_loss is not None:
            xl = s.extra_loss.loss(outs[3].float(), gt)
            losses["total"] = losses["total"] + xl["total"]
            self.extra_logs = {f"{s.extra_loss.name}_{n}": v for n, v in xl.items()}
        s.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        s.optimizer.step()
        self.global_step += 1
        self.pos += self.B
        with torch.no_grad():  # health bookkeeping on the device: no host sync
            bad = ~torch.isfinite(losses["total"].detach())
            self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, k + 1),
                                         self.first_bad)
            self.acc += batch_stats(rgb, gt["rgb"], depth)
            self.acc_n += 1
        self.losses = losses
        return losses

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss (one host sync)."""
        first = self.first_bad_host if self.s.world > 1 else int(self.first_bad)
        if first < 0:
            return
        cfg = self.cfg
        causes = f"a learning rate too high for this model (--lr {cfg.lr:g}; the reference uses 5e-5)"
        if cfg.bf16:
            causes += ", or a bf16 overflow (--bf16)"
        if self.last_ckpt:
            fix = (f"Continue from {self.last_ckpt} (intact; nothing was saved after it) with a lower rate: "
                   f"python -m srn_fast train --resume {self.folder.out if self.folder else cfg.out} --lr "
                   f"{cfg.lr / 10:g}")
        else:
            fix = "No checkpoint was written; start again with a lower --lr."
        raise NonFiniteLossError(f"the training loss became non-finite (NaN or inf) at step {first}; training "
                                 f"stopped. Likely cause: {causes}. {fix}")

    def _sync(self, stop_flag: bool):
        """DDP: one small all-reduce per step (mean losses for the log, the stop flag, non-finite loss).
        Returns ``(loss values or None, stop)``."""
        if self.s.world == 1:
            return None, stop_flag
        L = self.losses
        t = torch.stack([L[k].detach().float() for k in ("total", "img", "depth_reg", "latent")]
                        + [torch.tensor(float(stop_flag), device=self.s.device),
                           (self.first_bad >= 0).float()])
        dist.all_reduce(t)
        vals = (t[:4] / self.s.world).tolist()
        if t[5].item() > 0 and self.first_bad_host < 0:
            self.first_bad_host = self.global_step
        return vals, t[4].item() > 0

    def log(self, vals: Optional[List[float]] = None) -> Dict:
        """Write a ``train`` record (losses of the latest step, colour-variance ratio since the last log) and feed
        the collapse monitor; returns the record."""
        s, cfg = self.s, self.cfg
        if vals is None:
            vals = [self.losses[k].item() for k in ("total", "img", "depth_reg", "latent")]
        acc = self.acc.clone()
        if s.world > 1:
            dist.all_reduce(acc)
            acc /= s.world
        vp, vt, dmean, dspread = (acc / max(self.acc_n, 1)).tolist()
        self.acc.zero_()
        self.acc_n = 0
        rec = {"kind": "train", "step": self.global_step, "stage": self.stage, "sidelength": self.S,
               "loss": vals[0], "img_loss": vals[1], "depth_reg": vals[2], "latent_loss": vals[3],
               "train_psnr": psnr_from_mse(vals[1]), "time": time.time() - self.t0,
               "rgb_var_ratio": vp / vt if vt > 0 else None, "depth_mean": dmean}
        if s.extra_loss is not None:  # rank 0's values (not averaged over processes)
            rec.update({k: float(v.detach()) for k, v in self.extra_logs.items()})
        self.last_log = rec
        if s.main:
            self.metrics.write(rec)
            self.bar.set_postfix(loss=f"{vals[0]:.4f}", img=f"{vals[1]:.4f}", psnr=f"{rec['train_psnr']:.1f}",
                                 refresh=False)
        event = self.health.update(self.global_step, vp, vt, dmean, dspread)
        if event is None and self.global_step == self.cfg.total_steps:  # a late collapse: the run ends collapsed
            event = self.health.at_end(self.global_step, vp, vt, dmean, dspread)
        if event is not None:
            event["message"] = collapse_message(event, cfg)
            self.collapse = event
            if s.main:
                self.metrics.write(event)
                self._say(event["message"])
        return rec

    def validate(self) -> Dict:
        """PSNR/SSIM on the held-out views; writes a ``val`` record and ``val_latest.png`` (rank 0 only)."""
        s = self.s
        res = evaluate(s.model, s.val_ds, s.val_idx, instance_map=s.val_map, batch_size=4,
                       chunk_rays=self.cfg.chunk_rays, keep_images=4)
        write_grid(self.folder.join("val_latest.png"), res["images"])
        self.last_val = {"psnr": res["psnr"], "ssim": res["ssim"], "num_images": res["num_images"]}
        self.metrics.write({"kind": "val", "step": self.global_step, "sidelength": s.ds.sidelength,
                            "psnr": res["psnr"], "ssim": res["ssim"], "num_images": res["num_images"]})
        post = {"val_psnr": f"{res['psnr']:.2f}"}
        if self.last_log is not None:
            post["loss"] = f"{self.last_log['loss']:.4f}"
        self.bar.set_postfix(**post, refresh=False)
        return res

    def save(self) -> Optional[str]:
        """Checkpoint the current state (rank 0); the first one of an ``--overwrite`` run replaces the old run."""
        s = self.s
        if not s.main:
            return None
        extra = {"config": self.cfg.to_json(), "instance_names": s.ds.instance_names, "num_views": len(s.ds),
                 "camera": camera_facts_of(s.ds), "step": self.global_step, "stream_pos": self.pos,
                 "rng": rng_state(), "world_size": s.world,
                 "loop": {"health": self.health.state_dict(), "acc": self.acc.tolist(), "acc_n": self.acc_n}}
        if s.extra_loss is not None:
            extra.update(extra_module=s.extra_loss.module.state_dict(), extra_name=s.extra_loss.name)
        path = self.folder.join("checkpoints", f"step_{self.global_step:08d}.pth")
        ckpt_io.save(path, s.model, s.optimizer, extra)
        if self.folder.commit():
            path = self.folder.join("checkpoints", os.path.basename(path))
        self.last_ckpt = path
        if self.cfg.keep_checkpoints > 0:
            for _, old in ckpt_io.list_checkpoints(self.folder.path)[:-self.cfg.keep_checkpoints]:
                os.unlink(old)
        return path

    def _say(self, msg: str) -> None:
        if not self.bar.disable and self.s.log is print:
            tqdm.write(msg)
        else:
            self.s.log(msg)

    # ------------------------------------------------------------------------------------------------ driver
    def run(self) -> Dict:
        """Train until the end of the schedule (or ``stop_at``, Ctrl-C, a collapse with ``stop_on_collapse``)."""
        s, cfg = self.s, self.cfg
        interrupted = False
        s.model.train()
        try:
            with _StopFlag() as stop:
                while self.global_step < self.end:
                    self.step()
                    vals, stop_now = self._sync(stop.flag)
                    step = self.global_step
                    stop_now = stop_now or step == self.end
                    log_now = step % cfg.log_every == 0 or stop_now
                    val_now = s.val_ds is not None and (step % cfg.val_every == 0 or step == cfg.total_steps)
                    ckpt_now = step % cfg.checkpoint_every == 0 or stop_now
                    if log_now or val_now or ckpt_now:
                        self.check_finite()
                    if log_now:
                        self.log(vals)
                    self.bar.update(1)
                    if val_now:
                        self.validate()
                    collapsed = self.collapse is not None and cfg.stop_on_collapse
                    if ckpt_now or collapsed:
                        self.save()
                    if stop_now or collapsed:
                        interrupted = step < self.end or stop.flag
                        break
        finally:
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if s.world > 1:
            dist.barrier()
        out = self.folder.out if self.folder is not None else cfg.out
        if interrupted and s.main and self.collapse is None:
            s.log(f"stopped at step {self.global_step}; continue with: python -m srn_fast train --resume {out}")
        return {"step": self.global_step, "checkpoint": self.last_ckpt, "val": self.last_val,
                "interrupted": interrupted, "collapse": self.collapse, "model": s.model, "dataset": s.ds,
                "seconds": time.time() - self.t0}


def train(cfg: TrainConfig, resume: bool = False, stop_at: Optional[int] = None, progress: bool = True,
          log=print, extra_loss: Optional[ExtraLoss] = None, overwrite: bool = False) -> Dict:
    """Run (or with ``resume`` continue) the training described by ``cfg`` into ``cfg.out``.

    Everything that can fail on bad options or data is checked before the run folder is touched. The folder is
    locked while training (a second trainer gets an error). A folder that already holds a run needs ``resume``
    or ``overwrite``; with ``overwrite`` the old run is replaced only once the new one has its first checkpoint.
    On ``resume``, ``cfg`` may differ from the run's own configuration only in options that change neither the
    model nor the data (more steps, logging intervals, ...: see :func:`resume_changes`).

    ``stop_at``: stop with a checkpoint after this global step (to split a run across jobs). Returns a summary
    ``{"step", "checkpoint", "val": {...} or None, "interrupted", "collapse": event or None, ...}``. Raises
    :class:`srn_fast.health.NonFiniteLossError` when the loss becomes NaN/inf (nothing is saved after the last
    good checkpoint). Launch under torchrun for DDP. The pieces: :func:`setup`, :func:`restore`, :class:`TrainLoop`.
    """
    owns_group = not dist.is_initialized()  # under torchrun, setup() creates the process group: ended here too
    try:
        sess = setup(cfg, extra_loss, log)
        state = restore(sess, resume=resume, overwrite=overwrite)
        try:
            return TrainLoop(sess, state, stop_at=stop_at, progress=progress).run()
        finally:
            if state.folder is not None:
                state.folder.close()
    finally:
        # A gloo/NCCL group left to the interpreter's exit can abort the process ("terminate called without an
        # active exception") after the run has finished and saved.
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
