"""Fused operations backed by the compiled extension ``srn_fast._C``.

* :func:`mlp` — a stack of Linear -> LayerNorm -> ReLU layers with per-scene or shared weights.
* :func:`march` — the whole LSTM ray march, with a recomputing hand-written backward.
* :func:`lift_rays` — pixels to world rays (forward only).
"""
from .march import march
from .mlp import mlp
from .rays import lift_rays

__all__ = ["mlp", "march", "lift_rays"]
