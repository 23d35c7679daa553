"""``python -m srn_fast semantic-eval``: score Semantic SRN heads on held-out views (mIoU, pixel accuracy), plot mIoU
against the number of labelled views K, draw part maps beside RGB, an orbit GIF and the feature embedding."""
from __future__ import annotations

import glob
import os
import time

from . import UserError
from .common import add_shared_options, check_writable_dir, pick_device

HELP = "evaluate Semantic SRN heads on held-out views: mIoU/accuracy per K, plots, part maps, feature embedding"


def add_arguments(p):
    p.add_argument("--heads", nargs="+", required=True, help="head files or folders of head_*.pth "
                   "(from semantic-train)")
    p.add_argument("--data", required=True, help="data folder with the held-out split (test/) of the training objects")
    p.add_argument("--split", default="test", help="sub-folder of --data to score (default test)")
    p.add_argument("--out", required=True, help="folder for report.json, miou_vs_k.png, views.png, features_*.png, "
                   "orbit.gif")
    p.add_argument("--max-views", type=int, default=-1, help="score at most this many views (evenly spaced)")
    p.add_argument("--grid-views", type=int, default=6, help="rows of views.png")
    p.add_argument("--embedding", default="pca", choices=["pca", "tsne"], help="2-D embedding of the features "
                   "(t-SNE needs the optional extra: pip install .[viz])")
    p.add_argument("--embed-points", type=int, default=4000, help="surface rays in the embedding picture")
    p.add_argument("--gif-frames", type=int, default=24, help="frames of the orbit GIF (0: none)")
    p.add_argument("--gif-head", default="30", help="label of the head the GIF shows (default 30, else the first)")
    add_shared_options(p)


def _head_files(items):
    files = []
    for it in items:
        if os.path.isdir(it):
            found = sorted(glob.glob(os.path.join(it, "head_*.pth")))
            if not found:
                raise UserError(f"{it}: no head_*.pth files (write them with semantic-train)")
            files += found
        elif os.path.isfile(it):
            files.append(it)
        else:
            raise UserError(f"{it}: head file or folder not found")
    return files


def _sort_key(extra):
    k = extra.get("k", 0)
    return (bool(extra.get("joint", False)), -(k if isinstance(k, int) else int(extra.get("num_views", 0))))


