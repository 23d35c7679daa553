"""``python -m srn_fast baseline-eval``: PSNR / SSIM / depth error of a trained baseline from one input view."""
import json
import os

from . import UserError
from .common import add_shared_options, pick_device

HELP = "evaluate the encoder-decoder baseline: each object's held-out views predicted from one input view"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="baseline.pt (or its run folder) from baseline-train")
    p.add_argument("--data", required=True, help="SRN-format root of objects to evaluate (e.g. DIR/unseen)")
    p.add_argument("--input-view", type=int, default=0, help="index of the view each object is seen from")
    p.add_argument("--max-targets", type=int, default=None, help="evenly spaced held-out views per object "
                   "(default: all but the input view)")
    p.add_argument("--max-instances", type=int, default=-1, help="evaluate the first N objects (-1: all)")
    p.add_argument("--out", default=None, help="JSON report path (default: next to the checkpoint, "
                   "baseline_eval.json)")
    add_shared_options(p, backend=False)


def run(args) -> int:
    from ..baseline.train import evaluate, load_checkpoint
    from ..files import write_json
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: folder not found (expected an SRN root such as DIR/unseen)")
    if args.max_targets is not None and args.max_targets < 1:
        raise UserError(f"--max-targets must be >= 1, got {args.max_targets}")
    model, _ = load_checkpoint(args.checkpoint)
    rep = evaluate(model, args.data, input_view=args.input_view, max_targets=args.max_targets,
                   max_instances=args.max_instances, device=pick_device(args.device), progress=not args.no_progress)
    rep["checkpoint"] = os.path.abspath(args.checkpoint)
    rep["data"] = os.path.abspath(args.data)
    rep["input_view"] = args.input_view
    ck = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    out = args.out or os.path.join(ck, "baseline_eval.json")
    write_json(out, rep, indent=2, makedirs=True)
    print(json.dumps(rep["summary"]))
    print(f"wrote {out}")
    return 0
