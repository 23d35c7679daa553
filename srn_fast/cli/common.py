"""Helpers shared by the workflow commands (train, eval, render, demo)."""
from __future__ import annotations

import os
from typing import List, Optional

from . import UserError


def int_list(text: str) -> List[int]:
    """``"64,128"`` -> ``[64, 128]`` (an argparse type)."""
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 64,128; got {text!r}") from None
    if not vals:
        raise ValueError(f"expected at least one integer, got {text!r}")
    return vals


def check_writable_dir(path: str, what: str = "output folder") -> None:
    """Fail early, with one line, when ``path`` cannot be created or written (nothing is created here)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"{path}: {what} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{path}: {what} is not writable")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot create the {what} ({parent} is not writable)")


def add_backend(p, default: Optional[str] = "auto") -> None:
    p.add_argument("--backend", default=default, choices=["auto", "fused", "torch"],
                   help="fused C++/CUDA kernels, pure PyTorch, or auto (fused when built)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def pick_device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(name)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return d
