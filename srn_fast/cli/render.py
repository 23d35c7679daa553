"""``python -m srn_fast render``: novel views of one object from a checkpoint, along an orbit or at given poses,
as PNGs (rgb, depth, normals) and a GIF."""
from __future__ import annotations

import os

import numpy as np

from . import UserError
from .common import add_shared_options, check_writable_dir, pick_device

HELP = "render an orbit (or given poses) of one object from a checkpoint to PNGs and a GIF"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a .pth file")
    p.add_argument("--out", required=True, help="output folder: orbit.gif and frames/")
    p.add_argument("--instance", default="0", help="object: latent-code index or instance name")
    p.add_argument("--frames", type=int, default=36, help="orbit frames")
    p.add_argument("--sidelength", type=int, default=None, help="image size (default: the run's last size)")
    p.add_argument("--radius", type=float, default=None, help="camera distance (default: from the training data)")
    p.add_argument("--elevation", type=float, default=None, help="degrees (default: the training cameras' median)")
    p.add_argument("--poses", default=None, help="folder of pose .txt files (cam2world) to render instead of an orbit")
    p.add_argument("--data", default=None, help="data folder to take the camera from (reference checkpoints)")
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--upscale", type=int, default=None, help="enlarge the GIF by this factor (default: to ~128 px)")
    add_shared_options(p)


def camera_from_data(data: str) -> dict:
    from ..data import SRNDataset
    from ..training import camera_facts_of, split_roots

    root, _ = split_roots(data)
    return camera_facts_of(SRNDataset(root, sidelength=64, with_depth=False, with_semantic=False))


def run(args) -> int:
    from .. import checkpoint as ckpt_io
    from .. import geometry
    from ..evaluation import render_poses, write_frames

    check_writable_dir(args.out)
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1, got {args.frames}")
    ck = ckpt_io.load(args.checkpoint, map_location="cpu")
    meta = ck.get("srn_fast") or {}
    cam = camera_from_data(args.data) if args.data else meta.get("camera")
    if cam is None:
        raise UserError(f"{ck['path']}: no camera information stored (a reference checkpoint); pass --data DIR")
    S = args.sidelength or ((meta.get("config") or {}).get("sidelengths") or [64])[-1]
    model = ckpt_io.build_model(ck, backend=args.backend).to(pick_device(args.device))
    names = meta.get("instance_names") or []
    if args.instance in names:
        inst = names.index(args.instance)
    else:
        try:
            inst = int(args.instance)
        except ValueError:
            raise UserError(f"--instance {args.instance!r}: not an index or a known instance name "
                            f"(e.g. {names[:3]})") from None
    if not 0 <= inst < model.num_instances:
        raise UserError(f"--instance {inst}: the model has {model.num_instances} objects (0..{model.num_instances - 1})")
    f, cx, cy = (v * S for v in cam["K_rel"])
    K = geometry.intrinsics_matrix(f, cx, cy)
    if args.poses:
        if not os.path.isdir(args.poses):
            raise UserError(f"{args.poses}: pose folder not found")
        files = sorted(os.path.join(args.poses, n) for n in os.listdir(args.poses) if n.endswith(".txt"))
        if not files:
            raise UserError(f"{args.poses}: no pose .txt files")
        poses = np.stack([geometry.load_pose(p) for p in files])
    else:
        from ..viz import orbit_poses

        radius = args.radius or cam["radius"]
        elev = cam["elevation_deg"] if args.elevation is None else args.elevation
        poses = orbit_poses(args.frames, radius, elev, up=cam["up"])
    frames = render_poses(model, inst, poses, K, S, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    up = args.upscale or max(1, 128 // S)
    paths = write_frames(args.out, frames, fps=args.fps, upscale=up)
    print(f"rendered {len(frames)} views of object {inst}{' (' + names[inst] + ')' if names else ''} at {S} px: "
          f"{paths['gif']} and {paths['frames']}/")
    return 0
