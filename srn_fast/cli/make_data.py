"""``python -m srn_fast make-data``: render a procedural multi-view dataset in the SRN format."""
from __future__ import annotations

import argparse

from .common import add_shared_options

HELP = "generate a multi-view dataset of procedural objects (SRN format + depth + part labels)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.shapes import KINDS
    p.add_argument("--kind", default="chairs", choices=sorted(KINDS), help="shape family (default: chairs)")
    p.add_argument("--instances", type=int, default=8, help="training objects (default: 8)")
    p.add_argument("--views", type=int, default=50, help="training views per object (default: 50)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--test-views", type=int, default=10,
                   help="held-out views per training object, written to OUT/test (default: 10)")
    p.add_argument("--unseen-instances", type=int, default=2,
                   help="new objects for few-shot, written to OUT/unseen (default: 2)")
    p.add_argument("--unseen-views", type=int, default=None, help="views per unseen object (default: --views)")
    p.add_argument("--distance", type=float, default=1.5, help="camera distance from the origin (default: 1.5)")
    p.add_argument("--focal", type=float, default=1.025, help="focal length as a multiple of --size "
                   "(default: 1.025, as SRN's ShapeNet renders)")
    p.add_argument("--upper-hemisphere", action="store_true", help="training cameras above the object only")
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new dataset is complete")
    add_shared_options(p, device=False, backend=False, seed="the output is a function of it")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help="the same as --no-progress")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import time

    from ..data.generator import generate
    t = time.time()
    out = generate(kind=args.kind, instances=args.instances, views=args.views, size=args.size, seed=args.seed,
                   out=args.out, test_views=args.test_views, unseen_instances=args.unseen_instances,
                   unseen_views=args.unseen_views, distance=args.distance, focal=args.focal,
                   upper_hemisphere=args.upper_hemisphere, overwrite=args.overwrite, workers=args.workers,
                   progress=not args.no_progress)
    with open(os.path.join(out, "meta.json")) as fh:
        stats = json.load(fh)["stats"]
    print(f"wrote {out} in {time.time() - t:.1f} s ({args.instances} x {args.views} train views, "
          f"{args.test_views} test views each, {args.unseen_instances} unseen objects; {args.size}px; "
          f"max |SDF| at a depth sample {stats['hit_sdf_max']:.2e}, {stats['unfinished_rays']} rays unconverged)")
    return 0
