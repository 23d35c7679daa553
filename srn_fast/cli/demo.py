"""``python -m srn_fast demo``: the whole workflow on the CPU in a few minutes, with no arguments.

Generates a small procedural dataset (a few chairs, many views), trains a narrow SRN on random ray subsets,
scores held-out views of the training objects against a mean-colour baseline, renders an orbit GIF and prints
where everything is. The demo's model and schedule are tuned for a 2-core laptop; real training uses the
reference's defaults (``python -m srn_fast train``).
"""
from __future__ import annotations

import os
import shutil
import time

from . import UserError
from .common import add_shared_options, check_writable_dir

HELP = "generate a small dataset, train, evaluate held-out views and render an orbit GIF (CPU, minutes)"

MARKER = "demo.json"
DEMO_DATA = dict(kind="chairs", instances=3, views=40, test_views=4, unseen_instances=0, size=32, seed=0)
DEMO_TRAIN = dict(sidelengths=[32], batch_sizes=[8], steps=[1500], lr=1e-3, latent_dim=32, tracing_steps=8,
                  phi_hidden=64, phi_layers=4, rendering_layers=2, lstm_hidden=16, rays_per_view=256,
                  val_every=500, val_views=8, checkpoint_every=250, keep_checkpoints=2, log_every=10, seed=0)
QUICK = dict(data=dict(instances=2, views=6, test_views=2, size=16),
             train=dict(sidelengths=[16], batch_sizes=[2], steps=[4], latent_dim=8, phi_hidden=16,
                        tracing_steps=3, rays_per_view=32, val_every=4, checkpoint_every=2, log_every=1))


def add_arguments(p):
    p.add_argument("--out", default="srn_demo", help="output folder (default ./srn_demo; a previous demo there "
                   "is replaced)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEMO_TRAIN['steps'][0]})")
    p.add_argument("--frames", type=int, default=36, help="orbit frames in the GIF")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data and model)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the demo's small matmuls gain "
                   "little from more, and slow down badly when other programs share the cores)")
    add_shared_options(p)


def _prepare_out(out: str) -> None:
    check_writable_dir(out, "demo folder")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)) and set(os.listdir(out)) - {"data", "run", "eval", "render"}:
            raise UserError(f"{out}: exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)


def run(args) -> int:
    import torch

    from ..data import SRNDataset, generate
    from ..evaluation import baseline_scores, evaluate, mean_colour, render_poses, write_frames, write_grid
    from ..files import write_json
    from ..training import TrainConfig, camera_facts_of, train
    from ..viz import orbit_poses
    from .. import geometry

    t_start = time.time()
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    _prepare_out(out)
    data_kw, train_kw = dict(DEMO_DATA), dict(DEMO_TRAIN)
    if args.quick:
        data_kw.update(QUICK["data"])
        train_kw.update(QUICK["train"])
    if args.steps is not None:
        train_kw["steps"] = [args.steps]
    progress = not args.no_progress
    os.makedirs(out, exist_ok=True)
    print(f"[1/4] generating {data_kw['instances']} {data_kw['kind']} x {data_kw['views']} views at "
          f"{data_kw['size']} px -> {out}/data")
    data = generate(out=os.path.join(out, "data"), progress=progress, **data_kw)

    print(f"[2/4] training ({train_kw['steps'][0]} steps, batch {train_kw['batch_sizes'][0]} views x "
          f"{train_kw['rays_per_view']} rays, backend {args.backend}) -> {out}/run")
    cfg = TrainConfig(data=data, out=os.path.join(out, "run"), backend=args.backend, device=args.device or "auto",
                      **train_kw)
    res = train(cfg, progress=progress)
    if res["interrupted"]:
        print(f"interrupted at step {res['step']}; the last checkpoint is {res['checkpoint']}")
        return 130
    model, train_ds = res["model"], res["dataset"]
    t_train = res["seconds"]

    print("[3/4] evaluating held-out views of the training objects")
    S = cfg.sidelengths[-1]
    test_ds = SRNDataset(os.path.join(data, "test"), sidelength=S, with_depth=False, with_semantic=False)
    ev = evaluate(model, test_ds, keep_images=min(8, len(test_ds)), progress=progress)
    colour = mean_colour(train_ds)
    base = baseline_scores(colour, test_ds)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    grid = write_grid(os.path.join(out, "eval", "grid.png"), ev["images"], upscale=max(1, 96 // S))

    print("[4/4] rendering an orbit")
    cam = camera_facts_of(train_ds)
    f, cx, cy = (v * S for v in cam["K_rel"])
    poses = orbit_poses(args.frames, cam["radius"], max(cam["elevation_deg"], 15.0), up=cam["up"])
    frames = render_poses(model, 0, poses, geometry.intrinsics_matrix(f, cx, cy), S, progress=progress)
    paths = write_frames(os.path.join(out, "render"), frames, fps=12, upscale=max(1, 128 // S))

    total = time.time() - t_start
    summary = {"heldout_psnr": ev["psnr"], "heldout_ssim": ev["ssim"], "baseline_psnr": base["psnr"],
               "baseline_ssim": base["ssim"], "num_heldout_views": ev["num_images"], "sidelength": S,
               "train_seconds": t_train, "total_seconds": total, "steps": res["step"], "data": data,
               "checkpoint": res["checkpoint"], "metrics": os.path.join(cfg.out, "metrics.jsonl"), "grid": grid,
               "gif": paths["gif"], "frames": paths["frames"], "per_image": ev["per_image"],
               "train_config": cfg.to_json(), "torch_threads": torch.get_num_threads(),
               "backend": model.backend_name}
    write_json(os.path.join(out, MARKER), summary)
    print()
    print(f"held-out PSNR {ev['psnr']:.2f} dB (SSIM {ev['ssim']:.3f}) on {ev['num_images']} views of the "
          f"training objects | mean-colour baseline {base['psnr']:.2f} dB (SSIM {base['ssim']:.3f})")
    print(f"done in {total:.0f} s (training {t_train:.0f} s, backend {model.backend_name})")
    print(f"  data        {data}")
    print(f"  checkpoint  {res['checkpoint']}")
    print(f"  metrics     {summary['metrics']}")
    print(f"  eval grid   {grid}  (prediction | truth | depth | normals)")
    print(f"  orbit GIF   {paths['gif']}  (rgb | depth | normals)")
    print(f"  summary     {os.path.join(out, MARKER)}")
    return 0