def run(args) -> int:
    import numpy as np
    import torch

    from .. import checkpoint as ckpt_io
    from .. import files
    from ..data import SRNDataset
    from ..metrics import confusion_matrix
    from ..metrics import segmentation_scores as scores
    from ..semantic import viz
    from ..semantic.evaluate import embedding_png, orbit_frames, orbit_poses, render_views, score_head, view_grid
    from ..semantic.features import class_names_for, map_instances
    from ..semantic.head import load_head

    check_writable_dir(args.out)
    if args.embedding == "tsne":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise UserError("--embedding tsne needs scikit-learn, an optional extra: `pip install .[viz]` "
                            "(or use --embedding pca, which needs nothing)")
    device = pick_device(args.device)
    heads = [(f,) + load_head(f) for f in _head_files(args.heads)]
    heads.sort(key=lambda h: _sort_key(h[2]))
    root = os.path.join(args.data, args.split)
    if not os.path.isdir(root):
        raise UserError(f"{args.data}: has no '{args.split}/' split of held-out views")
    names = heads[0][2].get("class_names") or class_names_for(args.data)
    S = int(heads[0][2].get("sidelength", 64))
    ds = SRNDataset(root, sidelength=S, with_depth=False, with_semantic=True)
    idx = list(range(len(ds)))
    if args.max_views > 0 and len(idx) > args.max_views:
        idx = [int(k) for k in np.linspace(0, len(idx) - 1, args.max_views).round()]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    report = {"data": os.path.relpath(root), "sidelength": S, "num_views": len(idx), "class_names": names,
              "convention": "background (label 0) is a class: miou = mean IoU over every class present in truth or "
                            "prediction (background included); miou_parts = mean over part classes only; "
                            "pixel_accuracy over all pixels, foreground_accuracy over pixels of a true part",
              "heads": {}}
    preds, rendered, gif_src = {}, {}, None
    for path, head, extra in heads:
        if len(extra.get("class_names", names)) != len(names) or head.num_classes != len(names):
            raise UserError(f"{path}: head has {head.num_classes} classes but the others/data have {len(names)}")
        srn = extra.get("srn_checkpoint")
        if not srn:
            raise UserError(f"{path}: the head file names no SRN checkpoint")
        if srn not in rendered:  # one render of the held-out views per SRN, shared by its heads
            ck = ckpt_io.load(srn, map_location="cpu")
            model = ckpt_io.build_model(ck, backend=args.backend).to(device)
            imap = map_instances(ds.instance_names, (ck.get("srn_fast") or {}).get("instance_names"),
                                 model.num_instances, root)
            views = render_views(model, ds, idx, instance_map=imap, num_classes=len(names),
                                 progress=not args.no_progress)
            rendered[srn] = (model, views, imap)
        model, views, imap = rendered[srn]
        res = score_head(head, views, names)
        counts = extra.get("class_counts")
        if counts:
            major = int(torch.tensor(counts).argmax())
            base = scores(confusion_matrix(torch.full_like(views["labels"], major), views["labels"], len(names)), names)
            res["majority_baseline"] = {"class": names[major], "miou": base["miou"], "miou_parts": base["miou_parts"],
                                        "pixel_accuracy": base["pixel_accuracy"]}
        label = extra.get("label", str(extra.get("k")))
        key = "joint" if extra.get("joint") else f"K={label}"
        preds[key] = res.pop("pred")
        report["heads"][key] = dict(res, head_file=os.path.relpath(path), srn_checkpoint=os.path.relpath(srn),
                                    k=extra.get("k"), joint=bool(extra.get("joint")),
                                    head=head.kind, num_train_views=extra.get("num_views", extra.get("k")))
        print(f"{key:>7}: mIoU {res['miou']:.4f} (parts {res['miou_parts']:.4f}), pixel accuracy "
              f"{res['pixel_accuracy']:.4f} on {len(idx)} held-out views"
              + (f"; majority baseline mIoU {res['majority_baseline']['miou']:.4f}" if counts else ""))
        if gif_src is None or label == args.gif_head:
            gif_src = (head, model, label)

    # mIoU against K (frozen heads), the joint model as a separate marker
    frozen = {k: v for k, v in report["heads"].items() if not v["joint"]}
    if frozen:
        all_k = max(v["k"] for v in frozen.values())
        series = {"frozen SRN, mIoU": [(v["k"], v["miou"]) for v in frozen.values()],
                  "frozen SRN, mIoU parts": [(v["k"], v["miou_parts"]) for v in frozen.values()]}
        joint = [v for v in report["heads"].values() if v["joint"]]
        if joint:
            series["joint SRN+head, mIoU"] = [(all_k, joint[0]["miou"])]
        ticks = {v["k"]: (f"all ({v['k']})" if v["k"] == all_k else str(v["k"])) for v in frozen.values()}
        report["plot"] = viz.line_plot_png(os.path.join(args.out, "miou_vs_k.png"), series,
                                           "labelled training views K (log scale)", "mIoU",
                                           f"Semantic SRN: held-out views ({len(idx)}) vs labelled views",
                                           xticklabels=ticks)
        full = [v for v in frozen.values() if v["k"] == all_k][0]
        for k, v in frozen.items():
            v["miou_relative_to_all"] = v["miou"] / full["miou"] if full["miou"] > 0 else float("nan")
    # pictures: views grid, embedding of the (first) frozen SRN's features, orbit GIF
    first_views = next(iter(rendered.values()))[1]
    rows = [int(r) for r in np.linspace(0, len(idx) - 1, min(args.grid_views, len(idx))).round()]
    report["views_png"] = files.write_png(os.path.join(args.out, "views.png"),
                                        view_grid(first_views, preds, names, S, rows, upscale=max(1, 96 // S)))
    report["embedding"] = embedding_png(os.path.join(args.out, f"features_{args.embedding}.png"), first_views, names,
                                        method=args.embedding, max_points=args.embed_points)
    if args.gif_frames > 0:
        head, model, label = gif_src
        ck = ckpt_io.load(heads[0][2]["srn_checkpoint"], map_location="cpu")
        cam = (ck.get("srn_fast") or {}).get("camera") or {}
        K = torch.tensor(ds.instances[0].intrinsics(S))[:3, :3]
        poses = orbit_poses(args.gif_frames, float(cam.get("radius", 2.0)), float(cam.get("elevation_deg", 30.0)))
        inst = int(imap[0])
        frames = orbit_frames(model, head, inst, poses, K, S, upscale=max(1, 96 // S), progress=not args.no_progress)
        report["gif"] = {"path": files.write_gif(os.path.join(args.out, "orbit.gif"), frames, fps=10.0), "head": label,
                         "instance": ds.instance_names[0]}
    report["seconds"] = time.time() - t0
    path = os.path.join(args.out, "report.json")
    files.write_json(path, report)
    print(f"report {path}; plot {report.get('plot')}; views {report['views_png']}; "
          f"features {report['embedding']['path']}" + (f"; gif {report['gif']['path']}" if "gif" in report else ""))
    return 0
