"""What the commands share: the shared options (:func:`add_shared_options`), the device, argument types, output
folder checks, the few-shot fitting options."""
from __future__ import annotations

import os
from typing import List, Optional

from .errors import UserError


def int_list(text: str) -> List[int]:
    """``"64,128"`` -> ``[64, 128]`` (an argparse type)."""
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 64,128; got {text!r}") from None
    if not vals:
        raise ValueError(f"expected at least one integer, got {text!r}")
    return vals


def check_writable_dir(path: str, what: str = "output folder") -> None:
    """Fail early, with one line, when ``path`` cannot be created or written (nothing is created here)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"{path}: {what} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{path}: {what} is not writable")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot create the {what} ({parent} is not writable)")


BACKENDS = ("auto", "fused", "torch")


def add_shared_options(p, *, device: bool = True, backend: bool = True, seed: Optional[str] = None,
                       given_only: bool = False):
    """The options the commands share, defined once, in a "shared options" group of ``p``:

    * ``--device`` (default auto: cuda if available, else cpu): every command that runs a network;
    * ``--backend`` (default auto: the fused kernels when built): every command that runs an SRN;
    * ``--seed`` (default 0): commands with randomness; ``seed`` says what it seeds (None: no ``--seed``);
    * ``--no-progress``: every command;
    * ``--release-memory``: every command with ``--device``; without it, a run on the CPU keeps freed memory for
      reuse (:func:`srn_fast.cpu_memory.keep_freed_memory_for` on the device :func:`pick_device` resolves, applied by
      :func:`srn_fast.cli.main`); with it, the fused ops' cache of saved buffers (:mod:`srn_fast.ops.buffer_cache`)
      is off too.

    ``given_only``: the argparse defaults are None instead (``train`` tells the options given on the command line
    from the others, for ``--resume``); None then means the default shown, which is the configuration's.
    Returns the group.
    """
    def dflt(v):
        return None if given_only else v

    g = p.add_argument_group("shared options")
    if device:
        g.add_argument("--device", default=dflt("auto"), help="torch device: auto (cuda if available, else cpu), "
                       "cpu, cuda, cuda:N (default: auto)")
    if backend:
        g.add_argument("--backend", default=dflt("auto"), choices=BACKENDS, help="SRN implementation: fused "
                       "C++/CUDA kernels, pure PyTorch, or auto (fused when built) (default: auto)")
    if seed:
        g.add_argument("--seed", type=int, default=dflt(0), help=f"random seed: {seed} (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if device:
        g.add_argument("--release-memory", action="store_true", help="on the CPU, let malloc hand freed memory "
                       "back to the system after every step, and do not cache the fused ops' saved buffers (default: "
                       "keep both for reuse, which saves the page faults of re-allocating them: 64x64 fused "
                       "training steps ~15%% faster; the process then keeps the memory of its largest step)")
    return g


def pick_device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(name)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return d


def add_fit_arguments(g) -> None:
    """The few-shot latent-fitting options shared by ``eval --few-shot`` and ``reconstruct``
    (:func:`srn_fast.fit_latents`); None means "the protocol's default". Their ``--seed`` is the shared one
    (:func:`add_shared_options` with ``seed=FIT_SEED``)."""
    g.add_argument("--protocol", default="fast", choices=["fast", "reference"], help="latent fitting: fast "
                   "(default: best training code as the start, larger lr, each object stops when its fit loss "
                   "stops improving) or reference (fresh N(0, 0.01) codes, Adam lr 5e-5, 100,000 steps)")
    g.add_argument("--fit-steps", type=int, default=None, help="step cap (default: the protocol's: fast 1000, "
                   "reference 100000)")
    g.add_argument("--fit-lr", type=float, default=None, help="Adam learning rate (default: the protocol's)")
    g.add_argument("--fit-init", default=None, choices=["random", "mean", "best"], help="initial codes (default: "
                   "the protocol's)")
    g.add_argument("--fit-rays-per-view", type=int, default=None, help="random pixels per view in each fitting "
                   "step, 0 = every pixel (default: the protocol's)")


FIT_SEED = "of the latent fit (initial codes, rays, marching depths)"


def fit_options(args) -> dict:
    """Keyword arguments for :func:`srn_fast.fit_latents` from :func:`add_fit_arguments`' options."""
    if args.fit_steps is not None and args.fit_steps < 0:
        raise UserError(f"--fit-steps must be >= 0, got {args.fit_steps}")
    if args.fit_lr is not None and not args.fit_lr > 0:
        raise UserError(f"--fit-lr must be > 0, got {args.fit_lr}")
    if args.fit_rays_per_view is not None and args.fit_rays_per_view < 0:
        raise UserError(f"--fit-rays-per-view must be >= 0 (0: every pixel), got {args.fit_rays_per_view}")
    return {"steps": args.fit_steps, "protocol": args.protocol, "seed": args.seed, "lr": args.fit_lr,
            "init": args.fit_init, "rays_per_view": args.fit_rays_per_view, "progress": not args.no_progress}
