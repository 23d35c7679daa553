"""Fused operations backed by the compiled extension ``srn_fast._C``.

* :func:`mlp` — a stack of Linear -> LayerNorm -> ReLU layers with per-scene or shared weights.
* :func:`march` — the whole LSTM ray march, with a recomputing hand-written backward.
* :func:`march_camera` — the same from pixels + cameras (the reference Raymarcher's interface): draws or takes
  the initial depth, returns points, depth and optionally every step's depth.
* :func:`lift_rays` — pixels to world rays (forward only).
* :func:`wide_linear` — ``x W^T + b`` for few rows and many outputs (the hypernetwork's last layers).
"""
from .march import MarchResult, initial_depth, march, march_camera
from .mlp import mlp
from .rays import lift_rays
from .wide_linear import wide_linear

__all__ = ["mlp", "march", "march_camera", "MarchResult", "initial_depth", "lift_rays", "wide_linear"]
