"""The reference SRN training loop (auto-decoder: one latent code per training object), and few-shot fitting of
latent codes for new objects (:func:`fit_latents`).

As the reference ``train.py``: Adam (lr 5e-5), loss ``200 * MSE + 1e-3 * depth regulariser + 1 * mean(z^2)``
(:meth:`SRNModel.losses`), a schedule of (sidelength, batch size, steps) stages, one random view of one object per
batch row. Additions: random ray subsets per view, bf16 matmuls, validation PSNR/SSIM on held-out views, a JSON-lines
metrics log, atomic checkpoints with exact resume, and multi-process data parallelism (DDP, launched by torchrun).

Determinism (what makes resume and DDP exact): the order of training views is a stream of seeded permutations
of the dataset, one per epoch, cut into global batches; the random ray subset and the initial marching depths of a
sample come from a generator seeded by (seed, step, dataset index). So a run's inputs depend on neither the number
of processes nor on where it was interrupted, and a resumed run sees exactly the batches it would have seen.
Under DDP rank r takes rows ``[r * B / W, (r + 1) * B / W)`` of each global batch of size B (a distributed sampler
that shards batches rather than epochs, so W processes see the same global batches as one).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .evaluation import collate, evaluate, write_grid
from .model import SRNModel


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``RUN/config.json``). Defaults are the reference's."""

    data: str = ""
    out: str = ""
    sidelengths: List[int] = field(default_factory=lambda: [64])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    steps: List[int] = field(default_factory=lambda: [200000])
    lr: float = 5e-5
    latent_dim: int = 256
    tracing_steps: int = 10
    fit_single_srn: bool = False
    phi_hidden: int = 256
    phi_layers: int = 4
    rendering_layers: int = 5
    lstm_hidden: int = 16
    rays_per_view: Optional[int] = None
    max_num_instances: int = -1
    max_observations: int = -1
    specific_observation_idcs: Optional[List[int]] = None
    val_data: Optional[str] = None
    val_every: int = 1000
    val_views: int = 16
    checkpoint_every: int = 10000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    backend: str = "auto"
    bf16: bool = False
    march_mode: str = "recompute"
    init_checkpoint: Optional[str] = None
    device: str = "auto"
    chunk_rays: int = 8192

    def __post_init__(self):
        n = len(self.sidelengths)
        if not (len(self.batch_sizes) == len(self.steps) == n) or n == 0:
            raise ValueError(f"--sidelengths, --batch-sizes and --steps must list the same number of stages, got "
                             f"{self.sidelengths}, {self.batch_sizes}, {self.steps}")
        for name, vals in (("sidelengths", self.sidelengths), ("batch-sizes", self.batch_sizes),
                           ("steps", self.steps)):
            if any(int(v) < 1 for v in vals):
                raise ValueError(f"--{name} must be positive integers, got {vals}")
        if self.rays_per_view is not None and self.rays_per_view < 1:
            raise ValueError(f"--rays-per-view must be >= 1, got {self.rays_per_view}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")

    @property
    def total_steps(self) -> int:
        return int(sum(self.steps))

    def stage(self, step: int) -> int:
        """Index of the schedule stage that global step ``step`` (0-based) belongs to."""
        acc = 0
        for k, n in enumerate(self.steps):
            acc += n
            if step < acc:
                return k
        return len(self.steps) - 1

    def to_json(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def split_roots(data: str):
    """(train root, default validation root or None): ``DATA/train`` and ``DATA/test`` when DATA has a train/
    folder (our generator's layout), else DATA itself (an SRN instance root) and no validation root."""
    if not data:
        raise ValueError("--data is required: a folder of SRN instances (or of train/ and test/ splits)")
    if not os.path.isdir(data):
        raise ValueError(f"{data}: data folder not found")
    train = os.path.join(data, "train")
    if os.path.isdir(train):
        test = os.path.join(data, "test")
        return train, (test if os.path.isdir(test) else None)
    return data, None


class BatchStream:
    """Training views as an endless stream of seeded per-epoch permutations of ``range(n)``, cut into batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, pos: int, count: int) -> List[int]:
        """Dataset indices at stream positions ``pos .. pos + count - 1``."""
        out = []
        while len(out) < count:
            e, o = divmod(pos + len(out), self.n)
            k = min(count - len(out), self.n - o)
            out += self.perm(e)[o:o + k].tolist()
        return out


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A generator for one sample's randomness (ray subset, initial depths), keyed by (seed, step, index)."""
    s = np.random.SeedSequence([int(seed), int(step), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def prepare_batch(samples: Sequence[Dict[str, torch.Tensor]], indices: Sequence[int], seed: int, step: int,
                  rays: Optional[int], device, extra_keys: Sequence[str] = ()
                  ) -> (Dict[str, torch.Tensor], Dict[str, torch.Tensor], torch.Tensor):
    """Collate samples, choose each view's random ray subset, draw initial depths; returns (model_input,
    ground_truth, initial_depth ``[b, R, 1]``) on ``device``. ``extra_keys`` (per-ray sample entries such as
    ``semantic [N]``) go into ground_truth, cut to the same ray subset."""
    batch = collate(samples)
    N = batch["uv"].shape[1]
    R = N if rays is None or rays >= N else rays
    sel, d0 = [], []
    for i in indices:
        g = sample_generator(seed, step, i)
        if R < N:
            sel.append(torch.randperm(N, generator=g)[:R])
        d0.append(torch.empty(R, 1).normal_(mean=0.05, std=5e-4, generator=g))
    uv, rgb = batch["uv"], batch["rgb"]
    if sel:
        s = torch.stack(sel)
        uv = torch.gather(uv, 1, s[..., None].expand(-1, -1, 2))
        rgb = torch.gather(rgb, 1, s[..., None].expand(-1, -1, 3))
    inp = {"instance_idx": batch["instance_idx"].to(device), "pose": batch["pose"].to(device),
           "intrinsics": batch["intrinsics"].to(device), "uv": uv.to(device)}
    gt = {"rgb": rgb.to(device)}
    for k in extra_keys:
        if k not in batch:
            raise ValueError(f"training needs '{k}' in every sample (e.g. a semantic/ folder per instance)")
        t = batch[k]
        if sel:
            idx = torch.stack(sel)
            t = torch.gather(t, 1, idx.reshape(idx.shape + (1,) * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
        gt[k] = t.to(device)
    return inp, gt, torch.stack(d0).to(device)


class _Renderer(nn.Module):
    """The forward that DDP wraps: render with given initial depths; returns (rgb, depth, z) and, with an
    ``extra`` module (see :class:`ExtraLoss`), also ``extra(features)``."""

    def __init__(self, model: SRNModel, extra: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, model_input, initial_depth):
        out = self.model.render(model_input, initial_depth=initial_depth)
        if self.extra is None:
            return out["rgb"], out["depth"], out["z"]
        return out["rgb"], out["depth"], out["z"], self.extra(out["features"])


class ExtraLoss:
    """Hook for training an extra module jointly with the SRN (e.g. Semantic SRN's part classifier).

    ``module`` is applied to phi's surface features ``[b, R, F]`` inside the forward; its parameters join the
    optimiser and its state is saved in (and resumed from) the checkpoints under ``srn_fast["extra_module"]``.
    ``keys`` are per-ray sample entries the loss needs (cut to the same ray subset as ``rgb``);
    ``loss(module_output, ground_truth)`` returns a dict of scalar tensors whose ``"total"`` is added to the SRN
    loss (the other entries are logged). ``dataset_kwargs`` go to the training SRNDataset.
    """

    name = "extra"
    keys: Sequence[str] = ()
    dataset_kwargs: Dict = {}

    def __init__(self, module: nn.Module):
        self.module = module

    def loss(self, output: torch.Tensor, gt: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def _autocast(cfg: TrainConfig, model: SRNModel, device: torch.device):
    """bf16: matmul_dtype on the fused backend, torch.autocast on the torch backend."""
    if not cfg.bf16 or model.backend_name == "fused":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _dist_info():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    d = torch.device(cfg.device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    return d


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per line (``kind`` "train" or "val"), appended and flushed."""

    def __init__(self, path: str, truncate_after: Optional[int] = None):
        self.path = path
        if truncate_after is not None and os.path.exists(path):  # drop lines logged after the resumed checkpoint
            with open(path) as fh:
                keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after]
            ckpt_io.atomic_write(path, lambda f: f.write("".join(keep).encode()))
        self.fh = open(path, "a")

    def write(self, rec: Dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def close(self):
        self.fh.close()


def read_metrics(run: str) -> List[Dict]:
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def train(cfg: TrainConfig, resume: bool = False, stop_at: Optional[int] = None, progress: bool = True,
          log=print, extra_loss: Optional[ExtraLoss] = None) -> Dict:
    """Run (or with ``resume`` continue) the training described by ``cfg`` into ``cfg.out``.

    ``stop_at``: stop with a checkpoint after this global step (to split a run across jobs). Returns a summary
    ``{"step", "checkpoint", "val": {...} or None, "interrupted"}``. Launch under torchrun for DDP.
    """
    rank, world, local_rank = _dist_info()
    device = _device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main = rank == 0
    out = cfg.out
    ckpt_dir = os.path.join(out, "checkpoints")
    train_root, val_root = split_roots(cfg.data)
    val_root = cfg.val_data or val_root
    for B in cfg.batch_sizes:
        if B % world:
            raise ValueError(f"batch size {B} must be divisible by the number of processes ({world})")

    from .data import SRNDataset  # imported here: the data module is only needed for training

    ds = SRNDataset(train_root, sidelength=cfg.sidelengths[0], max_num_instances=cfg.max_num_instances,
                    max_observations=cfg.max_observations, specific_observation_idcs=cfg.specific_observation_idcs,
                    **dict(dict(with_depth=False, with_semantic=False), **(extra_loss.dataset_kwargs if extra_loss
                                                                          else {})))
    val_ds = val_idx = val_map = None
    if val_root and cfg.val_every > 0 and main:
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
    if cfg.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; train in fp32")
        if model.backend_name == "fused":
            model.matmul_dtype = torch.bfloat16  # bf16 matmuls inside the fused kernels, fp32 accumulation
        elif device.type == "cpu" and not hasattr(torch, "autocast"):
            raise ValueError("--bf16 needs torch.autocast or the fused backend")
    params = list(model.parameters())
    if extra_loss is not None:
        extra_loss.module.to(device)
        params += list(extra_loss.module.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    step = pos = 0
    extra_static = {"config": cfg.to_json(), "instance_names": ds.instance_names,
                    "camera": _camera_facts(ds)}
    if resume:
        ck = ckpt_io.load(ckpt_io.latest(out))
        ckpt_io.load_model_state(model, ck)
        if extra_loss is not None:
            if "extra_module" not in ck["srn_fast"]:
                raise ckpt_io.CheckpointError(f"{ck['path']}: has no '{extra_loss.name}' module state to resume")
            extra_loss.module.load_state_dict(ck["srn_fast"]["extra_module"])
        optimizer.load_state_dict(ck["optimizer"])
        meta = ck["srn_fast"]
        step, pos = int(meta["step"]), int(meta["stream_pos"])
        set_rng_state(meta["rng"])
        resumed_from = ck["path"]
        if main:
            log(f"resuming {out} at step {step} from {ck['path']}")
    elif cfg.init_checkpoint:
        ck = ckpt_io.load(cfg.init_checkpoint)
        ckpt_io.load_model_state(model, ck)
        if ck.get("optimizer"):
            try:
                optimizer.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError) as e:
                raise ckpt_io.CheckpointError(f"{ck['path']}: optimizer state does not fit the model ({e})") from None
        if main:
            log(f"initialised from {ck['path']}")

    net = _Renderer(model, extra_loss.module if extra_loss is not None else None)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = None
    if main:
        os.makedirs(ckpt_dir, exist_ok=True)
        if not resume:
            ckpt_io.atomic_write(os.path.join(out, "config.json"),
                                 lambda fh: fh.write(json.dumps(cfg.to_json(), indent=1).encode()))
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), truncate_after=step if resume else None)

    stream = BatchStream(len(ds), cfg.seed)
    last_ckpt, last_val, interrupted = (resumed_from if resume else None), None, False

    def save(step_now):
        nonlocal last_ckpt
        if not main:
            return
        extra = dict(extra_static, step=step_now, stream_pos=pos, rng=rng_state(), world_size=world)
        if extra_loss is not None:
            extra.update(extra_module=extra_loss.module.state_dict(), extra_name=extra_loss.name)
        path = os.path.join(ckpt_dir, f"step_{step_now:08d}.pth")
        ckpt_io.save(path, model, optimizer, extra)
        last_ckpt = path
        if cfg.keep_checkpoints > 0:
            for _, old in ckpt_io.list_checkpoints(out)[:-cfg.keep_checkpoints]:
                os.unlink(old)

    def validate(step_now):
        nonlocal last_val
        res = evaluate(model, val_ds, val_idx, instance_map=val_map, batch_size=4, chunk_rays=cfg.chunk_rays,
                       keep_images=4)
        write_grid(os.path.join(out, "val_latest.png"), res["images"])
        last_val = {"psnr": res["psnr"], "ssim": res["ssim"], "num_images": res["num_images"]}
        metrics.write({"kind": "val", "step": step_now, "sidelength": ds.sidelength, "psnr": res["psnr"],
                       "ssim": res["ssim"], "num_images": res["num_images"]})
        return res

    total = cfg.total_steps
    end = total if stop_at is None else min(total, stop_at)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    stage = -1
    t0 = time.time()
    model.train()
    with _StopFlag() as stop:
        while step < end:
            if cfg.stage(step) != stage:
                stage = cfg.stage(step)
                S, B = cfg.sidelengths[stage], cfg.batch_sizes[stage]
                ds.set_sidelength(S)
                if val_ds is not None:
                    val_ds.set_sidelength(S)
                b = B // world
            gidx = stream.take(pos, B)
            mine = gidx[rank * b:(rank + 1) * b]
            inp, gt, d0 = prepare_batch([ds[i] for i in mine], mine, cfg.seed, step, cfg.rays_per_view, device,
                                        extra_keys=extra_loss.keys if extra_loss is not None else ())
            with _autocast(cfg, model, device):
                outs = net(inp, d0)
            rgb, depth, z = outs[:3]
            losses = model.losses((rgb.float(), depth.float()), gt, z=None if z is None else z.float())
            if extra_loss is not None:
                xl = extra_loss.loss(outs[3].float(), gt)
                losses["total"] = losses["total"] + xl["total"]
                extra_logs = {f"{extra_loss.name}_{k}": v for k, v in xl.items()}
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            step += 1
            pos += B
            stop_now = stop.flag or step == end
            log_now = step % cfg.log_every == 0 or step == end or stop.flag
            if world > 1:  # one small all-reduce: mean losses for the log and the stop flag
                t = torch.stack([losses[k].detach().float() for k in ("total", "img", "depth_reg", "latent")]
                                + [torch.tensor(float(stop.flag), device=device)])
                dist.all_reduce(t)
                vals = (t[:4] / world).tolist()
                stop_now = stop_now or t[4].item() > 0
            elif log_now:
                vals = [losses[k].item() for k in ("total", "img", "depth_reg", "latent")]
            if main and (log_now or stop_now):
                rec = {"kind": "train", "step": step, "stage": stage, "sidelength": S, "loss": vals[0],
                       "img_loss": vals[1], "depth_reg": vals[2], "latent_loss": vals[3],
                       "train_psnr": float(10 * np.log10(4.0 / max(vals[1], 1e-12))), "time": time.time() - t0}
                if extra_loss is not None:  # rank 0's values (not averaged over processes)
                    rec.update({k: float(v.detach()) for k, v in extra_logs.items()})
                metrics.write(rec)
                bar.set_postfix(loss=f"{vals[0]:.4f}", img=f"{vals[1]:.4f}", psnr=f"{rec['train_psnr']:.1f}",
                                refresh=False)
            bar.update(1)
            if main and val_ds is not None and (step % cfg.val_every == 0 or step == total):
                validate(step)
                bar.set_postfix(loss=f"{vals[0]:.4f}", val_psnr=f"{last_val['psnr']:.2f}", refresh=False)
            if step % cfg.checkpoint_every == 0 or step == end or stop_now:
                save(step)
            if stop_now:
                interrupted = step < end or stop.flag
                break
    bar.close()
    if metrics is not None:
        metrics.close()
    if world > 1:
        dist.barrier()
    if interrupted and main:
        log(f"stopped at step {step}; continue with: python -m srn_fast train --resume {out}")
    return {"step": step, "checkpoint": last_ckpt, "val": last_val, "interrupted": interrupted,
            "model": model, "dataset": ds, "seconds": time.time() - t0}


def _camera_facts(ds) -> Dict:
    """Orbit camera facts of the training data (for ``render`` without a data folder)."""
    from .viz import camera_facts

    inst = ds.instances[0]
    K = inst.intrinsics(ds.sidelength)
    S = ds.sidelength
    poses = [p for it in ds.instances[:32] for p in it.poses]
    return camera_facts(poses, np.array([K[0, 0] / S, K[0, 2] / S, K[1, 2] / S]))


from .fewshot import fit_latents  # noqa: F401,E402  (moved to srn_fast/fewshot.py; re-exported here)
