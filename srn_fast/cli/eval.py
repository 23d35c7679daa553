"""``python -m srn_fast eval``: PSNR/SSIM on held-out views of training objects, or few-shot reconstruction of
unseen objects (``--few-shot``), with a JSON report and an image grid (prediction | truth | depth | normals)."""
from __future__ import annotations

import os
import time

from . import UserError
from .common import FIT_SEED, add_fit_arguments, add_shared_options, check_writable_dir, fit_options, int_list, pick_device

HELP = "evaluate a checkpoint: held-out views (PSNR/SSIM) or few-shot reconstruction of unseen objects"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a .pth file")
    p.add_argument("--data", required=True, help="data folder (with test/ and unseen/ splits, or instance folders)")
    p.add_argument("--out", required=True, help="folder for report.json and grid.png")
    p.add_argument("--split", default=None, help="sub-folder of --data to use (default test, or unseen with "
                   "--few-shot; ignored when --data holds instance folders directly)")
    p.add_argument("--sidelength", type=int, default=None, help="image size (default: the run's last training "
                   "size; the reference scores at 128)")
    p.add_argument("--max-images", type=int, default=-1, help="evaluate at most this many views (evenly spaced)")
    p.add_argument("--grid-images", type=int, default=8, help="rows in grid.png")
    p.add_argument("--batch-size", type=int, default=4, help="views rendered at once")
    f = p.add_argument_group("few-shot (unseen objects)")
    f.add_argument("--few-shot", action="store_true", help="fit new latent codes on given views, score the rest")
    f.add_argument("--observations", type=int_list, default=[64], help="view indices to fit on (reference: 64 or "
                   "64,104)")
    add_fit_arguments(f)
    add_shared_options(p, seed=FIT_SEED + " (with --few-shot)")


def data_root(data: str, split: str) -> str:
    if not os.path.isdir(data):
        raise UserError(f"{data}: data folder not found")
    sub = os.path.join(data, split)
    if os.path.isdir(sub):
        return sub
    if os.path.isdir(os.path.join(data, "train")):
        raise UserError(f"{data}: has no '{split}/' split")
    return data


def run(args) -> int:
    import numpy as np

    from .. import checkpoint as ckpt_io
    from .. import files
    from ..data import SRNDataset
    from ..evaluation import evaluate, remap_instances, write_grid
    from ..fewshot import fit_latents
    from ..viz import loss_curve_png

    check_writable_dir(args.out)
    device = pick_device(args.device)
    ck = ckpt_io.load(args.checkpoint, map_location="cpu")
    meta = ck.get("srn_fast") or {}
    cfg = meta.get("config") or {}
    S = args.sidelength or (cfg.get("sidelengths") or [128])[-1]
    split = args.split or ("unseen" if args.few_shot else "test")
    root = data_root(args.data, split)
    t0 = time.time()
    report = {"checkpoint": ck["path"], "data": root, "sidelength": S, "protocol": "few-shot" if args.few_shot
              else "held-out views of training objects"}
    if args.few_shot:
        opts = fit_options(args)  # checked before the (long) work
        model = ckpt_io.build_model(ck, backend=args.backend).to(device)
        fit_ds = SRNDataset(root, sidelength=S, specific_observation_idcs=args.observations, with_depth=False,
                            with_semantic=False)
        full = SRNDataset(root, sidelength=S, with_depth=False, with_semantic=False)
        given = set(args.observations)
        n = {i: full.num_views(i) for i in range(full.num_instances)}
        idx = [k for k, (i, v) in enumerate(full.index)
               if full.instances[i].observation_idcs[v] not in {o % n[i] for o in given}]
        fit = fit_latents(model, fit_ds, **opts)
        model = fit.model
        report.update(observations=args.observations, fit=fit.summary(), fit_history=fit.thinned_history(2000),
                      fit_per_object=[{"instance": name, "steps_taken": fit.steps_taken[i]}
                                      for i, name in enumerate(fit_ds.instance_names)])
        ds, imap = full, None
    else:
        model = ckpt_io.build_model(ck, backend=args.backend).to(device)
        ds = SRNDataset(root, sidelength=S, with_depth=False, with_semantic=False)
        imap = remap_instances(ds.instance_names, meta.get("instance_names"), model.num_instances, root)
        idx = list(range(len(ds)))
    if not idx:
        raise UserError(f"{root}: no views left to evaluate")
    if args.max_images > 0 and len(idx) > args.max_images:
        idx = [idx[int(k)] for k in np.linspace(0, len(idx) - 1, args.max_images).round()]
    res = evaluate(model, ds, idx, instance_map=imap, batch_size=args.batch_size, keep_images=args.grid_images,
                   progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    grid = write_grid(os.path.join(args.out, "grid.png"), res["images"], upscale=max(1, 128 // S))
    report.update(psnr=res["psnr"], ssim=res["ssim"], num_images=res["num_images"], seconds=time.time() - t0,
                  per_image=res["per_image"], grid=grid)
    if args.few_shot:
        for i, row in enumerate(report["fit_per_object"]):
            mine = [r for r in res["per_image"] if r["instance"] == i]
            row.update(psnr=float(np.mean([r["psnr"] for r in mine])) if mine else None,
                       ssim=float(np.mean([r["ssim"] for r in mine])) if mine else None, num_images=len(mine))
        report["fit_loss_plot"] = loss_curve_png(
            os.path.join(args.out, "fit_loss.png"), fit.loss_per_object,
            f"fit loss per object ({args.protocol}, views {','.join(map(str, args.observations))})")
    path = os.path.join(args.out, "report.json")
    files.write_json(path, report)  # strict JSON: a NaN/inf score is written as null
    if args.few_shot:
        fs = report["fit"]
        print(f"few-shot: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f} over {res['num_images']} held-out views "
              f"at {S} px ({args.protocol} protocol, {len(args.observations)} given view(s) per object); fit: "
              f"{fs['mean_steps_taken']:.0f} steps per object on average (cap {fs['config']['steps']}), "
              f"{fs['seconds_per_object']:.1f} s per object ({fs['objects']} objects fitted together in "
              f"{fs['seconds']:.1f} s)")
        print(f"report {path}, grid {grid}, fit-loss curve {report['fit_loss_plot']}")
    else:
        print(f"{report['protocol']}: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f} over {res['num_images']} "
              f"views at {S} px; report {path}, grid {grid}")
    return 0
