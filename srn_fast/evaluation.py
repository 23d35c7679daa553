"""Evaluation and rendering of trained models: full-image rendering in ray chunks, PSNR/SSIM over a test set
(the reference's protocol), the mean-colour baseline, image grids and orbit videos."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from . import files, geometry, viz
from .metrics import srn_psnr_ssim
from .model import SRNModel

EVAL_SEED = 1234  # initial depths of evaluation renders are drawn from this seed: scores are reproducible


def collate(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack a list of dataset samples into the batch dict SRNModel takes (the default torch collate, minus the
    DataLoader)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def initial_depth(B: int, N: int, seed: int) -> torch.Tensor:
    """``[B, N, 1]`` reference initial depths N(0.05, 5e-4) from a seeded generator (reproducible renders)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.empty(B, N, 1).normal_(mean=0.05, std=5e-4, generator=g)


@torch.no_grad()
def render_full(model: SRNModel, batch: Dict[str, torch.Tensor], chunk_rays: int = 8192,
                seed: int = EVAL_SEED) -> Dict[str, torch.Tensor]:
    """Render every ray of ``batch`` (uv ``[B, N, 2]``) in chunks of ``chunk_rays`` rays per view, without grad.

    Returns CPU tensors ``rgb [B, N, 3]`` and ``depth [B, N, 1]``.
    """
    was_training = model.training
    model.eval()
    B, N = batch["uv"].shape[:2]
    d0 = initial_depth(B, N, seed)
    device = next(model.parameters()).device
    rgb, depth = [], []
    inp = {k: v.to(device) for k, v in batch.items() if k in ("instance_idx", "pose", "intrinsics", "z")}
    for s in range(0, N, chunk_rays):
        out = model.render(dict(inp, uv=batch["uv"][:, s:s + chunk_rays].to(device)),
                           initial_depth=d0[:, s:s + chunk_rays].to(device))
        rgb.append(out["rgb"].float().cpu())
        depth.append(out["depth"].float().cpu())
    model.train(was_training)
    return {"rgb": torch.cat(rgb, 1), "depth": torch.cat(depth, 1)}


def remap_instances(names_data: Sequence[str], names_model: Optional[Sequence[str]], num_model: int,
                    where: str) -> torch.Tensor:
    """``[len(names_data)]`` model latent-code index of each data instance, matched by name.

    Without stored names (a reference checkpoint) the data's sorted instances must be the model's, one to one.
    """
    if names_model:
        pos = {n: i for i, n in enumerate(names_model)}
        missing = [n for n in names_data if n not in pos]
        if missing:
            raise ValueError(f"{where}: instance(s) {missing[:3]} are not among the model's {len(names_model)} "
                             f"training instances; held-out views must be of training objects (use few-shot "
                             f"evaluation for new objects)")
        return torch.tensor([pos[n] for n in names_data], dtype=torch.long)
    if len(names_data) != num_model:
        raise ValueError(f"{where}: {len(names_data)} instances but the model has {num_model} latent codes")
    return torch.arange(num_model, dtype=torch.long)


def evaluate(model: SRNModel, dataset: Dataset, indices: Optional[Sequence[int]] = None,
             instance_map: Optional[torch.Tensor] = None, batch_size: int = 4, chunk_rays: int = 8192,
             keep_images: int = 0, progress: bool = False) -> Dict:
    """PSNR/SSIM (the reference's definitions) of every view in ``dataset`` (or ``indices`` of it).

    ``dataset`` items are full images (no ray subsets). ``instance_map`` maps the dataset's instance_idx to the
    model's latent code. Returns ``{"psnr", "ssim", "num_images", "per_image": [...], "images": [...]}``: the
    scores are means over all images; ``images`` holds the first ``keep_images`` renders (dicts of uint8
    ``pred``, ``truth``, ``depth``, ``normals``) for a grid.
    """
    idx = list(range(len(dataset))) if indices is None else list(indices)
    if not idx:
        raise ValueError("evaluate: no images to evaluate")
    per_image: List[Dict] = []
    images: List[Dict] = []
    bar = tqdm(range(0, len(idx), batch_size), desc="eval", unit="batch", disable=not progress, leave=False)
    for s in bar:
        samples = [dataset[i] for i in idx[s:s + batch_size]]
        batch = collate(samples)
        if instance_map is not None:
            batch["instance_idx"] = instance_map[batch["instance_idx"]]
        N = batch["uv"].shape[1]
        S = int(round(N ** 0.5))
        if S * S != N:
            raise ValueError(f"evaluate: needs full square images, got {N} rays per view (no num_rays subsets)")
        out = render_full(model, {k: batch[k] for k in ("instance_idx", "pose", "intrinsics", "uv")}, chunk_rays,
                          seed=EVAL_SEED + s)
        for b in range(len(samples)):
            p, q = srn_psnr_ssim(out["rgb"][b], batch["rgb"][b])
            per_image.append({"instance": int(samples[b]["instance_idx"]),
                              "observation": int(samples[b]["observation_idx"]), "psnr": p, "ssim": q})
            if len(images) < keep_images:
                images.append({"pred": viz.rgb_image(out["rgb"][b], S), "truth": viz.rgb_image(batch["rgb"][b], S),
                               "depth": viz.depth_image(out["depth"][b], S),
                               "normals": viz.normal_image(batch["uv"][b], out["depth"][b], batch["intrinsics"][b], S)})
    return {"psnr": float(np.mean([r["psnr"] for r in per_image])),
            "ssim": float(np.mean([r["ssim"] for r in per_image])), "num_images": len(per_image),
            "per_image": per_image, "images": images}


