"""``python -m srn_fast compare``: SRN (few-shot from one view) vs. the encoder-decoder baseline, side by side."""
import os

from . import UserError
from .common import add_shared_options, pick_device

HELP = ("compare SRN (latent fitted to one view of each unseen object) with the encoder-decoder baseline on the "
        "same held-out views: table (JSON + markdown) and image grid (PNG)")


def add_arguments(p):
    p.add_argument("--srn-checkpoint", required=True, help="SRN checkpoint written by `train`")
    p.add_argument("--baseline-checkpoint", required=True, help="baseline.pt (or its run folder) from "
                   "`baseline-train`")
    p.add_argument("--data", required=True, help="SRN-format root of objects unseen in training (e.g. DIR/unseen)")
    p.add_argument("--input-view", type=int, default=0, help="index of the single view each object is seen from")
    p.add_argument("--max-targets", type=int, default=None, help="evenly spaced held-out views per object "
                   "(default: all but the input view)")
    p.add_argument("--max-instances", type=int, default=-1, help="use the first N objects (-1: all)")
    p.add_argument("--fit-steps", type=int, default=500, help="optimiser steps of the SRN latent fit")
    p.add_argument("--fit-protocol", default="fast", choices=["fast", "reference"], help="latent fitting "
                   "procedure (srn_fast.fit_latents: fast = the default, reference = the reference's)")
    p.add_argument("--fit-lr", type=float, default=None, help="learning rate of the latent fit "
                   "(default: the protocol's)")
    p.add_argument("--fit-rays-per-view", type=int, default=None, help="random rays per view in each step of "
                   "the latent fit (default: the protocol's)")
    p.add_argument("--grid-objects", type=int, default=4, help="objects shown in the image grid")
    p.add_argument("--grid-views", type=int, default=2, help="held-out views per object in the grid")
    p.add_argument("--out", required=True, help="output folder: compare.json, compare.md, compare_grid.png, "
                   "compare_depth_grid.png")
    add_shared_options(p, seed="of the latent fit (and of torch's global generator)")


def run(args) -> int:
    import torch

    from ..baseline.train import load_checkpoint
    from ..files import write_json, write_png, write_text
    from ..compare import compare, load_srn_model, markdown_table
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: folder not found (expected an SRN root such as DIR/unseen)")
    for name in ("fit_steps", "grid_views"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_targets is not None and args.max_targets < 1:
        raise UserError(f"--max-targets must be >= 1, got {args.max_targets}")
    torch.manual_seed(args.seed)
    baseline, bckpt = load_checkpoint(args.baseline_checkpoint)
    device = pick_device(args.device)
    srn, srn_step = load_srn_model(args.srn_checkpoint, device, backend=args.backend)
    if args.fit_rays_per_view is not None and args.fit_rays_per_view < 1:
        raise UserError(f"--fit-rays-per-view must be >= 1, got {args.fit_rays_per_view}")
    fit_kwargs = {"seed": args.seed, "protocol": args.fit_protocol}
    if args.fit_lr is not None:
        fit_kwargs["lr"] = args.fit_lr
    if args.fit_rays_per_view is not None:
        fit_kwargs["rays_per_view"] = args.fit_rays_per_view
    res = compare(srn, baseline, args.data, input_view=args.input_view, max_targets=args.max_targets,
                  max_instances=args.max_instances, fit_steps=args.fit_steps, fit_kwargs=fit_kwargs,
                  grid_objects=args.grid_objects, grid_views=args.grid_views, device=device,
                  progress=not args.no_progress)
    res["setup"].update(srn_checkpoint=args.srn_checkpoint, srn_train_steps=srn_step,
                        baseline_checkpoint=args.baseline_checkpoint, baseline_train_steps=bckpt["step"],
                        baseline_train_seconds=bckpt["extra"].get("seconds"), seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "compare.json"),
               {k: res[k] for k in ("setup", "summary", "per_view")}, indent=2)
    md = markdown_table(res)
    write_text(os.path.join(args.out, "compare.md"), md)
    written = ["compare.json", "compare.md"]
    for key, name in (("grid", "compare_grid.png"), ("depth_grid", "compare_depth_grid.png")):
        if res[key] is not None:
            write_png(os.path.join(args.out, name), res[key])
            written.append(name)
    print(md)
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0
