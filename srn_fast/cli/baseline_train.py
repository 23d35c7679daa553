"""``python -m srn_fast baseline-train``: train the encoder-decoder baseline (Tatarchenko et al. 2016)."""
import os

from ..baseline.model import POSE_MODES
from . import UserError
from .common import add_shared_options, pick_device

HELP = "train the 2D encoder-decoder novel-view baseline (Tatarchenko et al. 2016) on an SRN-format root"


def add_arguments(p):
    p.add_argument("--data", required=True, help="SRN-format root of training objects (e.g. DIR/train)")
    p.add_argument("--out", required=True, help="run folder: baseline.pt and train_report.json are written here")
    p.add_argument("--sidelength", type=int, default=64, help="image size (power of two >= 8)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="(input, target) pairs per step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--width", type=int, default=32, help="channels of the first encoder stage")
    p.add_argument("--code-dim", type=int, default=1024, help="width of the fully connected code layers")
    p.add_argument("--pose-mode", default="both", choices=sorted(POSE_MODES),
                   help="viewpoint input: input+target cam2world (both), target only, or target relative to input")
    p.add_argument("--depth-weight", type=float, default=1.0, help="weight of the foreground depth L2 term")
    p.add_argument("--max-instances", type=int, default=-1, help="use the first N objects (-1: all)")
    p.add_argument("--max-observations", type=int, default=-1, help="evenly spaced views per object (-1: all)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between (atomic) checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps per loss-curve entry")
    p.add_argument("--resume", action="store_true", help="continue from OUT/baseline.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/baseline.pt (kept until the new run's "
                   "first checkpoint)")
    add_shared_options(p, backend=False, seed="of the initial weights and the order of the training pairs")


def run(args) -> int:
    from ..baseline.train import train
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: folder not found (expected an SRN root such as DIR/train)")
    for name in ("steps", "batch_size", "width", "code_dim", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    S = args.sidelength
    if S < 8 or S & (S - 1):
        raise UserError(f"--sidelength must be a power of two >= 8, got {S}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the baseline in --out and --overwrite replaces it: pass one of them")
    rep = train(args.data, args.out, sidelength=S, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                width=args.width, code_dim=args.code_dim, pose_mode=args.pose_mode, depth_weight=args.depth_weight,
                max_instances=args.max_instances, max_observations=args.max_observations,
                checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
                device=pick_device(args.device), resume=args.resume, progress=not args.no_progress,
                overwrite=args.overwrite)
    f = rep["final"] or {}
    print(f"trained {rep['step']} steps in {rep['seconds']:.1f} s (this run {rep['seconds_this_run']:.1f} s); final loss {f.get('total', float('nan')):.4f} "
          f"(rgb {f.get('rgb', float('nan')):.4f}, depth {f.get('depth', float('nan')):.4f}); "
          f"wrote {os.path.join(args.out, 'baseline.pt')} and train_report.json")
    return 0
