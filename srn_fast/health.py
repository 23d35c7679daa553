"""Training health: non-finite losses and the constant-image collapse, detected from what a step computes anyway.

**Non-finite loss.** Each step ORs ``not isfinite(loss)`` into a flag on the device (no host sync) and remembers
the first such step; the loop reads the flag whenever it syncs anyway (logging) and before every checkpoint or
validation, and stops with :class:`NonFiniteLossError` before anything new is written.

**Collapse.** With a learning rate well above the reference's 5e-5 and a wide model, SRN can collapse to a
constant image: the ray marcher overshoots every surface (depths far beyond the object), every pixel takes the
background colour, and the loss sits at the mean-colour level. :func:`batch_stats` measures, per step and on
the training batch, the spatial variance of the rendered colours (over each view's rays, averaged over views) and
of the targets, and the mean marched depth; :class:`CollapseMonitor` watches them at each log step. A colour
variance below :data:`COLLAPSE_RATIO` (2 %) of the targets' together with a mean depth beyond ``depth_limit``
(the trainer passes twice the cameras' median distance from the scene centre), for ``patience`` steps, at a step
past ``warmup``, is a collapse. Early in every run the colours are nearly constant for a while too (the model
fits the mean colour before the marcher finds the surfaces: 50-400 steps in our small CPU runs), but then the
depths are still short of the surfaces; the depth condition tells the two apart, the warm-up is a margin.
Measured (generated chairs, cameras 1.5 from the centre): collapsed runs marched to mean depths of 5.6-14 and
stayed there; good runs settled at 1.1-1.9 within 25-400 steps (slow starts below that, never beyond 3 after the
first few steps).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

COLLAPSE_RATIO = 0.02  # rendered colour variance below 2 % of the targets' = a constant image
MIN_TARGET_VARIANCE = 1e-4  # targets with less variance than this (blank images) say nothing


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; nothing was saved after the last good checkpoint."""


def batch_stats(rgb: torch.Tensor, target: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """``[4]`` detached float tensor (on the device, no sync): rendered colour variance, target colour variance
    (each the variance over a view's rays, summed over channels, mean over views), mean depth, mean depth spread
    (std over a view's rays). ``rgb``/``target`` ``[b, R, 3]``, ``depth`` ``[b, R, 1]``."""
    with torch.no_grad():
        rgb, target, depth = rgb.detach().float(), target.detach().float(), depth.detach().float()
        if rgb.shape[1] < 2:
            z = torch.zeros((), device=rgb.device)
            return torch.stack([z, z, depth.mean(), z])
        vp = rgb.var(dim=1).sum(-1).mean()
        vt = target.var(dim=1).sum(-1).mean()
        return torch.stack([vp, vt, depth.mean(), depth.std(dim=1).mean()])


class CollapseMonitor:
    """Decides, from the colour-variance ratio seen at each log step, whether training has collapsed.

    ``warmup``: no verdict before this step (0 turns the check off). ``patience``: the ratio must have stayed
    below :data:`COLLAPSE_RATIO`, and the mean depth above ``depth_limit`` (None: no depth condition), at every
    log step for at least this many steps. :meth:`update` returns an event dict the first time all hold, else
    None; the verdict is given once per run.
    """

    def __init__(self, warmup: int = 500, patience: int = 200, threshold: float = COLLAPSE_RATIO,
                 depth_limit: Optional[float] = None):
        self.warmup, self.patience, self.threshold = int(warmup), int(patience), float(threshold)
        self.depth_limit = depth_limit
        self.low_since: Optional[int] = None  # first step of the current low-ratio streak
        self.last_step = 0
        self.reported = False

    def state_dict(self) -> Dict:
        return {"low_since": self.low_since, "last_step": self.last_step, "reported": self.reported}

    def load_state_dict(self, st: Dict) -> None:
        self.low_since, self.last_step = st.get("low_since"), int(st.get("last_step", 0))
        self.reported = bool(st.get("reported", False))

    def update(self, step: int, rgb_var: float, target_var: float, depth_mean: float,
               depth_spread: float) -> Optional[Dict]:
        """Feed the means over the steps since the previous log step (ending at ``step``)."""
        first = self.last_step + 1  # the window this measurement covers began here
        self.last_step = step
        if self.warmup <= 0 or target_var < MIN_TARGET_VARIANCE:
            self.low_since = None
            return None
        ratio = rgb_var / target_var
        if ratio >= self.threshold or (self.depth_limit is not None and not depth_mean > self.depth_limit):
            self.low_since = None
            return None
        if self.low_since is None:
            self.low_since = first
        if self.reported or step < self.warmup or step - self.low_since + 1 < self.patience:
            return None
        return self._event(step, ratio, depth_mean, depth_spread)

    def _event(self, step: int, ratio: float, depth_mean: float, depth_spread: float) -> Dict:
        self.reported = True
        return {"kind": "health", "event": "collapse", "step": step, "since": self.low_since,
                "rgb_var_ratio": ratio, "depth_mean": depth_mean, "depth_spread": depth_spread,
                "depth_limit": self.depth_limit}

    def at_end(self, step: int, rgb_var: float, target_var: float, depth_mean: float,
               depth_spread: float) -> Optional[Dict]:
        """The verdict at the end of the schedule, after :meth:`update` of the last log step: a streak of
        collapsed log steps that began after the warm-up and covers at least a quarter of ``patience`` counts,
        so that a run which collapses late (the last checkpoint a constant image) is reported too."""
        if self.reported or self.low_since is None or self.warmup <= 0 or step < self.warmup:
            return None
        if step - self.low_since + 1 < max(1, self.patience // 4):
            return None
        return self._event(step, rgb_var / target_var, depth_mean, depth_spread)


def collapse_message(event: Dict, cfg) -> str:
    """The one warning a collapsed run prints (and writes into metrics.jsonl), naming cause and fixes."""
    fixes = "a lower --lr (the reference's 5e-5)"
    if cfg.phi_hidden > 64:
        fixes += (f" or a narrower model (--phi-hidden {cfg.phi_hidden} is wide for --lr {cfg.lr:g}; "
                  f"--phi-hidden 64 trains at --lr 1e-3 on the demo's chairs)")
    depth = f"mean marched depth {event['depth_mean']:.2f}"
    if event.get("depth_limit") is not None:
        depth += (f", past every surface: twice the cameras' distance from the scene centre is "
                  f"{event['depth_limit']:.2f}")
    return (f"warning: training looks collapsed to a constant image: since step {event['since']} the rendered "
            f"colours have {event['rgb_var_ratio']:.2%} of the targets' variance ({depth}). Likely cause: a "
            f"learning rate too high for this model (--lr {cfg.lr:g}, --phi-hidden {cfg.phi_hidden}, "
            f"--tracing-steps {cfg.tracing_steps}). Fix: start again with {fixes}; --stop-on-collapse stops such a "
            f"run by itself.")
