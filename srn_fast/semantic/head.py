"""The semantic head of Semantic SRN (Kohli, Sitzmann and Wetzstein, 2020): a classifier on phi's feature at the
marched surface point, i.e. on ``SRNModel.render(...)["features"]``, the same vector the pixel generator reads.

A linear classifier by default (the paper's choice: the features of a trained SRN already separate parts), an MLP
(``hidden=(h1, h2, ...)``, Linear + ReLU) as an option. Labels follow the data module: 0 = background, 1..P parts;
the head predicts all ``num_classes = P + 1`` classes, background included.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..files import save_torch
from ..metrics import LabelError


class SemanticInputError(LabelError):
    """Features, labels or head files that are not what the semantic head expects. (Its base class
    :class:`srn_fast.metrics.LabelError` is what :func:`srn_fast.metrics.check_labels` and
    :func:`~srn_fast.metrics.confusion_matrix` raise when called directly.)"""


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_features(features: torch.Tensor, in_features: int, name: str = "features") -> None:
    """``features [..., F]`` floating point with ``F == in_features``."""
    if not isinstance(features, torch.Tensor):
        raise SemanticInputError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise SemanticInputError(f"{name} must be floating point, got {features.dtype}")
    if features.dim() < 1 or features.shape[-1] != in_features:
        raise SemanticInputError(f"{name} must have shape [..., {in_features}] (phi's feature width), "
                                 f"got {_shape(features)}")


class SemanticHead(nn.Module):
    """Per-ray part classifier: ``logits [..., C] = head(features [..., F])``.

    Args:
        in_features: F, phi's output width (``SRNModel.phi_hidden``).
        num_classes: C = parts + 1 (class 0 is background).
        hidden: widths of hidden layers; empty (default) = a single Linear (the linear classifier).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = ()):
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"SemanticHead needs in_features >= 1 and num_classes >= 2 (background + a part), got "
                             f"{in_features}, {num_classes}")
        self.in_features, self.num_classes, self.hidden = int(in_features), int(num_classes), [int(h) for h in hidden]
        layers, w = [], self.in_features
        for h in self.hidden:
            if h < 1:
                raise ValueError(f"hidden widths must be >= 1, got {list(hidden)}")
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        layers.append(nn.Linear(w, self.num_classes))
        self.net = nn.Sequential(*layers)

    @property
    def kind(self) -> str:
        return "mlp" if self.hidden else "linear"

    def config(self) -> Dict[str, Any]:
        return {"in_features": self.in_features, "num_classes": self.num_classes, "hidden": list(self.hidden)}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.in_features)
        return self.net(features.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``[...]`` int64 arg-max class of ``features [..., F]``."""
        return self(features).argmax(-1)


def save_head(path: str, head: SemanticHead, extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``{"semantic_head": state_dict, "config": ..., "srn_fast_semantic": extra}`` atomically."""
    save_torch(path, {"semantic_head": head.state_dict(), "config": head.config(), "srn_fast_semantic": dict(extra or {})},
               makedirs=True)
    return path


def load_head(path: str, map_location="cpu"):
    """``(head, extra)`` from a file written by :func:`save_head`; clear errors for missing or foreign files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "semantic head file not found", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise SemanticInputError(f"{path}: not a readable semantic head file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "semantic_head" not in obj or "config" not in obj:
        raise SemanticInputError(f"{path}: not a semantic head file (expected keys 'semantic_head' and 'config'; "
                                 f"an SRN checkpoint goes to --checkpoint)")
    head = SemanticHead(**obj["config"])
    head.load_state_dict(obj["semantic_head"])
    return head, obj.get("srn_fast_semantic", {})
