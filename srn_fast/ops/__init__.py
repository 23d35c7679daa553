"""Fused operations backed by the compiled extension ``srn_fast._C``.

* :func:`lift_rays` — pixels to world rays (forward only).
"""
from .rays import lift_rays

__all__ = ["lift_rays"]
