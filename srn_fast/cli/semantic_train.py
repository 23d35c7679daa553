"""``python -m srn_fast semantic-train``: fit Semantic SRN part classifiers on K labelled views of a frozen SRN
(one head file per K), or with ``--joint`` train SRN + head from scratch on every label (the fully supervised
reference point)."""
from __future__ import annotations

import json
import os
import time

from . import UserError
from .common import add_shared_options, check_writable_dir, int_list, pick_device

HELP = "train Semantic SRN part classifiers on K labelled views of a frozen SRN (or --joint: SRN + head from scratch)"


def k_list(text: str):
    """``"all,30,10"`` -> ``["all", 30, 10]`` (an argparse type)."""
    out = []
    for t in str(text).split(","):
        t = t.strip().lower()
        if not t:
            continue
        if t == "all":
            out.append("all")
            continue
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"--views: expected 'all' or positive integers, e.g. all,30,10; got {text!r}") from None
        if v < 1:
            raise ValueError(f"--views: numbers of labelled views must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"--views: expected at least one value, got {text!r}")
    return out


def add_arguments(p):
    p.add_argument("--checkpoint", help="trained SRN: a run folder (its newest checkpoint) or a .pth file "
                   "(not needed with --joint)")
    p.add_argument("--data", required=True, help="labelled data: a folder with train/ (and test/), or instance folders")
    p.add_argument("--out", required=True, help="folder for head_k<K>.pth files and semantic_train.json")
    p.add_argument("--views", type=k_list, default=[30], help="labelled training views K, chosen across objects; "
                   "a list trains one head each, e.g. all,30,10 (default 30)")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"], help="classifier on phi's features")
    p.add_argument("--hidden", type=int_list, default=[64], help="hidden widths of --head mlp (default 64)")
    p.add_argument("--steps", type=int, default=1000, help="head optimisation steps (Adam, cross-entropy)")
    p.add_argument("--lr", type=float, default=1e-2, help="head learning rate")
    p.add_argument("--batch-rays", type=int, default=8192, help="labelled rays per head step")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rays-per-view", type=int, default=None, help="use a random subset of each labelled view's "
                   "rays (default: every pixel)")
    p.add_argument("--sidelength", type=int, default=None, help="image size (default: the SRN run's last size)")
    j = p.add_argument_group("joint training (SRN + head from scratch on every label)")
    j.add_argument("--joint", action="store_true", help="train SRN and head together (fully supervised reference)")
    j.add_argument("--config-from", default=None, help="SRN run folder whose config.json (model, schedule) the joint "
                   "run copies (default: --checkpoint's run)")
    j.add_argument("--joint-steps", type=int, default=None, help="override the copied schedule's total steps "
                   "(single stage)")
    j.add_argument("--semantic-weight", type=float, default=1.0, help="weight of the cross-entropy in the joint loss")
    add_shared_options(p, seed="of the view choice and of the head")


def _run_joint(args, device) -> int:
    from ..checkpoint import load
    from ..semantic.features import class_names_for
    from ..semantic.head import save_head
    from ..semantic.joint import train_joint
    from ..training import TrainConfig, split_roots

    src = args.config_from or args.checkpoint
    if not src:
        raise UserError("--joint needs --config-from RUN (or --checkpoint) to copy the SRN's model and schedule")
    cfg_path = os.path.join(src, "config.json") if os.path.isdir(src) else None
    if cfg_path and os.path.isfile(cfg_path):
        with open(cfg_path) as fh:
            cfg_d = json.load(fh)
    else:
        cfg_d = (load(src).get("srn_fast") or {}).get("config")
        if not cfg_d:
            raise UserError(f"{src}: no training configuration stored (need a run folder with config.json)")
    run_dir = os.path.join(args.out, "joint")
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(os.path.join(run_dir, "checkpoints")):
        raise UserError(f"{run_dir}: a joint run already exists there; choose another --out")
    cfg_d.update(data=args.data, out=run_dir, device=str(device), backend=args.backend)
    if args.joint_steps is not None:
        cfg_d.update(steps=[args.joint_steps], sidelengths=cfg_d["sidelengths"][-1:],
                     batch_sizes=cfg_d["batch_sizes"][-1:])
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in cfg_d.items() if k in fields})
    train_root, _ = split_roots(args.data)
    names = class_names_for(args.data)
    hidden = args.hidden if args.head == "mlp" else []
    t0 = time.time()
    from ..health import NonFiniteLossError

    try:
        res = train_joint(cfg, len(names), hidden=hidden, weight=args.semantic_weight, progress=not args.no_progress)
    except NonFiniteLossError as e:
        raise UserError(str(e)) from None
    if res["interrupted"]:
        print(f"joint training interrupted at step {res['step']}; checkpoint {res['checkpoint']}")
        return 130
    ds = res["dataset"]
    path = os.path.join(args.out, "head_joint.pth")
    save_head(path, res["head"], {"srn_checkpoint": os.path.abspath(res["checkpoint"]), "k": len(ds), "label": "joint",
                                  "joint": True, "class_names": names, "seed": cfg.seed, "data": train_root,
                                  "sidelength": cfg.sidelengths[-1], "num_views": len(ds),
                                  "semantic_weight": args.semantic_weight, "steps": cfg.total_steps})
    print(f"joint SRN + head: {cfg.total_steps} steps in {time.time() - t0:.0f} s; SRN {res['checkpoint']}, "
          f"head {path}")
    return 0


