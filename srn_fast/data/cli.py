"""``python -m srn_fast make-data``: render a multi-view dataset with exact depth and part labels."""
import time

from .generate import DEFAULT_FOCAL, DEFAULT_RADIUS, generate
from .shapes import MAKERS

HELP = "generate procedural multi-view scenes (SRN format + depth + part labels)"


def add_arguments(p):
    p.add_argument("--kind", default="chairs", choices=sorted(MAKERS), help="shape family")
    p.add_argument("--instances", type=int, default=8, help="training objects")
    p.add_argument("--views", type=int, default=50, help="training views per object")
    p.add_argument("--test-views", type=int, default=None, help="held-out views per training object "
                   "(default max(4, views // 5))")
    p.add_argument("--unseen-instances", type=int, default=None, help="objects for few-shot (default "
                   "max(2, instances // 4))")
    p.add_argument("--unseen-views", type=int, default=None, help="views per unseen object (default --views)")
    p.add_argument("--size", type=int, default=64, help="image side length in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radius", type=float, default=DEFAULT_RADIUS, help="camera distance from the object centre")
    p.add_argument("--focal", type=float, default=DEFAULT_FOCAL, help="focal length in units of the image size")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    t0 = time.time()
    out = generate(args.kind, args.instances, args.views, args.size, args.seed, args.out,
                   test_views=args.test_views, unseen_instances=args.unseen_instances,
                   unseen_views=args.unseen_views, radius=args.radius, focal=args.focal, overwrite=args.overwrite)
    print(f"wrote {out} (train/, test/, unseen/, meta.json) in {time.time() - t0:.1f} s")
    return 0
