"""``python -m srn_fast reconstruct``: a new object from one photo (or a few) and its camera: fit a latent code
with every network frozen (:func:`srn_fast.fit_latents`) and render an orbit around it.

Each ``--image`` goes with a ``--pose`` (cam2world, OpenCV camera, 16 numbers) and, optionally, an SRN
``intrinsics.txt`` (``f cx cy 0`` / barycenter / scale / ``height width``) whose height and width must be the
image's; without ``--intrinsics`` the image must be square and the training camera (stored in our checkpoints)
is used. Images are centre-cropped to a square (the principal point moves with the crop) and area-resized to the
model's resolution, as the data loader does. Writes to ``--out``: ``orbit.gif`` (rgb | depth | normals) and
``frames/``, the fitted code ``code.pt``, ``views.png`` (each given view | its render from the fitted code),
``fit_loss.png`` and ``report.json``.
"""
from __future__ import annotations

import os

from . import UserError
from .common import FIT_SEED, add_fit_arguments, add_shared_options, check_writable_dir, fit_options, pick_device

HELP = "reconstruct a new object from one or two posed photos: fit its latent code, write an orbit GIF and the code"

RIGID_TOL = 1e-3  # max |R^T R - I| of a pose's rotation part


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a .pth file of a "
                   "model trained on many objects")
    p.add_argument("--image", action="append", required=True, help="photo of the object (PNG/JPG); repeat with "
                   "--pose for a second view")
    p.add_argument("--pose", action="append", required=True, help="cam2world pose file of the photo (4x4, OpenCV "
                   "camera), one per --image, in the same order")
    p.add_argument("--intrinsics", action="append", default=None, help="SRN intrinsics.txt of the photo (one for "
                   "all images or one per image; default: the training camera, for square images)")
    p.add_argument("--out", required=True, help="output folder: orbit.gif, frames/, code.pt, views.png, "
                   "fit_loss.png, report.json")
    p.add_argument("--sidelength", type=int, default=None, help="resolution of the fit and the orbit (default: the "
                   "run's last training size)")
    p.add_argument("--frames", type=int, default=36, help="orbit frames (the first one at the first photo's camera)")
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--upscale", type=int, default=None, help="enlarge the GIF by this factor (default: to ~128 px)")
    add_fit_arguments(p.add_argument_group("latent fitting"))
    add_shared_options(p, seed=FIT_SEED)


def _intrinsics(path: str, H: int, W: int, image: str):
    """(f, cx, cy) in pixels of the full image from an SRN intrinsics file, whose size must be ``H x W``."""
    from ..geometry import parse_intrinsics

    intr = parse_intrinsics(path)
    if abs(intr.height - H) > 1e-6 or abs(intr.width - W) > 1e-6:
        raise UserError(f"--image {image} is {W}x{H} pixels (width x height) but --intrinsics {path} is for "
                        f"{intr.width:g}x{intr.height:g} (its line 4 holds height width)")
    K = intr.K
    return float(K[0, 0]), float(K[0, 2]), float(K[1, 2])


def load_view(image: str, pose: str, intrinsics, camera, S: int) -> dict:
    """One sample (``rgb [S*S, 3]`` in [-1, 1], ``pose [4, 4]``, ``intrinsics [3, 3]``, ``uv [S*S, 2]``,
    ``instance_idx`` 0) from a photo, its pose file and its intrinsics file (or the training camera)."""
    import torch

    from .. import geometry
    from ..data import io

    rgb = io.read_rgb_raw(image)                                   # [H, W, 3] in [0, 1]
    H, W = rgb.shape[:2]
    if intrinsics:
        f, cx, cy = _intrinsics(intrinsics, H, W, image)
    else:
        if camera is None:
            raise UserError("the checkpoint stores no training camera (a reference checkpoint): pass --intrinsics")
        if H != W:
            raise UserError(f"--image {image} is {W}x{H} pixels: without --intrinsics the image must be square "
                            f"(the training camera); pass --intrinsics for other sizes")
        f, cx, cy = (v * W for v in camera["K_rel"])
    m = min(H, W)
    r0, c0 = H // 2 - m // 2, W // 2 - m // 2                      # the data loader's centre crop
    crop = io.square_crop(rgb)
    cx, cy = cx - c0, cy - r0
    s = S / m
    P = geometry.load_pose(pose)                                   # [4, 4], checked rigid
    return {"rgb": torch.from_numpy((io.resize_area(crop, S) - 0.5) * 2.0).reshape(-1, 3),
            "pose": torch.from_numpy(P).float(), "intrinsics": geometry.intrinsics_matrix(f * s, cx * s, cy * s),
            "uv": geometry.uv_grid(S), "instance_idx": torch.tensor(0)}


