"""The parts the training loop (:mod:`srn_fast.train_loop`) is built from: the run configuration
(:class:`TrainConfig`, saved as ``RUN/config.json``), the data stream (:class:`BatchStream`, :func:`prepare_batch`),
the extra-loss hook (:class:`ExtraLoss`), the metrics log (:class:`MetricsLog`), device, DDP and RNG-state helpers.
:mod:`srn_fast.training` is the public entry point (:func:`srn_fast.training.train`) and re-exports the public names.

Determinism (what makes resume and DDP exact): the order of training views is a stream of seeded permutations
of the dataset, one per epoch, cut into global batches; the random ray subset and the initial marching depths of a
sample come from a generator seeded by (seed, step, dataset index). So a run's inputs depend on neither the number
of processes nor on where it was interrupted, and a resumed run sees exactly the batches it would have seen.
Under DDP rank r takes rows ``[r * B / W, (r + 1) * B / W)`` of each global batch of size B (a distributed sampler
that shards batches rather than epochs, so W processes see the same global batches as one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Union, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import files
from .evaluation import collate
from .model import SRNModel
from .ops.precision import bf16_pays


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
    bf16: Union[bool, str] = False  # True, False or "auto" (bf16 where it is faster here)
    march_mode: str = "auto"
    init_checkpoint: Optional[str] = None
    device: str = "auto"
    chunk_rays: int = 8192
    collapse_warmup: int = 500
    collapse_patience: int = 200
    stop_on_collapse: bool = False

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
        for name, lo in (("checkpoint_every", 1), ("log_every", 1), ("collapse_patience", 1), ("val_every", 0),
                         ("collapse_warmup", 0), ("keep_checkpoints", 0), ("val_views", 1), ("chunk_rays", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.bf16 not in (True, False, "auto"):
            raise ValueError(f"--bf16 takes no value or 'auto', got {self.bf16!r}")
        if self.march_mode not in ("auto", "recompute", "store"):
            raise ValueError(f"--march-mode must be auto, recompute or store, got {self.march_mode!r}")

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
    """bf16: matmul_dtype on the fused backend, torch.autocast on the torch backend ("auto": where bf16 pays)."""
    want = cfg.bf16 is True or (cfg.bf16 == "auto" and bf16_pays(device))
    if not want or model.backend_name == "fused":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _dist_info(device: torch.device):
    """(rank, world size, local rank); under torchrun the process group is joined first, with the backend of the
    process's device (NCCL on a GPU, gloo on the CPU: `--device cpu` on a GPU machine trains on the CPU)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _local_rank()
    return 0, 1, 0


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """The process's device: auto is CUDA where available; a CUDA device without an index is the GPU of the
    process's local rank (one GPU per process under torchrun), which must exist."""
    if cfg.device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    d = torch.device("cuda" if cfg.device == "auto" else cfg.device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    if d.type == "cuda" and d.index is None:
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"--device {cfg.device}: the process of local rank {local_rank} needs GPU {local_rank} "
                             f"but this machine has {n}; start at most {n} processes per node or pass --device cpu")
        d = torch.device("cuda", local_rank)
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
            files.write_text(path, "".join(keep))
        self.fh = open(path, "a")

    def write(self, rec: Dict) -> None:
        self.fh.write(files.strict_json(rec) + "\n")  # strict JSON: NaN/inf become null
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


def camera_facts_of(ds) -> Dict:
    """Orbit camera facts of the training data (for ``render`` without a data folder)."""
    from .viz import camera_facts

    inst = ds.instances[0]
    K = inst.intrinsics(ds.sidelength)
    S = ds.sidelength
    poses = [p for it in ds.instances[:32] for p in it.poses]
    return camera_facts(poses, np.array([K[0, 0] / S, K[0, 2] / S, K[1, 2] / S]))

