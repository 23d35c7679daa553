"""Checkpoints in the reference's format, written atomically.

A checkpoint is ``torch.save({"model": state_dict, "optimizer": optimizer_state, "srn_fast": extra})``: the
reference code reads only ``"model"`` and ``"optimizer"`` (so our checkpoints load there), and reference
checkpoints (no ``"srn_fast"`` entry) load here; their model configuration is inferred from the tensor shapes.
``extra`` holds our own state: step, random-number-generator states, training configuration, model
configuration, instance names, camera facts for rendering.

Files are written atomically by :func:`srn_fast.files.save_torch` (a temporary name in the same folder, fsync,
``os.replace``), so a crash or Ctrl-C never leaves a half-written checkpoint under the real name (a kill -9 can
leave the hidden temporary; :mod:`srn_fast.runfolder` removes those). Reading a run folder takes its newest
*readable* checkpoint, saying which file was skipped; weights that are not finite are refused.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any, Callable, Dict, Optional

import torch

from .files import save_torch
from .model import SRNModel

MODEL_CONFIG_KEYS = ("num_instances", "latent_dim", "tracing_steps", "fit_single_srn", "phi_hidden", "phi_layers",
                     "rendering_layers", "lstm_hidden")
CHECKPOINT_GLOB = "step_*.pth"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def model_config(model: SRNModel) -> Dict[str, Any]:
    """The constructor arguments that determine the parameter shapes (and the march length)."""
    return {"num_instances": model.num_instances, "latent_dim": model.latent_dim,
            "tracing_steps": model.tracing_steps, "fit_single_srn": model.fit_single_srn,
            "phi_hidden": model.phi_hidden, "phi_layers": _phi_layers(model),
            "rendering_layers": len(model.pixel_generator.net) - 1,
            "lstm_hidden": model.ray_marcher.lstm.hidden_size}


def _phi_layers(model: SRNModel) -> int:
    return len(model.phi.net) if model.fit_single_srn else len(model.hyper_phi.layers)


def save(path: str, model: SRNModel, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``{"model", "optimizer", "srn_fast"}`` to ``path`` atomically; returns ``path``.

    ``extra`` (our step/RNG/config state) is stored under ``"srn_fast"`` together with the model configuration.
    """
    meta = dict(extra or {})
    meta.setdefault("model_config", model_config(model))
    obj = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
           "srn_fast": meta}
    return save_torch(path, obj)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def load(path: str, map_location="cpu", log: Optional[Callable[[str], None]] = _warn) -> Dict[str, Any]:
    """Read a checkpoint (ours or the reference's); returns the dict with at least ``"model"``.

    ``path`` is a file, or a run folder: then its newest readable ``step_*.pth``; unreadable newer ones (e.g.
    truncated by a full disk) are skipped and ``log`` is told which file was skipped and which one is used.
    Raises :class:`CheckpointError` naming the file when it is missing, unreadable or not a checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            latest(path)  # raises the "no checkpoints" error
        skipped = []
        for _, p in reversed(found):
            try:
                obj = _load_file(p, map_location)
            except CheckpointError as e:
                skipped.append(str(e))
                continue
            if skipped and log is not None:
                for msg in skipped:
                    log(f"{msg}; using {p}, the newest readable checkpoint of {path}")
            return obj
        raise CheckpointError(f"{path}: no readable checkpoint ({len(skipped)} file(s), e.g. {skipped[0]})")
    return _load_file(path, map_location)


def _load_file(path: str, map_location) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated files raise a zoo of exception types
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and "model" not in obj and obj and all(isinstance(v, torch.Tensor)
                                                                   for v in obj.values()):
        obj = {"model": obj}  # a bare state_dict
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state_dict (the reference's format)")
    obj["path"] = path
    return obj


def list_checkpoints(folder: str):
    """``[(step, path)]`` of ``step_*.pth`` files in ``folder`` (or ``folder/checkpoints``), sorted by step."""
    for f in (os.path.join(folder, "checkpoints"), folder):
        files = glob.glob(os.path.join(f, CHECKPOINT_GLOB))
        if files:
            out = []
            for p in files:
                m = re.search(r"step_(\d+)\.pth$", p)
                if m:
                    out.append((int(m.group(1)), p))
            return sorted(out)
    return []


def latest(folder: str) -> str:
    """The newest ``step_*.pth`` of a run folder; :class:`CheckpointError` if there is none."""
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no checkpoints (expected {folder}/checkpoints/{CHECKPOINT_GLOB})")
    return found[-1][1]


def infer_model_config(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Model configuration from the tensor shapes of a (reference) state_dict. ``tracing_steps`` is not stored
    in a state_dict; it is returned as None."""
    sd = state_dict
    try:
        pg = sorted({int(k.split(".")[2]) for k in sd if k.startswith("pixel_generator.net.")})
        lstm_hh = sd["ray_marcher.lstm.weight_hh"]
        cfg = {"phi_hidden": int(sd["pixel_generator.net.0.net.0.weight"].shape[0]),
               "rendering_layers": len(pg) - 1, "lstm_hidden": int(lstm_hh.shape[1]), "tracing_steps": None}
        if "latent_codes.weight" in sd:
            n, d = sd["latent_codes.weight"].shape
            layers = {int(k.split(".")[2]) for k in sd if k.startswith("hyper_phi.layers.")}
            cfg.update(num_instances=int(n), latent_dim=int(d), fit_single_srn=False, phi_layers=len(layers))
        else:
            layers = {int(k.split(".")[2]) for k in sd if k.startswith("phi.net.")}
            cfg.update(num_instances=1, latent_dim=256, fit_single_srn=True, phi_layers=len(layers))
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise CheckpointError(f"state_dict does not look like an SRN model (missing or odd key: {e})") from None
    return cfg


