"""The fully supervised reference point: the semantic head trained together with the SRN from the start, on the
labels of every training view, through the workflow's training loop (:func:`srn_fast.training.train` with an
:class:`~srn_fast.training.ExtraLoss`). Loss = the SRN's reference loss + ``weight`` * cross-entropy."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from ..training import ExtraLoss
from ..metrics import check_labels
from .head import SemanticHead, SemanticInputError


class SemanticLoss(ExtraLoss):
    """Cross-entropy of a :class:`SemanticHead` on phi's surface features against the per-ray part labels."""

    name = "semantic"
    keys = ("semantic",)
    dataset_kwargs = {"with_semantic": True}

    def __init__(self, head: SemanticHead, weight: float = 1.0):
        super().__init__(head)
        if weight <= 0:
            raise ValueError(f"semantic loss weight must be positive, got {weight}")
        self.weight = float(weight)

    def loss(self, logits: torch.Tensor, gt: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        labels = gt["semantic"]
        check_labels(labels, self.module.num_classes, tuple(logits.shape[:-1]), name="semantic labels",
                     error=SemanticInputError)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"total": self.weight * ce, "ce": ce, "accuracy": acc}


def train_joint(cfg, num_classes: int, hidden: Sequence[int] = (), weight: float = 1.0, resume: bool = False,
                progress: bool = True, log=print) -> Dict:
    """Train SRN + head from scratch with ``cfg`` (a :class:`srn_fast.training.TrainConfig`); returns the
    training summary with the trained ``head`` added."""
    from ..training import train

    torch.manual_seed(cfg.seed + 7)
    head = SemanticHead(cfg.phi_hidden, num_classes, hidden)
    res = train(cfg, resume=resume, progress=progress, log=log, extra_loss=SemanticLoss(head, weight))
    head.eval()
    return dict(res, head=head)
