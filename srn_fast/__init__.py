"""srn_fast: Scene Representation Networks with fused C++/CUDA kernels.

>>> import srn_fast
>>> model = srn_fast.SRNModel(num_instances=3)              # reference architecture and init
>>> rgb, depth = model({"instance_idx": idx, "pose": cam2world, "intrinsics": K, "uv": uv})
>>> fit = srn_fast.fit_latents(trained, views_of_new_objects)     # few-shot: fit.model, fit.history
"""
from . import geometry, torch_impl
from ._ext import available as extension_available
from ._ext import with_cuda as extension_with_cuda
from .backends import fused_available, get_backend
from .fewshot import FitConfig, FitResult, fit_latents
from .model import ModelInputError, SRNModel, check_model_input
from .types import Layer, LSTMParams

__version__ = "0.1.0"

__all__ = ["SRNModel", "ModelInputError", "check_model_input", "Layer", "LSTMParams", "geometry", "torch_impl",
           "get_backend", "fused_available", "extension_available", "extension_with_cuda", "fit_latents", "FitConfig",
           "FitResult", "__version__"]