def run(args) -> int:
    from .. import checkpoint as ckpt_io
    from ..data import SRNDataset
    from ..files import write_json
    from ..semantic.features import EVAL_SEED, class_names_for, extract_features, map_instances, select_views
    from ..semantic.head import save_head
    from ..semantic.train import fit_semantic_head, freeze
    from ..training import split_roots

    check_writable_dir(args.out)
    device = pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.joint:
        return _run_joint(args, device)
    if not args.checkpoint:
        raise UserError("--checkpoint is required (the trained SRN to freeze), unless --joint")
    ck = ckpt_io.load(args.checkpoint, map_location="cpu")
    meta = ck.get("srn_fast") or {}
    S = args.sidelength or ((meta.get("config") or {}).get("sidelengths") or [64])[-1]
    train_root, _ = split_roots(args.data)
    ds = SRNDataset(train_root, sidelength=S, with_depth=False, with_semantic=True)
    if not ds.has_semantic:
        raise UserError(f"{train_root}: instances have no semantic/ folder (part labels); generate data with "
                        f"`python -m srn_fast make-data`")
    model = ckpt_io.build_model(ck, backend=args.backend).to(device)
    imap = map_instances(ds.instance_names, meta.get("instance_names"), model.num_instances, train_root)
    names = class_names_for(args.data)
    hidden = args.hidden if args.head == "mlp" else []
    summary = {"checkpoint": ck["path"], "data": train_root, "sidelength": S, "backend": model.backend_name,
               "head": args.head, "hidden": hidden, "class_names": names, "heads": {}}
    chosen = {str(k): select_views(ds, k, seed=args.seed) for k in args.views}
    union = sorted(set(i for idx in chosen.values() for i in idx))
    freeze(model)  # every SRN parameter: requires_grad False; features rendered once under no_grad
    t0 = time.time()
    cache = extract_features(model, ds, union, instance_map=imap, rays_per_view=args.rays_per_view,
                             seed=EVAL_SEED + args.seed, num_classes=len(names), progress=not args.no_progress)
    cache["indices"] = union
    print(f"rendered features of {len(union)} labelled views ({cache['labels'].numel()} rays) in "
          f"{time.time() - t0:.1f} s (backend {model.backend_name})")
    for k in args.views:
        t0 = time.time()
        idx = chosen[str(k)]
        head, info = fit_semantic_head(model, ds, idx, len(names), hidden=hidden, steps=args.steps, lr=args.lr,
                                       batch_rays=args.batch_rays, weight_decay=args.weight_decay,
                                       instance_map=imap, rays_per_view=args.rays_per_view, seed=args.seed,
                                       progress=not args.no_progress, cache=cache)
        label = "all" if len(idx) == len(ds) else str(len(idx))
        views = [[ds.instance_names[ds.index[i][0]], int(ds.instances[ds.index[i][0]].observation_idcs[ds.index[i][1]])]
                 for i in idx]
        extra = {"srn_checkpoint": os.path.abspath(ck["path"]), "k": len(idx), "label": label, "joint": False,
                 "class_names": names, "seed": args.seed, "data": train_root, "sidelength": S, "views": views,
                 "num_rays": info["num_rays"], "class_counts": info["class_counts"], "history": info["history"],
                 "srn_digest": info["digest_after"], "steps": args.steps, "lr": args.lr}
        path = save_head(os.path.join(args.out, f"head_k{label}.pth"), head, extra)
        hist = info["history"][-1] if info["history"] else {}
        summary["heads"][label] = {"path": path, "k": len(idx), "views_per_object": _per_object(views),
                                   "num_rays": info["num_rays"], "final_loss": hist.get("loss"),
                                   "final_train_accuracy": hist.get("train_accuracy"), "seconds": time.time() - t0}
        print(f"K={label:>4}: {len(idx)} labelled views ({_per_object(views)}), {info['num_rays']} rays, final loss "
              f"{hist.get('loss', float('nan')):.4f}, train accuracy {hist.get('train_accuracy', float('nan')):.3f}; "
              f"SRN unchanged (sha256 {info['digest_after'][:12]}); {path}")
    write_json(os.path.join(args.out, "semantic_train.json"), summary)
    return 0


def _per_object(views):
    counts = {}
    for name, _ in views:
        counts[name] = counts.get(name, 0) + 1
    return counts