def checkpoint_model_config(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Our stored model configuration, or the one inferred from a reference checkpoint's shapes."""
    meta = ckpt.get("srn_fast") or {}
    cfg = dict(meta.get("model_config") or infer_model_config(ckpt["model"]))
    return cfg


def describe_mismatch(model: SRNModel, state_dict: Dict[str, torch.Tensor], where: str = "checkpoint") -> Optional[str]:
    """A one-line explanation of why ``state_dict`` does not fit ``model``, or None if it fits."""
    own = model.state_dict()
    if "latent_codes.weight" in own and "latent_codes.weight" in state_dict:
        n0, d0 = own["latent_codes.weight"].shape
        n1, d1 = state_dict["latent_codes.weight"].shape
        if d0 != d1:
            return (f"{where} has latent codes of size {d1} but the model uses size {d0} "
                    f"(set --latent-dim {d1})")
        if n0 != n1:
            return (f"{where} has {n1} latent codes (training instances) but the model has {n0} "
                    f"(the data folder must hold the same {n1} instances the checkpoint was trained on)")
    if ("latent_codes.weight" in own) != ("latent_codes.weight" in state_dict):
        kind = "a single SRN (--fit-single-srn)" if "latent_codes.weight" not in state_dict else "a hypernetwork SRN"
        return f"{where} holds {kind}, which does not fit this model"
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        return (f"{where} does not fit the model: {len(missing)} missing key(s) (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:2]}); different number of layers?")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            return (f"{where} does not fit the model: {k} has shape {tuple(state_dict[k].shape)} in the file but "
                    f"{tuple(v.shape)} in the model (different widths: --phi-hidden / --lstm-hidden?)")
    return None


def load_model_state(model: SRNModel, ckpt: Dict[str, Any], skip_latents: bool = False) -> None:
    """Load ``ckpt["model"]`` into ``model`` with a clear :class:`CheckpointError` when it does not fit.

    ``skip_latents`` keeps the model's own latent codes (the few-shot protocol drops the trained ones).
    """
    sd = dict(ckpt["model"])
    where = ckpt.get("path", "checkpoint")
    if skip_latents:
        sd.pop("latent_codes.weight", None)
        own = model.state_dict()
        if "latent_codes.weight" in own:
            sd["latent_codes.weight"] = own["latent_codes.weight"]
        if "latent_codes.weight" in ckpt["model"] and "latent_codes.weight" in own:
            d_file = ckpt["model"]["latent_codes.weight"].shape[1]
            if d_file != own["latent_codes.weight"].shape[1]:
                raise CheckpointError(f"{where} has latent codes of size {d_file} but the model uses size "
                                      f"{own['latent_codes.weight'].shape[1]}")
    msg = describe_mismatch(model, sd, where)
    if msg:
        raise CheckpointError(msg)
    check_finite(sd, where)
    model.load_state_dict(sd)


def check_finite(state_dict: Dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """:class:`CheckpointError` if any floating-point tensor of ``state_dict`` holds NaN or inf."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        k = next(iter(bad))
        raise CheckpointError(f"{where}: holds non-finite weights ({sum(bad.values())} NaN/inf values in "
                              f"{len(bad)} tensor(s), e.g. {k}); the run diverged before this checkpoint was "
                              f"written: use an earlier checkpoint")


def build_model(ckpt: Dict[str, Any], backend: str = "auto", num_instances: Optional[int] = None,
                tracing_steps: Optional[int] = None, skip_latents: bool = False, **kw) -> SRNModel:
    """A :class:`SRNModel` built from a checkpoint's (stored or inferred) configuration, weights loaded.

    ``num_instances`` overrides the number of latent codes (with ``skip_latents`` for new objects).
    """
    cfg = checkpoint_model_config(ckpt)
    if num_instances is not None:
        cfg["num_instances"] = num_instances
    if tracing_steps is not None:
        cfg["tracing_steps"] = tracing_steps
    if cfg.get("tracing_steps") is None:
        cfg["tracing_steps"] = 10
    model = SRNModel(backend=backend, **{k: cfg[k] for k in MODEL_CONFIG_KEYS}, **kw)
    load_model_state(model, ckpt, skip_latents=skip_latents)
    return model