def mean_colour(dataset: Dataset, max_images: int = 200) -> torch.Tensor:
    """``[3]`` mean colour (in [-1, 1]) over (up to ``max_images`` evenly spaced) views of ``dataset``."""
    n = len(dataset)
    idx = np.linspace(0, n - 1, num=min(n, max_images)).round().astype(int)
    return torch.stack([dataset[int(i)]["rgb"].double().mean(0) for i in idx]).mean(0).float()


def baseline_scores(colour: torch.Tensor, dataset: Dataset, indices: Optional[Sequence[int]] = None) -> Dict:
    """PSNR/SSIM of predicting every pixel as ``colour`` (the mean-colour baseline), same protocol as
    :func:`evaluate`."""
    idx = list(range(len(dataset))) if indices is None else list(indices)
    ps, ss = [], []
    for i in idx:
        gt = dataset[i]["rgb"]
        p, q = srn_psnr_ssim(colour.expand_as(gt), gt)
        ps.append(p)
        ss.append(q)
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "num_images": len(idx)}


def write_grid(path: str, images: List[Dict], upscale: int = 1, columns=("pred", "truth", "depth", "normals")) -> str:
    """One row per view: prediction | truth | depth | normals, as a PNG."""
    rows = [viz.hstack([viz.upscale(im[c], upscale) for c in columns], gap=2) for im in images]
    return files.write_png(path, viz.vstack(rows, gap=4))


@torch.no_grad()
def render_poses(model: SRNModel, instance: int, poses: np.ndarray, K: torch.Tensor, S: int,
                 chunk_rays: int = 8192, progress: bool = True, z: Optional[torch.Tensor] = None) -> List[Dict]:
    """Render ``poses [F, 4, 4]`` of one instance at S x S with intrinsics ``K [3, 3]``: per frame uint8 ``rgb``,
    ``depth``, ``normals``."""
    uv = geometry.uv_grid(S)[None]
    frames = []
    for f in tqdm(range(len(poses)), desc="render", unit="frame", disable=not progress, leave=False):
        batch = {"pose": torch.as_tensor(poses[f], dtype=torch.float32)[None], "intrinsics": K[None].float(),
                 "uv": uv}
        if z is not None:
            batch["z"] = z.reshape(1, -1)
        else:
            batch["instance_idx"] = torch.tensor([instance])
        out = render_full(model, batch, chunk_rays, seed=EVAL_SEED + f)
        frames.append({"rgb": viz.rgb_image(out["rgb"][0], S), "depth": viz.depth_image(out["depth"][0], S),
                       "normals": viz.normal_image(uv[0], out["depth"][0], K, S)})
    return frames


def write_frames(out_dir: str, frames: List[Dict], fps: float = 12.0, upscale: int = 1) -> Dict[str, str]:
    """PNGs per frame (rgb, depth, normals) and ``orbit.gif`` (rgb | depth | normals side by side)."""
    os.makedirs(os.path.join(out_dir, "frames"), exist_ok=True)
    gif = []
    for k, fr in enumerate(frames):
        for key in ("rgb", "depth", "normals"):
            files.write_png(os.path.join(out_dir, "frames", f"{key}_{k:04d}.png"), fr[key])
        gif.append(viz.hstack([viz.upscale(fr[c], upscale) for c in ("rgb", "depth", "normals")], gap=2))
    path = files.write_gif(os.path.join(out_dir, "orbit.gif"), gif, fps=fps)
    return {"gif": path, "frames": os.path.join(out_dir, "frames")}
