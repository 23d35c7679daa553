"""Semantic SRN (Kohli, Sitzmann and Wetzstein, 2020): part segmentation of novel views from a classifier on the
features of a frozen SRN, trained on a few labelled views.

* :mod:`.head`: :class:`SemanticHead` (linear or MLP), input checks, atomic head files.
* :mod:`.features`: choosing the K labelled views across objects; rendering features with one march per ray.
* :mod:`.train`: freezing the SRN and fitting the head (cross-entropy); :mod:`.joint`: SRN + head from scratch.
* :mod:`srn_fast.metrics`: mIoU (background is a class) and pixel accuracy; :mod:`.evaluate` and :mod:`.viz`:
  scores and pictures. CLI: ``python -m srn_fast semantic-train`` / ``semantic-eval`` (:mod:`srn_fast.cli`).
"""
from ..metrics import LabelError, check_labels, confusion_matrix, majority_baseline
from ..metrics import segmentation_scores as scores
from .features import class_names_for, extract_features, map_instances, render_semantic, select_views
from .head import SemanticHead, SemanticInputError, load_head, save_head
from .train import fit_semantic_head, freeze, parameter_digest, train_head

__all__ = ["SemanticHead", "SemanticInputError", "LabelError", "check_labels", "save_head", "load_head", "select_views",
           "class_names_for", "extract_features", "render_semantic", "map_instances", "fit_semantic_head", "train_head", "freeze",
           "parameter_digest", "confusion_matrix", "scores", "majority_baseline"]
