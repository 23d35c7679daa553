"""``python -m srn_fast train``: the reference SRN training (see :mod:`srn_fast.training`)."""
from __future__ import annotations

import json
import os
import shutil

from . import UserError
from .common import add_backend, check_writable_dir, int_list

HELP = "train an SRN (auto-decoder over the training objects) with checkpoints, validation and exact resume"


def add_arguments(p):
    p.add_argument("--data", help="SRN data: a folder of instance folders, or of train/ (and test/ for validation)")
    p.add_argument("--out", help="run folder: checkpoints/, metrics.jsonl, config.json, val_latest.png")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint with its saved config")
    g = p.add_argument_group("schedule (defaults: the reference's)")
    g.add_argument("--sidelengths", type=int_list, default=[64], help="image size per stage, e.g. 64,128")
    g.add_argument("--batch-sizes", type=int_list, default=[64], help="views per step per stage, e.g. 64,16")
    g.add_argument("--steps", type=int_list, default=[200000], help="steps per stage, e.g. 5000,170000")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--rays-per-view", type=int, default=None, help="random rays per view (default: every pixel)")
    g.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model (defaults: the reference's)")
    m.add_argument("--latent-dim", type=int, default=256)
    m.add_argument("--tracing-steps", type=int, default=10)
    m.add_argument("--fit-single-srn", action="store_true", help="one SRN for one scene, no hypernetwork")
    m.add_argument("--phi-hidden", type=int, default=256)
    m.add_argument("--phi-layers", type=int, default=4)
    m.add_argument("--rendering-layers", type=int, default=5)
    m.add_argument("--lstm-hidden", type=int, default=16)
    m.add_argument("--march-mode", default="recompute", choices=["recompute", "store"],
                   help="fused backend: 'recompute' keeps only ~100 numbers per ray and step and recomputes "
                        "activations in backward (least memory); 'store' keeps them (faster, more memory)")
    m.add_argument("--bf16", action="store_true", help="bf16 matmuls (fused backend) / autocast (torch backend)")
    d = p.add_argument_group("data selection")
    d.add_argument("--max-num-instances", type=int, default=-1)
    d.add_argument("--max-observations", type=int, default=-1, help="evenly spaced views per object")
    d.add_argument("--specific-observation-idcs", type=int_list, default=None)
    d.add_argument("--val-data", default=None, help="held-out views of the training objects (default DATA/test)")
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--val-every", type=int, default=1000)
    o.add_argument("--val-views", type=int, default=16)
    o.add_argument("--checkpoint-every", type=int, default=10000)
    o.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0 = all)")
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--init-checkpoint", default=None, help="start from these weights (ours or a reference .pth)")
    o.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint after this global step")
    o.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    o.add_argument("--no-progress", action="store_true")
    add_backend(p, default=None)


CONFIG_FIELDS = ["data", "out", "sidelengths", "batch_sizes", "steps", "lr", "latent_dim", "tracing_steps",
                 "fit_single_srn", "phi_hidden", "phi_layers", "rendering_layers", "lstm_hidden", "rays_per_view",
                 "max_num_instances", "max_observations", "specific_observation_idcs", "val_data", "val_every",
                 "val_views", "checkpoint_every", "keep_checkpoints", "log_every", "seed", "bf16", "march_mode",
                 "init_checkpoint"]


def run(args) -> int:
    from ..training import TrainConfig, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.resume:
        cfg_path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{args.resume}: not a run folder (no config.json); start it with --data and --out")
        with open(cfg_path) as fh:
            cfg = TrainConfig.from_json(json.load(fh))
        cfg.out = args.resume
        if args.backend:
            cfg.backend = args.backend
        if args.device:
            cfg.device = args.device
        check_writable_dir(cfg.out, "run folder")
        resume = True
        from ..checkpoint import list_checkpoints

        if not list_checkpoints(cfg.out):
            raise UserError(f"{args.resume}: no checkpoint to resume from yet")
    else:
        if not args.data or not args.out:
            raise UserError("train needs --data DIR and --out RUN (or --resume RUN)")
        cfg = TrainConfig(**{k: getattr(args, k) for k in CONFIG_FIELDS}, backend=args.backend or "auto",
                          device=args.device or "auto")
        resume = False
        if main_rank:
            check_writable_dir(cfg.out, "run folder")
            taken = [f for f in ("checkpoints", "metrics.jsonl", "config.json") if os.path.exists(os.path.join(cfg.out, f))]
            if taken and not args.overwrite:
                raise UserError(f"{cfg.out}: already holds a run ({', '.join(taken)}); continue it with "
                                f"--resume {cfg.out} or pass --overwrite")
            for f in taken:
                path = os.path.join(cfg.out, f)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    try:
        res = train(cfg, resume=resume, stop_at=args.stop_at, progress=not args.no_progress)
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
    return 130 if res["interrupted"] and args.stop_at is None else 0
