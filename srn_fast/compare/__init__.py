"""Side-by-side comparison of SRN and the 2D encoder-decoder baseline on single-view novel-view synthesis.

Protocol (the SRN paper's Figure 2 / few-shot setting): every object under the data root (objects unseen in
training) is observed in ONE view, ``input_view``. SRN fits a new latent code to that view with all networks
frozen (:func:`srn_fast.fit_latents`), then renders the object's other views; the baseline receives the
same image and pose and predicts the same views directly. Both are scored on the same held-out views with
:func:`srn_fast.metrics.view_scores`: PSNR / SSIM with the reference's definitions and the mean absolute depth
error on the ground truth's foreground pixels.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from ..baseline.data import _flat_index, eval_pairs, image_sample, to_image
from ..baseline.model import TatarchenkoNet
from ..baseline.train import predict_views
from ..data import SRNDataset
from ..metrics import mean_scores, view_scores
from .grid import depth_to_uint8, make_grid, rgb_to_uint8

METHODS = ("baseline", "srn")
METHOD_NAMES = {"baseline": "Tatarchenko et al. 2016 (encoder-decoder)", "srn": "SRN (few-shot latent fit)"}


def load_srn_model(path: str, device: str = "cpu", backend: str = "auto"):
    """``(model, training step or None)`` of a `train` checkpoint (file or run folder), model on ``device``."""
    from .. import checkpoint
    ckpt = checkpoint.load(path)
    return checkpoint.build_model(ckpt, backend=backend).to(device), (ckpt.get("srn_fast") or {}).get("step")


def srn_render_views(model, ds: SRNDataset, instance: int, views: List[int], chunk: int = 4
                     ) -> Dict[str, torch.Tensor]:
    """Render ``views`` of ``instance`` (an index into ``model``'s latent codes and into ``ds``) with a fitted SRN:
    ``rgb [T, 3, S, S]``, ``depth [T, 1, S, S]``. Initial depths come from the evaluation's fixed seed."""
    from ..evaluation import collate, render_full
    S = ds.sidelength
    rgbs, depths = [], []
    for k in range(0, len(views), chunk):
        samples = [ds[_flat_index(ds, instance, t)] for t in views[k:k + chunk]]
        batch = collate([{key: s[key] for key in ("pose", "intrinsics", "uv")} for s in samples])
        batch["instance_idx"] = torch.full((len(samples),), instance, dtype=torch.int64)
        out = render_full(model, batch)
        rgbs.append(to_image(out["rgb"], S))
        depths.append(to_image(out["depth"], S))
    return {"rgb": torch.cat(rgbs), "depth": torch.cat(depths)}


def fit_srn_latents(srn_model, data_root: str, input_view: int, sidelength: int, steps: int,
                    max_instances: int = -1, **fit_kwargs):
    """Few-shot: a copy of ``srn_model`` with one new latent code per object of ``data_root`` (in sorted order),
    fitted to that object's single ``input_view`` with every network frozen
    (:func:`srn_fast.fit_latents`; ``fit_kwargs``: its ``protocol`` and options)."""
    from ..fewshot import fit_latents
    ds = SRNDataset(data_root, sidelength=sidelength, max_num_instances=max_instances,
                    specific_observation_idcs=[input_view], with_semantic=False)
    return fit_latents(srn_model, ds, steps, **fit_kwargs).model


def compare(srn_model, baseline: TatarchenkoNet, data_root: str, input_view: int = 0,
            max_targets: Optional[int] = None, max_instances: int = -1, fit_steps: int = 500,
            fit_kwargs: Optional[Dict] = None, grid_objects: int = 4, grid_views: int = 2, device: str = "cpu",
            progress: bool = True) -> Dict:
    """Run the comparison; returns ``{"summary": {method: {...}}, "per_view": [...], "grid": uint8 image,
    "depth_grid": uint8 image, "setup": {...}}``. See the module docstring for the protocol."""
    S = baseline.sidelength
    t0 = time.time()
    ds = SRNDataset(data_root, sidelength=S, max_num_instances=max_instances, with_semantic=False)
    pairs = eval_pairs(ds, input_view, max_targets)  # checks input_view before the (long) latent fit
    srn_model.to(device)
    fitted = fit_srn_latents(srn_model, data_root, input_view, S, fit_steps, max_instances,
                             progress=progress, **(fit_kwargs or {}))
    t_fit = time.time() - t0
    rows: Dict[str, List[Dict]] = {m: [] for m in METHODS}
    grid_rows, depth_rows, labels = [], [], []
    for i, iv, targets in tqdm(pairs, desc="compare", disable=not progress):
        preds = {"baseline": predict_views(baseline, ds, i, iv, targets, device),
                 "srn": srn_render_views(fitted, ds, i, targets)}
        gts = [image_sample(ds, i, t) for t in targets]
        for m in METHODS:
            for k, gt in enumerate(gts):
                rows[m].append({"instance": ds.instance_names[i], "view": int(gt["observation_idx"]),
                                **view_scores({"rgb": preds[m]["rgb"][k], "depth": preds[m]["depth"][k]}, gt)})
        if i < grid_objects:
            inp = image_sample(ds, i, iv)["rgb"]
            for k in range(min(grid_views, len(targets))):
                kk = k * len(targets) // min(grid_views, len(targets))
                gt = gts[kk]
                labels.append(f"{i}/{int(gt['observation_idx'])}")
                grid_rows.append([rgb_to_uint8(inp), rgb_to_uint8(preds["baseline"]["rgb"][kk]),
                                  rgb_to_uint8(preds["srn"]["rgb"][kk]), rgb_to_uint8(gt["rgb"])])
                if "depth" in gt:
                    fg = gt["depth"] > 0
                    lo, hi = float(gt["depth"][fg].min()) if fg.any() else 0.0, float(gt["depth"].max())
                    lo, hi = lo - 0.1, hi + 0.1
                    depth_rows.append([rgb_to_uint8(inp)] + [depth_to_uint8(d, lo, hi) for d in (
                        preds["baseline"]["depth"][kk], preds["srn"]["depth"][kk])]
                        + [depth_to_uint8(gt["depth"], lo, hi, mask=fg)])
    headers = ["input", "baseline", "SRN", "truth"]
    out = {
        "summary": {m: mean_scores(rows[m]) for m in METHODS},
        "per_view": {m: rows[m] for m in METHODS},
        "grid": make_grid(grid_rows, headers, row_labels=labels) if grid_rows else None,
        "depth_grid": make_grid(depth_rows, headers, row_labels=labels) if depth_rows else None,
        "setup": {"data": data_root, "input_view": input_view, "sidelength": S,
                  "num_objects": ds.num_instances, "max_targets": max_targets, "fit_steps": fit_steps,
                  "fit_kwargs": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                                 for k, v in (fit_kwargs or {}).items()},
                  "seconds_fit": t_fit, "seconds_total": time.time() - t0},
    }
    return out


def _fmt(x, nd):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_table(result: Dict, title: str = "SRN vs. encoder-decoder baseline") -> str:
    """The summary as a markdown table (with the setup underneath)."""
    st = result["setup"]
    lines = [f"### {title}", "",
             f"Single input view (index {st['input_view']}) per object; {st['num_objects']} objects from "
             f"`{st['data']}`; {result['summary']['srn']['num_views']} held-out views scored; {st['sidelength']} px; "
             f"SRN latent fit: {st['fit_steps']} steps."
             + (f" Training: SRN {st['srn_train_steps']} steps, baseline {st['baseline_train_steps']} steps."
                if st.get("srn_train_steps") is not None and st.get("baseline_train_steps") is not None else ""),
             "",
             "| method | PSNR (dB) ↑ | SSIM ↑ | depth abs. error, foreground ↓ | views |",
             "|---|---|---|---|---|"]
    for m in METHODS:
        s = result["summary"][m]
        lines.append(f"| {METHOD_NAMES[m]} | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'], 3)} | "
                     f"{_fmt(s['depth_abs_error'], 3)} | {s['num_views']} |")
    return "\n".join(lines) + "\n"
