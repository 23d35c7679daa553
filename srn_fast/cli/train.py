"""``python -m srn_fast train``: the reference SRN training (see :mod:`srn_fast.training`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import UserError
from .common import add_shared_options, check_writable_dir, int_list

HELP = "train an SRN (auto-decoder over the training objects) with checkpoints, validation and exact resume"


def _bf16_value(text: str):
    if text != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', got {text!r}")
    return "auto"


def add_arguments(p):
    # Defaults are None here and filled in from TrainConfig (the reference's values), so that on --resume the
    # options given explicitly are known: those are checked against the run's own (srn_fast.train_loop).
    from ..training import TrainConfig

    d0 = TrainConfig()

    def dflt(name):
        v = getattr(d0, name)
        return ",".join(map(str, v)) if isinstance(v, list) else v

    p.add_argument("--data", help="SRN data: a folder of instance folders, or of train/ (and test/ for validation)")
    p.add_argument("--out", help="run folder: checkpoints/, metrics.jsonl, config.json, val_latest.png")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest readable checkpoint with its saved "
                   "config; options given with it must be safe to change (more steps, logging intervals, --lr, "
                   "...): others are an error")
    g = p.add_argument_group("schedule (defaults: the reference's)")
    g.add_argument("--sidelengths", type=int_list,
                   help=f"image size per stage, e.g. 64,128 (default {dflt('sidelengths')})")
    g.add_argument("--batch-sizes", type=int_list,
                   help=f"views per step per stage, e.g. 64,16 (default {dflt('batch_sizes')})")
    g.add_argument("--steps", type=int_list, help=f"steps per stage, e.g. 5000,170000 (default {dflt('steps')})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {dflt('lr')})")
    g.add_argument("--rays-per-view", type=int, help="random rays per view (default: every pixel)")
    m = p.add_argument_group("model (defaults: the reference's)")
    for name in ("latent_dim", "tracing_steps", "phi_hidden", "phi_layers", "rendering_layers", "lstm_hidden"):
        m.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {dflt(name)}")
    m.add_argument("--fit-single-srn", action="store_true", default=None, help="one SRN for one scene, no hypernetwork")
    m.add_argument("--march-mode", choices=["auto", "recompute", "store"],
                   help="fused backend: 'recompute' keeps only ~100 numbers per ray and step and recomputes "
                        "activations in backward (least memory); 'store' keeps them (~25%% faster, more memory); "
                        "'auto' (default) stores when that fits a quarter of the free memory")
    m.add_argument("--bf16", nargs="?", const=True, default=None, type=_bf16_value, metavar="auto",
                   help="bf16 matmuls (fused backend; float32 accumulation) / autocast (torch backend); "
                        "'--bf16 auto': only where this machine runs bf16 matmuls faster (measured)")
    d = p.add_argument_group("data selection")
    d.add_argument("--max-num-instances", type=int, help="default -1 (all)")
    d.add_argument("--max-observations", type=int, help="evenly spaced views per object (default -1: all)")
    d.add_argument("--specific-observation-idcs", type=int_list)
    d.add_argument("--val-data", help="held-out views of the training objects (default DATA/test)")
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--val-every", type=int, help=f"steps between validations (0: none; default {dflt('val_every')})")
    o.add_argument("--val-views", type=int, help=f"default {dflt('val_views')}")
    o.add_argument("--checkpoint-every", type=int, help=f"default {dflt('checkpoint_every')}")
    o.add_argument("--keep-checkpoints", type=int, help=f"newest checkpoints kept (0 = all; default "
                   f"{dflt('keep_checkpoints')})")
    o.add_argument("--log-every", type=int, help=f"default {dflt('log_every')}")
    o.add_argument("--init-checkpoint", help="start from these weights (ours or a reference .pth)")
    o.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint after this global step")
    o.add_argument("--overwrite", action="store_true", help="replace an existing run in --out (once the new run "
                   "has its first checkpoint; until then the old run stays)")
    h = p.add_argument_group("training health")
    h.add_argument("--collapse-warmup", type=int, help=f"no collapse verdict before this step (0: no check; "
                   f"default {dflt('collapse_warmup')})")
    h.add_argument("--collapse-patience", type=int, help=f"steps the rendered images must stay nearly constant "
                   f"to count as collapsed (default {dflt('collapse_patience')})")
    h.add_argument("--stop-on-collapse", action="store_true", default=None,
                   help="stop (with a checkpoint, exit code 3) when training collapses to a constant image")
    add_shared_options(p, seed="of the view order, ray subsets, initial depths and weights", given_only=True)


CONFIG_FIELDS = ["data", "out", "sidelengths", "batch_sizes", "steps", "lr", "latent_dim", "tracing_steps",
                 "fit_single_srn", "phi_hidden", "phi_layers", "rendering_layers", "lstm_hidden", "rays_per_view",
                 "max_num_instances", "max_observations", "specific_observation_idcs", "val_data", "val_every",
                 "val_views", "checkpoint_every", "keep_checkpoints", "log_every", "seed", "bf16", "march_mode",
                 "init_checkpoint", "collapse_warmup", "collapse_patience", "stop_on_collapse", "backend",
                 "device"]
EXIT_COLLAPSED = 3


def given(args) -> dict:
    """The TrainConfig fields the user gave on the command line."""
    return {k: getattr(args, k) for k in CONFIG_FIELDS if getattr(args, k, None) is not None}


def run(args) -> int:
    from ..health import NonFiniteLossError
    from ..training import TrainConfig, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    opts = given(args)
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues a run and --overwrite replaces it: pass one of them")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise UserError(f"--out {args.out}: --resume continues {args.resume} in place (drop --out, or start a "
                            f"new run with --data and --out)")
        cfg_path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{args.resume}: not a run folder (no config.json); start it with --data and --out")
        with open(cfg_path) as fh:
            saved = json.load(fh)
        opts.update(out=args.resume)
        cfg = TrainConfig.from_json(dict(saved, **opts))
        check_writable_dir(cfg.out, "run folder")
    else:
        if not args.data or not args.out:
            raise UserError("train needs --data DIR and --out RUN (or --resume RUN)")
        cfg = TrainConfig(**opts)
        if main_rank:
            check_writable_dir(cfg.out, "run folder")
    try:
        res = train(cfg, resume=bool(args.resume), stop_at=args.stop_at, progress=not args.no_progress,
                    overwrite=args.overwrite)
    except NonFiniteLossError as e:
        raise UserError(str(e)) from None
    except RuntimeError as e:
        if "srn_fast._C" in str(e) or "backend" in str(e):
            raise UserError(str(e).splitlines()[0]) from None
        raise
    if main_rank:
        val = res["val"]
        msg = f"step {res['step']}: checkpoint {res['checkpoint']}"
        if val:
            msg += f"; held-out PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.3f} ({val['num_images']} views)"
        print(msg)
    if res["collapse"] is not None and cfg.stop_on_collapse:
        if main_rank:
            print(f"stopped at step {res['step']}: training collapsed (--stop-on-collapse)", file=sys.stderr)
        return EXIT_COLLAPSED
    return 130 if res["interrupted"] and args.stop_at is None else 0
