"""Few-shot reconstruction benchmark (issue 17): how well and how fast unseen objects are fitted from one or two
views, for the default latent-fitting protocol and the reference's.

    python benchmarks/fewshot_bench.py --checkpoint RUN --data DATA --json benchmarks/results/fewshot_cpu.json

For each protocol (``fast``: the default, ``reference``: fresh N(0, 0.01) codes, Adam lr 5e-5, every pixel) and
each set of given views (``--view-sets 0 0,10``: view 0 alone, views 0 and 10), the unseen objects under
``DATA/unseen`` (or ``DATA`` itself) are fitted together in one run capped at the largest ``--steps`` value, and
the codes after 0, 100, 300, 1,000 and 3,000 steps (snapshots of that run; a fit's state after N steps does not
depend on its cap, so a snapshot is the fit with budget N) are scored on every other view of those objects with
the reference's PSNR / SSIM. Reported per row: PSNR, SSIM, the mean number of steps the objects actually took
(the fast protocol stops each object on its own) and the wall time per object (the run's time up to that
snapshot, initialisation included, divided by the number of objects, which are fitted together). ``--variant
LABEL:PROTOCOL:JSON`` adds a procedure with :class:`srn_fast.FitConfig` fields overridden (for choosing one;
a ``"seed"`` key sets the fit's seed instead, to measure a protocol's spread over seeds).

The table is printed (markdown) and, with ``--json``, written with the machine facts (CPU model and flags from
/proc/cpuinfo, cores, load average before and after, threads), versions and the git commit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import import_srn_fast, machine_facts  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

srn_fast = import_srn_fast()  # the installed srn_fast when there is one, else this source tree
from srn_fast import checkpoint as ckpt_io  # noqa: E402
from srn_fast import files  # noqa: E402
from srn_fast.data import SRNDataset  # noqa: E402
from srn_fast.evaluation import evaluate  # noqa: E402
from srn_fast.fewshot import fit_latents, with_codes  # noqa: E402


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def parse_variant(text: str):
    """``LABEL:PROTOCOL:JSON`` -> (label, protocol, FitConfig overrides); a ``"seed"`` key sets the fit's seed."""
    label, protocol, opts = (text.split(":", 2) + ["", ""])[:3]
    if not label or protocol not in ("fast", "reference"):
        raise SystemExit(f"--variant {text!r}: expected LABEL:PROTOCOL:JSON with PROTOCOL fast or reference")
    return label, protocol, json.loads(opts) if opts else {}


def run_one(model, root, S, views, label, protocol, opts, steps, seed, progress):
    """Fit the objects of ``root`` on ``views``, score every other view at each snapshot; rows of the table."""
    opts = dict(opts)
    seed = int(opts.pop("seed", seed))
    fit_ds = SRNDataset(root, sidelength=S, specific_observation_idcs=views, with_depth=False, with_semantic=False)
    full = SRNDataset(root, sidelength=S, with_depth=False, with_semantic=False)
    idx = [k for k, (i, v) in enumerate(full.index) if full.instances[i].observation_idcs[v] not in set(views)]
    snaps = sorted(set([0] + steps))
    fit = fit_latents(model, fit_ds, max(steps), protocol, seed=seed, snapshots=snaps, progress=progress, **opts)
    n = fit_ds.num_instances
    taken = np.array(fit.steps_taken)
    rows = []
    for s in snaps:
        ev = evaluate(with_codes(model, fit.snapshots[s]), full, idx, batch_size=8)
        rows.append({"variant": label, "protocol": protocol, "options": opts, "seed": seed, "views": views,
                     "steps": s,
                     "psnr": ev["psnr"], "ssim": ev["ssim"], "num_images": ev["num_images"],
                     "mean_steps_taken": float(np.minimum(taken, s).mean()),
                     "seconds_per_object": fit.snapshot_seconds[s] / n, "objects": n,
                     "per_object_psnr": [float(np.mean([r["psnr"] for r in ev["per_image"] if r["instance"] == i]))
                                         for i in range(n)]})
        print(f"  {label:12s} views {','.join(map(str, views)):5s} {s:5d} steps: PSNR {ev['psnr']:.2f} "
              f"SSIM {ev['ssim']:.3f} | steps taken {rows[-1]['mean_steps_taken']:.0f} | "
              f"{rows[-1]['seconds_per_object']:.1f} s/object", flush=True)
    return rows, {"variant": label, "views": views, "seed": seed, "config": fit.summary()["config"],
                  "steps_taken": fit.steps_taken, "seconds": fit.seconds,
                  "loss_curve": [h["loss"] for h in fit.thinned_history(500)]}


def table(rows) -> str:
    lines = ["| protocol | views | steps (cap) | steps taken (mean) | PSNR (dB) | SSIM | s / object |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {len(r['views'])} ({','.join(map(str, r['views']))}) | {r['steps']} | "
                     f"{r['mean_steps_taken']:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{r['seconds_per_object']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or .pth of a model trained on many objects")
    p.add_argument("--data", required=True, help="make-data folder (its unseen/ split is used) or a root of unseen "
                   "objects")
    p.add_argument("--sidelength", type=int, default=None, help="default: the run's last training size")
    p.add_argument("--view-sets", nargs="+", default=["0", "0,10"], help="given views per fit, e.g. 0 0,10")
    p.add_argument("--steps", default="100,300,1000,3000", help="snapshot steps; the cap is the largest")
    p.add_argument("--protocols", default="fast,reference")
    p.add_argument("--variant", action="append", default=[], help="LABEL:PROTOCOL:JSON of FitConfig overrides")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small models, shared CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "fused", "torch"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here (atomically)")
    p.add_argument("--note", default="")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = os.path.join(args.data, "unseen") if os.path.isdir(os.path.join(args.data, "unseen")) else args.data
    ck = ckpt_io.load(args.checkpoint)
    meta = ck.get("srn_fast") or {}
    S = args.sidelength or ((meta.get("config") or {}).get("sidelengths") or [64])[-1]
    model = ckpt_io.build_model(ck, backend=args.backend)
    steps = [int(s) for s in args.steps.split(",")]
    variants = [(name, name, {}) for name in args.protocols.split(",") if name] + \
               [parse_variant(v) for v in args.variant]
    load_before = load_average()
    t0 = time.time()
    rows, fits = [], []

    def write(done: bool) -> dict:
        text = table(rows)
        result = {"benchmark": "fewshot", "complete": done, "note": args.note, **machine_facts(),
                  "load_average_before": load_before, "load_average_after": load_average(),
                  "backend": model.backend_name, "srn_fast_version": srn_fast.__version__,
                  "setup": {"checkpoint": ck["path"], "training_step": meta.get("step"), "data": root,
                            "sidelength": S, "model_config": ckpt_io.checkpoint_model_config(ck), "steps": steps,
                            "seed": args.seed, "argv": sys.argv[1:] if argv is None else list(argv)},
                  "seconds_total": time.time() - t0, "rows": rows, "fits": fits, "table": text}
        if args.json:  # rewritten after every fit, so that an interrupted run keeps what it measured
            files.write_json(args.json, result, makedirs=True)
        return result

    for views in ([int(v) for v in vs.split(",")] for vs in args.view_sets):
        for label, protocol, opts in variants:
            r, f = run_one(model, root, S, views, label, protocol, opts, steps, args.seed, args.progress)
            rows += r
            fits.append(f)
            write(False)
    print(write(True)["table"])
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