def run(args) -> int:
    import torch

    from .. import checkpoint as ckpt_io
    from .. import files, viz
    from ..evaluation import render_full, render_poses, write_frames
    from ..fewshot import fit_latents

    check_writable_dir(args.out)
    images, poses, intr = args.image, args.pose, args.intrinsics or []
    if len(images) != len(poses):
        raise UserError(f"give one --pose per --image: got {len(images)} image(s) and {len(poses)} pose(s)")
    if len(intr) not in (0, 1, len(images)):
        raise UserError(f"give one --intrinsics for all images or one per image: got {len(intr)} for "
                        f"{len(images)} image(s)")
    if args.frames < 1:
        raise UserError(f"--frames must be >= 1, got {args.frames}")
    opts = fit_options(args)
    ck = ckpt_io.load(args.checkpoint, map_location="cpu")
    if "latent_codes.weight" not in ck["model"]:
        raise UserError(f"{ck['path']}: the checkpoint has no latent codes (a single SRN, --fit-single-srn): "
                        f"reconstruct needs a model trained on many objects")
    meta = ck.get("srn_fast") or {}
    S = args.sidelength or ((meta.get("config") or {}).get("sidelengths") or [64])[-1]
    if S < 2:
        raise UserError(f"--sidelength must be >= 2, got {S}")
    camera = meta.get("camera")
    views = [load_view(im, po, intr[k] if len(intr) > 1 else (intr[0] if intr else None), camera, S)
             for k, (im, po) in enumerate(zip(images, poses))]
    model = ckpt_io.build_model(ck, backend=args.backend).to(pick_device(args.device))
    fit = fit_latents(model, views, **opts)
    code = fit.codes[0]                                                          # [D]
    os.makedirs(args.out, exist_ok=True)

    # each given view next to its render from the fitted code
    batch = {"z": code[None].expand(len(views), -1), "pose": torch.stack([v["pose"] for v in views]),
             "intrinsics": torch.stack([v["intrinsics"] for v in views]), "uv": torch.stack([v["uv"] for v in views])}
    out = render_full(fit.model, batch)
    up = args.upscale or max(1, 128 // S)
    rows = [viz.hstack([viz.upscale(viz.rgb_image(v["rgb"], S), up), viz.upscale(viz.rgb_image(out["rgb"][k], S), up)])
            for k, v in enumerate(views)]
    views_png = files.write_png(os.path.join(args.out, "views.png"), viz.vstack(rows))

    # the orbit: around the training cameras' up direction (or the photo's), through the first photo's camera
    up_dir = camera["up"] if camera else (-views[0]["pose"][:3, 1]).tolist()
    orbit = viz.orbit_through(views[0]["pose"][:3, 3].numpy(), args.frames, up=up_dir)
    frames = render_poses(fit.model, 0, orbit, views[0]["intrinsics"], S, progress=not args.no_progress, z=code)
    paths = write_frames(args.out, frames, fps=args.fps, upscale=up)
    code_path = os.path.join(args.out, "code.pt")
    files.save_torch(code_path, {"code": code.clone(), "checkpoint": ck["path"], "images": images, "poses": poses,
                                 "sidelength": S, "fit": fit.summary()})
    plot = viz.loss_curve_png(os.path.join(args.out, "fit_loss.png"), fit.loss_per_object,
                              f"fit loss ({args.protocol}, {len(views)} view(s))")
    report = {"checkpoint": ck["path"], "images": images, "poses": poses, "intrinsics": intr or None,
              "sidelength": S, "fit": fit.summary(), "fit_history": fit.thinned_history(2000),
              "files": {"gif": paths["gif"], "frames": paths["frames"], "code": code_path, "views": views_png,
                        "fit_loss": plot}}
    files.write_json(os.path.join(args.out, "report.json"), report)
    fs = fit.summary()
    print(f"fitted a code to {len(views)} view(s) in {fs['seconds']:.1f} s ({fs['mean_steps_taken']:.0f} steps, "
          f"{args.protocol}); wrote {paths['gif']} (rgb | depth | normals), {code_path}, {views_png}, {plot}")
    return 0
