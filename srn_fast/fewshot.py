"""Few-shot reconstruction: fit latent codes of objects unseen in training to one or a few posed views, with every
network frozen (the SRN paper's single- and two-shot setting), then render them from anywhere.

Why a new procedure. The reference optimises only the new codes, starting from N(0, 0.01), with Adam at lr 5e-5
for 100,000 steps. Adam moves a code element by at most about lr per step, so 1,000 steps at 5e-5 end within
~0.05 of the start: close to the mean object. :data:`PROTOCOLS` holds both:

- ``"fast"`` (the default, chosen by measurement on generated chairs, see docs/fewshot.md): each
  code starts from the best of the model's training codes on the object's given views, Adam at lr 1e-2 on 256
  random pixels per view and step (the ray noise fits less to the one view than every pixel does), and a plateau
  rule per object: when the object's smoothed fit loss stops improving its learning rate is halved, and below
  ``min_lr`` the object stops. It stops on its own (``steps`` is only a cap), which matters: a code fitted for
  longer at a fixed learning rate overfits its one view and scores worse on the others.
- ``"reference"``: the reference's protocol (fresh N(0, 0.01) codes, Adam lr 5e-5, no schedule, every pixel,
  100,000 steps).

Also available (:class:`FitConfig`): several starts per object with the best kept, and a Gaussian prior fitted
to the training codes; neither improved held-out views in our measurements, so both are off by default.

How it runs. All objects are fitted at once: each step renders the given views of every object that is still
fitting (through the model's backend, the fused kernels when built), each object with its own code, its own loss
(so its own gradient), its own Adam state, learning rate and step count; an object that has stopped is no longer
rendered. Views are processed in chunks of at most ``max_rays`` rays whose gradients add up, so a large set of
objects never needs more memory than one chunk; the result does not depend on the chunking (up to float
rounding). The random ray
subsets and initial marching depths come from a generator per ``(seed, step, view)``, so a fit is reproducible,
does not depend on which other objects are fitted with it (up to float rounding), and its state after N steps
does not depend on the step cap (the ``"fast"`` schedule has no notion of the cap): ``snapshots`` of a long fit
are the fits of the shorter budgets.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .model import DEPTH_REG_WEIGHT, IMG_LOSS_WEIGHT, SRNModel

INITS = ("random", "mean", "best")
SCHEDULES = ("constant", "plateau")


@dataclass(frozen=True)
class FitConfig:
    """One latent-fitting procedure (see :data:`PROTOCOLS` for the named ones).

    Attributes:
        steps: default step cap.
        lr: Adam learning rate at the start (betas 0.9, 0.999, eps 1e-8, as torch.optim.Adam).
        init: ``"random"`` N(0, ``init_std``) codes (the reference), ``"mean"`` the mean of the model's training
            codes, ``"best"`` per object the training code (or their mean) with the lowest image loss on the
            object's given views.
        candidates: with ``init="best"``: how many training codes to try, evenly spaced (0: all of them).
        starts: fits per object from different starts (the ``starts`` best candidates with ``init="best"``,
            independent draws with ``"random"``), run side by side; the one whose code renders the given views
            best (every pixel) is kept.
        init_std: standard deviation of the ``"random"`` init (the reference's 0.01).
        rays_per_view: random pixels per given view in each step (0: every pixel).
        latent_weight: weight of the reference's latent loss ``mean(z^2)`` (1 in the reference).
        prior_weight: weight of ``mean(((z - mu) / sigma)^2)``, a diagonal Gaussian fitted to the model's
            training codes (mean ``mu``, per-dimension standard deviation ``sigma``); 0 turns it off.
        schedule: ``"constant"`` lr, or ``"plateau"``: per object, when its smoothed fit loss has not improved
            by ``rel_tol`` (relative) for ``patience`` steps, its lr is multiplied by ``factor``; once the lr is
            below ``min_lr`` the object stops.
        smoothing: the fit loss is smoothed by an exponential moving average with this decay.
    """

    steps: int = 1000
    lr: float = 1e-2
    init: str = "best"
    candidates: int = 64
    starts: int = 1
    init_std: float = 0.01
    rays_per_view: int = 256
    latent_weight: float = 1.0
    prior_weight: float = 0.0
    schedule: str = "plateau"
    patience: int = 20
    factor: float = 0.5
    min_lr: float = 5e-4
    rel_tol: float = 1e-3
    smoothing: float = 0.9

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"fit_latents: init must be one of {INITS}, got {self.init!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"fit_latents: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.steps < 0:
            raise ValueError(f"fit_latents: steps must be >= 0, got {self.steps}")
        for name in ("lr", "factor", "min_lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"fit_latents: {name} must be > 0, got {getattr(self, name)}")
        if not self.factor < 1:
            raise ValueError(f"fit_latents: factor must be < 1, got {self.factor}")
        if self.rays_per_view < 0:
            raise ValueError(f"fit_latents: rays_per_view must be >= 0 (0: every pixel), got {self.rays_per_view}")
        if self.starts < 1 or (self.starts > 1 and self.init == "mean"):
            raise ValueError(f"fit_latents: starts must be >= 1 (and 1 with init='mean'), got {self.starts}")
        if self.candidates < 0 or self.patience < 1 or not 0 <= self.smoothing < 1:
            raise ValueError(f"fit_latents: candidates must be >= 0, patience >= 1 and smoothing in [0, 1), got "
                             f"{self.candidates}, {self.patience}, {self.smoothing}")
        if self.latent_weight < 0 or self.prior_weight < 0 or self.rel_tol < 0:
            raise ValueError("fit_latents: latent_weight, prior_weight and rel_tol must be >= 0")


PROTOCOLS: Dict[str, FitConfig] = {
    "fast": FitConfig(),
    "reference": FitConfig(steps=100000, lr=5e-5, init="random", rays_per_view=0, latent_weight=1.0,
                           prior_weight=0.0, schedule="constant"),
}


def protocol_config(protocol: str = "fast", **overrides) -> FitConfig:
    """The :class:`FitConfig` of a named protocol with some fields replaced (None values are ignored)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"fit_latents: protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"fit_latents: unknown option(s) {bad}; expected some of {sorted(fields)}")
    return dataclasses.replace(PROTOCOLS[protocol], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class FitResult:
    """What :func:`fit_latents` returns.

    Attributes:
        model: a copy of the input model whose latent codes are the fitted ones (``num_instances`` = objects).
        codes: ``[n, D]`` the fitted codes (also ``model.latent_codes.weight``).
        history: one dict per step: ``step``, ``loss`` and ``img_loss`` (means over the objects still fitting),
            ``active`` (how many were).
        loss_per_object: ``[T, n]`` each object's fit loss per step (NaN after it stopped).
        steps_taken: ``[n]`` steps each object took (less than the cap when it stopped on its own).
        seconds: wall time of the whole fit (initialisation included), for all objects together.
        snapshots: ``{step: [n, D] codes after that step}`` for the requested steps (a stopped object's final
            code; after the last step taken when the fit ended earlier).
        snapshot_seconds: ``{step: wall time of the fit up to that step}``.
        start_codes: ``[n, K, D]`` the final code of every start (K = ``config.starts``).
        chosen_start: ``[n]`` the start kept per object.
        config, protocol: the procedure used.
    """

    model: SRNModel
    codes: torch.Tensor
    history: List[Dict]
    loss_per_object: np.ndarray
    steps_taken: List[int]
    seconds: float
    snapshots: Dict[int, torch.Tensor]
    snapshot_seconds: Dict[int, float]
    start_codes: torch.Tensor
    chosen_start: torch.Tensor
    config: FitConfig
    protocol: str

    def summary(self) -> Dict:
        """JSON-ready facts of the fit (no tensors)."""
        n = len(self.steps_taken)
        return {"protocol": self.protocol, "config": dataclasses.asdict(self.config), "objects": n,
                "steps_taken": list(self.steps_taken), "mean_steps_taken": float(np.mean(self.steps_taken)),
                "seconds": self.seconds, "seconds_per_object": self.seconds / max(n, 1),
                "final_loss": self.history[-1]["loss"] if self.history else None}

    def thinned_history(self, max_points: int = 2000) -> List[Dict]:
        """``history`` at most ``max_points`` evenly spaced entries long, the last step always included."""
        h = self.history
        if len(h) <= max_points:
            return list(h)
        keep = np.unique(np.linspace(0, len(h) - 1, max_points).round().astype(int))
        return [h[k] for k in keep]


class PerObjectAdam:
    """Adam over the rows of ``codes [n, D]``, each row with its own moments, step count and learning rate.

    ``step(rows, grad)`` updates only ``rows`` (the objects still fitting); with equal learning rates and every
    row updated each step it is torch.optim.Adam (betas 0.9/0.999, eps 1e-8) on the whole tensor. Step counts
    and learning rates (``t``, ``lr``, ``[n]``) live on the CPU, the moments beside the codes.
    """

    def __init__(self, codes: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        n = codes.shape[0]
        self.codes = codes                                     # [n, D], updated in place
        self.m = torch.zeros_like(codes)                       # [n, D]
        self.v = torch.zeros_like(codes)                       # [n, D]
        self.t = torch.zeros(n, dtype=torch.long)              # [n] steps taken per row
        self.lr = torch.full((n,), float(lr), dtype=torch.float64)  # [n]
        self.b1, self.b2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """``rows [k]`` indices of the rows to update, ``grad [k, D]`` their gradients."""
        rc, rd = rows.cpu(), rows.to(self.codes.device)
        self.t[rc] += 1
        t = self.t[rc].double()
        m = self.m[rd].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[rd].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.m[rd], self.v[rd] = m, v
        bc1 = (1 - self.b1 ** t).to(grad)[:, None]                             # [k, 1]
        bc2 = (1 - self.b2 ** t).to(grad)[:, None]
        lr = self.lr[rc].to(grad)[:, None]
        self.codes[rd] -= lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)


class _Views:
    """The given views of every object, loaded once: ``rgb [V, N, 3]``, ``pose [V, 4, 4]``, ``K [V, 4, 4]`` (or
    3x3), ``uv [V, N, 2]``, ``obj [V]`` (object index of each view)."""

    def __init__(self, dataset):
        if getattr(dataset, "num_rays", None) is not None:
            raise ValueError("fit_latents: the dataset must yield whole views (num_rays=None); choose the number "
                             "of rays per step with rays_per_view")
        if len(dataset) == 0:
            raise ValueError("fit_latents: the dataset holds no views to fit")
        samples = [dataset[i] for i in range(len(dataset))]
        self.rgb = torch.stack([s["rgb"] for s in samples]).float()
        self.pose = torch.stack([s["pose"] for s in samples]).float()
        self.K = torch.stack([s["intrinsics"] for s in samples]).float()
        self.uv = torch.stack([s["uv"] for s in samples]).float()
        self.obj = torch.stack([torch.as_tensor(s["instance_idx"]) for s in samples]).long().reshape(-1)
        n = getattr(dataset, "num_instances", None)
        self.n = int(self.obj.max()) + 1 if n is None else int(n)
        counts = torch.bincount(self.obj, minlength=self.n)
        if (counts == 0).any():
            raise ValueError(f"fit_latents: object(s) {torch.nonzero(counts == 0).flatten().tolist()[:5]} have no "
                             f"view to fit")
        self.views_per_obj = counts                                            # [n]

    def repeat(self, k: int) -> "_Views":
        """The views of ``n * k`` fitting units: unit ``i * k + j`` is start j of object i (its views repeated)."""
        if k == 1:
            return self
        out = copy.copy(self)
        for name in ("rgb", "pose", "K", "uv"):
            setattr(out, name, getattr(self, name).repeat_interleave(k, dim=0))
        out.obj = (self.obj[:, None] * k + torch.arange(k)).reshape(-1)
        out.n = self.n * k
        out.views_per_obj = self.views_per_obj.repeat_interleave(k)
        return out


# step keys of the draws that are not fitting steps
KEY_SEARCH, KEY_SELECT = -2, -1


def _draws(views: _Views, rows: torch.Tensor, R: int, seed: int, step: int):
    """Ray subset ``[k, R]`` (None when R is 0: every pixel) and initial depths ``[k, R, 1]`` of views ``rows``
    at ``step`` (>= 0, or one of the keys above). Each view's draw comes from its own generator keyed by
    (seed, step, view), so it does not depend on which other views are being fitted."""
    N = views.uv.shape[1]
    R = N if R <= 0 or R >= N else R
    sel, d0 = [], []
    for r in rows.tolist():
        st = np.random.SeedSequence([int(seed), int(step) + 2, int(r)]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(st[0]) << 32 | int(st[1]))
        if R < N:
            sel.append(torch.randperm(N, generator=g)[:R])
        d0.append(torch.empty(R, 1).normal_(mean=0.05, std=5e-4, generator=g))
    return (torch.stack(sel) if sel else None), torch.stack(d0)                          # [k, R], [k, R, 1]


def _per_view_losses(model: SRNModel, views: _Views, rows: torch.Tensor, z: torch.Tensor, sel, d0,
                     device) -> Dict[str, torch.Tensor]:
    """Render views ``rows`` with codes ``z [k, D]``; per view ``img [k]`` (mean squared colour error) and
    ``depth [k]`` (the reference's negative-depth regulariser)."""
    uv, rgb = views.uv[rows], views.rgb[rows]
    if sel is not None:
        uv = torch.gather(uv, 1, sel[..., None].expand(-1, -1, 2))
        rgb = torch.gather(rgb, 1, sel[..., None].expand(-1, -1, 3))
    inp = {"z": z, "pose": views.pose[rows].to(device), "intrinsics": views.K[rows].to(device), "uv": uv.to(device)}
    out = model.render(inp, initial_depth=d0.to(device))
    img = ((out["rgb"].float() - rgb.to(device)) ** 2).mean(dim=(1, 2))                   # [k]
    depth = (torch.clamp(out["depth"].float(), max=0.0) ** 2).mean(dim=(1, 2)) * 10000.0  # [k]
    return {"img": img, "depth": depth}


def _prior(model: SRNModel):
    """(mean ``[D]``, std ``[D]``) of the model's training codes (std floored at 1e-3; 1 with a single code)."""
    W = model.latent_codes.weight.detach().float()
    mu = W.mean(0)
    sd = W.std(0, unbiased=False).clamp_min(1e-3) if W.shape[0] > 1 else torch.ones_like(mu)
    return mu, sd


@torch.no_grad()
def _image_loss(model: SRNModel, views: _Views, z_of_row, R: int, seed: int, key: int, device,
                max_rays: int) -> torch.Tensor:
    """``[n]`` each object's image loss summed over its views, rendered without grad with codes
    ``z_of_row(rows) -> [k, D]``; rays and initial depths drawn with step key ``key``."""
    V = views.obj.shape[0]
    rows = torch.arange(V)
    sel, d0 = _draws(views, rows, R, seed, key)
    chunk = max(1, max_rays // d0.shape[1])
    loss = torch.zeros(views.n, dtype=torch.float64)
    for s in range(0, V, chunk):
        r = rows[s:s + chunk]
        img = _per_view_losses(model, views, r, z_of_row(r).to(device), None if sel is None else sel[s:s + chunk],
                               d0[s:s + chunk], device)["img"]
        loss.index_add_(0, views.obj[r], img.double().cpu())
    return loss


def _best_codes(model: SRNModel, W: torch.Tensor, views: _Views, cfg: FitConfig, seed: int, device,
                max_rays: int, progress: bool) -> torch.Tensor:
    """``[n, K, D]``: per object the K candidate codes (rows of the training codes ``W [M, D]``, evenly spaced,
    and their mean) whose renders of the object's given views have the lowest image loss, best first."""
    k = W.shape[0] if cfg.candidates == 0 else min(cfg.candidates, W.shape[0])
    pick = np.unique(np.linspace(0, W.shape[0] - 1, k).round().astype(int))
    cands = torch.cat([W.mean(0, keepdim=True), W[torch.as_tensor(pick)]]).float()     # [C, D]
    if cfg.starts > cands.shape[0]:
        raise ValueError(f"fit_latents: starts={cfg.starts} but only {cands.shape[0]} candidate codes (the "
                         f"model's training codes and their mean)")
    loss = torch.stack([_image_loss(model, views, lambda r, c=c: cands[c].expand(len(r), -1), cfg.rays_per_view,
                                    seed, KEY_SEARCH, device, max_rays)
                        for c in tqdm(range(cands.shape[0]), desc="initial codes", unit="code", disable=not progress,
                                      leave=False)])                                   # [C, n]
    order = loss.argsort(0)[:cfg.starts]                                                # [K, n]
    return cands[order].transpose(0, 1).clone()                                         # [n, K, D]


def _select(model: SRNModel, views: _Views, units: torch.Tensor, K: int, seed: int, device,
            max_rays: int) -> torch.Tensor:
    """``[n]`` per object the start (0..K-1) whose code (``units [n * K, D]``) renders the object's given views
    with the lowest image loss, every pixel, the same initial depths for every start."""
    if K == 1:
        return torch.zeros(views.n, dtype=torch.long)
    loss = torch.stack([_image_loss(model, views, lambda r, j=j: units[views.obj[r].to(units.device) * K + j], 0,
                                    seed, KEY_SELECT, device, max_rays) for j in range(K)])  # [K, n]
    return loss.argmin(0)


def with_codes(model: SRNModel, codes: torch.Tensor) -> SRNModel:
    """A copy of ``model`` (frozen, eval mode) whose latent codes are ``codes [n, D]``."""
    new = copy.deepcopy(model)
    new.latent_codes = nn.Embedding(codes.shape[0], codes.shape[1]).to(codes.device)
    with torch.no_grad():
        new.latent_codes.weight.copy_(codes)
    new.num_instances = codes.shape[0]
    for p in new.parameters():
        p.requires_grad_(False)
    return new.eval()


def fit_latents(model: SRNModel, dataset, steps: Optional[int] = None, protocol: str = "fast", *, seed: int = 0,
                max_rays: int = 65536, snapshots: Sequence[int] = (), progress: bool = True,
                **options) -> FitResult:
    """Fit one new latent code per object of ``dataset`` to its views, every network of ``model`` frozen.

    Args:
        model: a trained hypernetwork SRN; it is not modified.
        dataset: the given views of the new objects, whole images, e.g.
            ``SRNDataset(root, sidelength=S, specific_observation_idcs=[0])`` (one view each) or ``[0, 10]``;
            its ``instance_idx`` numbers the objects (codes come back in that order).
        steps: step cap (default: the protocol's: 1,000 for ``"fast"``, 100,000 for ``"reference"``). The
            ``"fast"`` protocol usually stops each object earlier, when its fit loss stops improving.
        protocol: ``"fast"`` (default) or ``"reference"``, see :data:`PROTOCOLS` and the module docstring.
        seed: seeds the random init, ray subsets and initial marching depths.
        max_rays: rays rendered per forward/backward chunk (memory bound; results do not depend on it).
        snapshots: steps after which to keep a copy of the codes (``FitResult.snapshots``).
        progress: a tqdm bar.
        **options: fields of :class:`FitConfig` to override (``lr``, ``init``, ``rays_per_view``,
            ``prior_weight``, ``schedule``, ...); None values keep the protocol's.

    Defaults (``"fast"``, chosen by measurement, see docs/fewshot.md): start from the best of 64
    training codes (evenly spaced, and their mean) on the given views; Adam at lr 1e-2; 256 random pixels per
    given view each step; the reference's losses (200 MSE + 1e-3 depth regulariser + 1 mean(z^2)), no extra
    prior; plateau rule: patience 20 steps, rel_tol 1e-3 on the loss smoothed with decay 0.9, lr halved, the
    object stops once its lr is below 5e-4 (typically after 250-350 steps); cap 1,000 steps; one start.

    Returns a :class:`FitResult` (fitted model, codes, per-step fit-loss history, steps taken, wall time).
    """
    if model.fit_single_srn:
        raise ValueError("fit_latents: a single-SRN model (fit_single_srn) has no latent codes to fit")
    if not hasattr(model, "latent_codes"):
        raise ValueError("fit_latents: the model has no latent codes")
    cfg = protocol_config(protocol, steps=steps, **options)
    if max_rays < 1:
        raise ValueError(f"fit_latents: max_rays must be >= 1, got {max_rays}")
    t0 = time.time()
    device = next(model.parameters()).device
    views = _Views(dataset)
    n, D, K = views.n, model.latent_dim, cfg.starts
    frozen = with_codes(model, model.latent_codes.weight.detach()[:1])   # a frozen copy: grads reach only z
    frozen.latent_codes = None
    frozen.train()
    W = model.latent_codes.weight.detach().float()

    # fitting units: unit i * K + j is start j of object i, with its own code, loss, Adam state and lr
    if cfg.init == "random":
        g = torch.Generator().manual_seed(int(seed))
        codes = torch.randn(n * K, D, generator=g) * cfg.init_std
    elif cfg.init == "mean":
        codes = W.mean(0, keepdim=True).repeat(n, 1)
    else:
        codes = _best_codes(frozen, W, views, cfg, seed, device, max_rays, progress).reshape(n * K, D)
    codes = codes.to(device)
    units = views.repeat(K)
    mu, sd = (t.to(device) for t in _prior(model))
    opt = PerObjectAdam(codes, cfg.lr)
    active = torch.ones(n * K, dtype=torch.bool)
    ema = torch.full((n * K,), math.nan, dtype=torch.float64)
    best = torch.full((n * K,), math.inf, dtype=torch.float64)
    bad = torch.zeros(n * K, dtype=torch.long)
    history: List[Dict] = []
    per_obj: List[np.ndarray] = []
    vcount = units.views_per_obj.to(torch.float64)

    def chosen():  # ([n, D] each object's kept code, [n] its start)
        pick = _select(frozen, views, codes.detach(), K, seed, device, max_rays)
        return codes.detach()[torch.arange(n, device=device) * K + pick.to(device)].clone(), pick

    snaps: Dict[int, Optional[torch.Tensor]] = {int(s): None for s in snapshots if 0 <= int(s)}
    snap_t: Dict[int, float] = {}
    if 0 in snaps:
        snaps[0], snap_t[0] = chosen()[0].cpu(), time.time() - t0
    bar = tqdm(range(cfg.steps), desc=f"fit latents ({protocol})", unit="step", disable=not progress, leave=False)
    for step in bar:
        live = torch.nonzero(active).flatten()                                          # [a] units still fitting
        if len(live) == 0:
            break
        rows = torch.nonzero(active[units.obj]).flatten()                              # [k] views to render
        sel, d0 = _draws(units, rows, cfg.rays_per_view, seed, step)
        chunk = max(1, max_rays // d0.shape[1])
        grad = torch.zeros(n * K, D, device=device)
        img_sum = torch.zeros(n * K, dtype=torch.float64)
        tot_sum = torch.zeros(n * K, dtype=torch.float64)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            o = units.obj[r]
            z = codes[o.to(device)].detach().requires_grad_(True)                       # [c, D] one row per view
            lv = _per_view_losses(frozen, units, r, z, None if sel is None else sel[s:s + chunk],
                                  d0[s:s + chunk], device)
            w = (1.0 / vcount[o]).to(device=device, dtype=torch.float32)              # mean over a unit's views
            # each unit's loss: 200 * img + 1e-3 * depth reg (means over its views) + latent terms of its code,
            # written per view row so that the rows of one unit add up to exactly that
            lat = cfg.latent_weight * (z ** 2).mean(1)
            if cfg.prior_weight > 0:
                lat = lat + cfg.prior_weight * (((z - mu) / sd) ** 2).mean(1)
            total = w * (IMG_LOSS_WEIGHT * lv["img"] + DEPTH_REG_WEIGHT * lv["depth"] + lat)       # [c]
            total.sum().backward()
            grad.index_add_(0, o.to(device), z.grad)
            img_sum.index_add_(0, o, (w * lv["img"]).detach().double().cpu())
            tot_sum.index_add_(0, o, total.detach().double().cpu())
        opt.step(live, grad[live.to(device)])
        row = np.full(n * K, np.nan)
        row[live.numpy()] = tot_sum[live].numpy()
        per_unit = row.reshape(n, K)                                                     # best start per object
        fin = np.isfinite(per_unit)
        per_obj.append(np.where(fin.any(1), np.where(fin, per_unit, np.inf).min(1), np.nan))
        history.append({"step": step + 1, "loss": float(tot_sum[live].mean()), "img_loss": float(img_sum[live].mean()),
                        "active": int(active.reshape(n, K).any(1).sum())})
        if cfg.schedule == "plateau":
            cur, prev = tot_sum[live], ema[live]
            sm = torch.where(torch.isnan(prev), cur, cfg.smoothing * prev + (1 - cfg.smoothing) * cur)
            ema[live] = sm
            improved = sm < best[live] * (1 - cfg.rel_tol)
            best[live] = torch.where(improved, sm, best[live])
            bad[live] = torch.where(improved, torch.zeros_like(bad[live]), bad[live] + 1)
            cut = live[bad[live] >= cfg.patience]
            if len(cut):
                opt.lr[cut] *= cfg.factor
                bad[cut] = 0
                best[cut] = ema[cut]
                active[cut[opt.lr[cut] < cfg.min_lr]] = False
        if step + 1 in snaps:
            snaps[step + 1], snap_t[step + 1] = chosen()[0].cpu(), time.time() - t0
        if progress:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", fitting=int(active.sum()), refresh=False)
    bar.close()
    final, pick = chosen()
    seconds = time.time() - t0
    for s in snaps:
        if snaps[s] is None:  # the fit ended before this step (every object stopped, or the cap): codes are final
            snaps[s], snap_t[s] = final.cpu(), seconds
    steps_taken = opt.t.reshape(n, K).max(1).values.tolist()
    result_model = with_codes(model, final)
    return FitResult(model=result_model, codes=final.cpu(), history=history,
                     loss_per_object=np.stack(per_obj) if per_obj else np.zeros((0, n)), steps_taken=steps_taken,
                     seconds=seconds, snapshots=snaps, snapshot_seconds=snap_t,
                     start_codes=codes.detach().reshape(n, K, D).cpu(), chosen_start=pick, config=cfg,
                     protocol=protocol)
