"""The SRN model (Sitzmann et al., 2019): a drop-in for the reference ``srns.SRNsModel``.

Parameter names and shapes equal the reference's, so ``model.load_state_dict(torch.load(p)["model"])`` loads a
reference checkpoint and our checkpoints load into the reference code. The arithmetic is delegated to a
backend (:mod:`srn_fast.backends`): ``"torch"`` (pure PyTorch, the oracle) or ``"fused"`` (C++/CUDA kernels).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import get_backend
from .ops.precision import (choose_march_mode, resolve_matmul_dtype, store_budget,
                             store_bytes)
from .layers import FCBlock, HyperFC, Raymarcher
from .ops.march import initial_depth as draw_initial_depth
from .ops.march import lift_and_march

logger = logging.getLogger("srn_fast")
MARCH_MODE_CHOICES = ("auto", "recompute", "store")

# Loss weights of the reference train.py.
IMG_LOSS_WEIGHT = 200.0
DEPTH_REG_WEIGHT = 1e-3  # the reference's `l1_weight` (the loss itself is L2)
LATENT_REG_WEIGHT = 1.0


class ModelInputError(ValueError):
    """The model input dict does not have the expected keys, shapes or dtypes."""


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_model_input(model_input: Dict[str, torch.Tensor], num_instances: Optional[int] = None,
                      latent_dim: Optional[int] = None, values: bool = True) -> int:
    """Validate the reference's input dict; returns the batch size B. Errors name the key and the expectation.

    Accepts what the reference's ``SceneClassDataset`` + ``collate_fn`` produce: ``instance_idx`` ``[B]`` as a
    float tensor holding whole numbers (or any integer dtype), ``uv`` ``[B, N, 2]`` int64 or float, ``pose``
    ``[B, 4, 4]``, ``intrinsics`` ``[B, 4, 4]`` or ``[B, 3, 3]``; other keys (``rgb``, ``param``,
    ``observation_idx``, ...) are ignored. With ``values`` the values of ``instance_idx`` are checked too, by
    :func:`check_instance_values` (the one place that reads tensor values; ``SRNModel`` calls it separately).
    """
    if not isinstance(model_input, dict):
        raise ModelInputError(f"model_input must be a dict with keys instance_idx, pose, intrinsics, uv; "
                              f"got {type(model_input).__name__}")
    required = ["pose", "intrinsics", "uv"] + ([] if "z" in model_input else ["instance_idx"])
    missing = [k for k in required if k not in model_input]
    if missing:
        raise ModelInputError(f"model_input is missing key(s) {missing}; expected instance_idx [B] (or z [B, D]), "
                              f"pose [B, 4, 4], intrinsics [B, 3, 3] or [B, 4, 4], uv [B, N, 2]")
    for k in required + (["z"] if "z" in model_input else []):
        if not isinstance(model_input[k], torch.Tensor):
            raise ModelInputError(f"model_input['{k}'] must be a torch.Tensor, got {type(model_input[k]).__name__}")
    pose, K, uv = model_input["pose"], model_input["intrinsics"], model_input["uv"]
    if pose.dim() != 3 or tuple(pose.shape[1:]) != (4, 4):
        raise ModelInputError(f"model_input['pose'] must have shape [B, 4, 4] (cam2world), got {_shape(pose)}")
    B = pose.shape[0]
    if K.dim() != 3 or tuple(K.shape[1:]) not in ((3, 3), (4, 4)) or K.shape[0] != B:
        raise ModelInputError(f"model_input['intrinsics'] must have shape [B, 3, 3] or [B, 4, 4] with B={B}, "
                              f"got {_shape(K)}")
    if uv.dim() != 3 or uv.shape[0] != B or uv.shape[2] != 2:
        raise ModelInputError(f"model_input['uv'] must have shape [B, N, 2] with B={B}, got {_shape(uv)}")
    if uv.is_complex() or uv.dtype == torch.bool:
        raise ModelInputError(f"model_input['uv'] must be an integer or floating-point tensor, got {uv.dtype}")
    for k, t in (("pose", pose), ("intrinsics", K)):
        if not t.is_floating_point():
            raise ModelInputError(f"model_input['{k}'] must be a floating-point tensor, got {t.dtype}")
    if "z" in model_input:
        z = model_input["z"]
        if z.dim() != 2 or z.shape[0] != B or (latent_dim is not None and z.shape[1] != latent_dim):
            raise ModelInputError(f"model_input['z'] must have shape [B, {latent_dim or 'D'}] with B={B}, "
                                  f"got {_shape(z)}")
    else:
        idx = model_input["instance_idx"]
        if idx.is_complex() or idx.dtype == torch.bool:
            raise ModelInputError(f"model_input['instance_idx'] must be an integer tensor or a float tensor of "
                                  f"whole numbers, got {idx.dtype}")
        if idx.numel() != B or idx.dim() > 2:
            raise ModelInputError(f"model_input['instance_idx'] must have shape [B] with B={B}, got {_shape(idx)}")
        if values:
            check_instance_values(idx, num_instances)
    return B


def check_instance_values(idx: torch.Tensor, num_instances: Optional[int]) -> None:
    """The value checks of ``instance_idx`` (whole numbers, within the model's latent codes): the only place of
    the forward path that reads tensor values (one host sync), so it can be skipped where syncs are unwanted."""
    if not idx.numel():
        return
    if idx.is_floating_point():
        bad = ~torch.isfinite(idx) | (idx != torch.round(idx))
        if bool(bad.any()):
            v = idx.reshape(-1)[bad.reshape(-1)][0].item()
            raise ModelInputError(f"model_input['instance_idx'] must hold whole numbers (a float tensor as the "
                                  f"reference's loader makes is fine), got {v}")
    if num_instances is not None:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_instances:
            raise ModelInputError(f"model_input['instance_idx'] must lie in [0, {num_instances - 1}] (the model has "
                                  f"{num_instances} latent codes), got values in [{lo}, {hi}]")


class SRNModel(nn.Module):
    """Scene Representation Network with a hypernetwork (auto-decoder) or a single SRN.

    Args:
        num_instances: number of latent codes (scenes) in the auto-decoder.
        latent_dim: code size (reference ``--embedding_size``, 256).
        tracing_steps: ray-marching steps (reference default 10).
        fit_single_srn: no hypernetwork: phi = FCBlock(hidden, phi_layers - 2, 3, hidden) shared by all rays.
        backend: ``"auto"`` (fused when built, else torch), ``"fused"`` or ``"torch"``.
        phi_hidden: width of phi and of the pixel generator (256 in the reference).
        phi_layers: layers of phi, input and output included (4).
        rendering_layers: FCLayers of the pixel generator before its final Linear(hidden, 3) (5).
        lstm_hidden: hidden size of the ray-marching LSTM (16).
        march_mode: what the fused backend keeps for backward. ``"recompute"`` (memory-lean): the march stores per
            step only x, h, c and the LSTM gates, and phi at the surface and the pixel generator keep nothing;
            backward recomputes the activations. ``"store"``: all of them keep their activations (~25% faster
            training step in float32, several hundred MB more at 2 x 4096 rays). ``"auto"`` (default): store when
            what it keeps fits ``store_budget`` (``srn_fast.ops.precision.store_bytes``; with bf16 matmuls the CPU
            keeps xhat in bf16, half the bytes), else recompute; the choice is logged once (logger ``srn_fast``).
        matmul_dtype: ``torch.bfloat16`` for bf16 matmuls in the fused kernels (float32 accumulation; LayerNorm,
            LSTM and step update in float32), None / ``torch.float32`` for float32, ``"auto"``: bf16 only where this
            machine runs bf16 matmuls faster (measured once; :mod:`srn_fast.ops.precision`).
        store_budget: for ``march_mode="auto"``: bytes, or a fraction (<= 1) of the memory available on the device
            at the first render (default ``srn_fast.ops.precision.STORE_BUDGET_FRACTION``, 0.25).

    The defaults are the reference's; smaller widths are for demos and tests (then keys match, shapes do not).
    """

    def __init__(self, num_instances: int, latent_dim: int = 256, tracing_steps: int = 10,
                 fit_single_srn: bool = False, backend: str = "auto", phi_hidden: int = 256, phi_layers: int = 4,
                 rendering_layers: int = 5, lstm_hidden: int = 16, march_mode: str = "auto",
                 matmul_dtype: Union[None, str, torch.dtype] = None, store_budget: Union[None, int, float] = None):
        super().__init__()
        if num_instances < 1 and not fit_single_srn:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if phi_layers < 2 or rendering_layers < 1 or tracing_steps < 0:
            raise ValueError("phi_layers must be >= 2, rendering_layers >= 1 and tracing_steps >= 0")
        self.num_instances = num_instances
        self.latent_dim = latent_dim
        self.tracing_steps = tracing_steps
        self.fit_single_srn = fit_single_srn
        self.phi_hidden = phi_hidden
        if march_mode not in MARCH_MODE_CHOICES:
            raise ValueError(f"march_mode must be one of {MARCH_MODE_CHOICES}, got {march_mode!r}")
        resolve_matmul_dtype(matmul_dtype if matmul_dtype != "auto" else None, "cpu")  # validates the value
        self.march_mode = march_mode
        self.matmul_dtype = matmul_dtype
        self.store_budget = store_budget
        self._auto: Dict[tuple, object] = {}  # eager-time "auto" decisions per device type (see _auto_value)
        self._phi_widths = [phi_hidden] * phi_layers
        self._pix_widths = [phi_hidden] * rendering_layers + [3]
        self.set_backend(backend)

        if fit_single_srn:
            self.phi = FCBlock(hidden_ch=phi_hidden, num_hidden_layers=phi_layers - 2, in_features=3,
                               out_features=phi_hidden)
        else:
            self.latent_codes = nn.Embedding(num_instances, latent_dim)
            nn.init.normal_(self.latent_codes.weight, mean=0.0, std=0.01)
            self.hyper_phi = HyperFC(hyper_in_ch=latent_dim, hyper_num_hidden_layers=1, hyper_hidden_ch=latent_dim,
                                     hidden_ch=phi_hidden, num_hidden_layers=phi_layers - 2, in_ch=3,
                                     out_ch=phi_hidden)
        self.ray_marcher = Raymarcher(num_feature_channels=phi_hidden, hidden_size=lstm_hidden)
        self.pixel_generator = FCBlock(hidden_ch=phi_hidden, num_hidden_layers=rendering_layers - 1,
                                       in_features=phi_hidden, out_features=3, outermost_linear=True)

    # ------------------------------------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        self.backend = get_backend(backend)
        self.backend_name = self.backend.name

    def _auto_value(self, key: tuple, compute):
        """An "auto" decision's input, computed once in eager mode (it reads files or measures) and cached, so that
        a compiled render only reads the cache (None when compiling before any eager call)."""
        if key not in self._auto and not torch.compiler.is_compiling():
            self._auto[key] = compute()
        return self._auto.get(key)

    def resolved_matmul_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The matmul dtype the kernels get on ``device`` (``"auto"`` resolved; the torch backend: None)."""
        if self.matmul_dtype != "auto":
            return resolve_matmul_dtype(self.matmul_dtype, device)
        if self.backend_name != "fused":
            return None
        return self._auto_value(("matmul_dtype", device.type), lambda: resolve_matmul_dtype("auto", device))

    def resolved_march_mode(self, B: int, N: int, device: torch.device, dtype: torch.dtype) -> str:
        """The march mode for a render of B x N rays (``"auto"`` resolved against the memory budget)."""
        if self.march_mode != "auto":
            return self.march_mode
        budget = self._auto_value(("store_budget", device.type), lambda: store_budget(device, self.store_budget))
        mm = self.resolved_matmul_dtype(device)
        tiles = device.type == "cpu"
        need = store_bytes(B, N, self.tracing_steps, self._phi_widths, self._pix_widths,
                           torch.finfo(dtype).bits // 8, tiles=tiles,
                           xhat_size=2 if tiles and mm == torch.bfloat16 else None)
        mode = choose_march_mode(need, budget)
        if not torch.compiler.is_compiling() and ("logged", mode) not in self._auto:
            self._auto[("logged", mode)] = True
            logger.info(f"srn_fast: march_mode='auto' -> '{mode}' for {B} x {N} rays on {device.type}: "
                        + f"store mode keeps {need / 2 ** 20:.0f} MB, budget "
                        + (f"{budget / 2 ** 20:.0f} MB" if budget is not None else "unknown"))
        return mode

    def get_z(self, model_input: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        if self.fit_single_srn:
            return None
        if "z" in model_input:
            return model_input["z"]
        idx = model_input["instance_idx"].reshape(-1).long().to(self.latent_codes.weight.device)
        return self.latent_codes(idx)

    def phi_layers(self, z: Optional[torch.Tensor]):
        """phi as a list of :class:`~srn_fast.torch_impl.Layer` (per scene from the hypernetwork)."""
        if self.fit_single_srn:
            return self.phi.layers()
        layers = self.hyper_phi(z, self.backend.hyper_mlp)
        if self.backend_name == "fused":
            # a phi layer's weight [B, out, in] and bias [B, out] are views into the hypernetwork's output rows
            # [B, out * in + out]: made contiguous once here rather than by each of a step's fused op calls (march
            # and mlp, forward and backward: 12 copies of [2, 256, 256] a training step down to 3)
            layers = [l._replace(weight=l.weight.contiguous(), bias=l.bias.contiguous()) for l in layers]
        return layers

    def initial_depth(self, B: int, N: int, device, dtype=torch.float32,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The reference's initial depth, N(0.05, 5e-4) per ray, ``[B, N, 1]`` (:func:`srn_fast.ops.initial_depth`)."""
        return draw_initial_depth(B, N, device, dtype, generator)

    def render(self, model_input: Dict[str, torch.Tensor], initial_depth: Optional[torch.Tensor] = None,
               return_steps: bool = False) -> Dict[str, torch.Tensor]:
        """Render rays; returns a dict with ``rgb [B, N, 3]``, ``depth [B, N, 1]``, ``features [B, N, F]``
        (phi at the surface point, what the pixel generator reads), ``points [B, N, 3]``, ``z``, and with
        ``return_steps`` the per-step depths ``step_depths [T + 1, B, N, 1]``."""
        B = check_model_input(model_input, latent_dim=self.latent_dim, values=False)
        if not self.fit_single_srn and "z" not in model_input and not torch.compiler.is_compiling():
            # reads values (a host sync, and a graph break under torch.compile): checked in eager mode only
            check_instance_values(model_input["instance_idx"], self.num_instances)
        device = self.pixel_generator.net[0].net[0].weight.device
        dtype = self.pixel_generator.net[0].net[0].weight.dtype
        if self.backend_name == "fused" and torch.is_autocast_enabled(device.type):
            raise ModelInputError("backend='fused' does not run under torch.autocast (its kernels take float32 or "
                                  "float64 inputs): for bf16 matmuls use SRNModel(..., matmul_dtype=torch.bfloat16) "
                                  "(train --bf16), or backend='torch' to autocast the reference's code path")
        pose = model_input["pose"].to(device=device, dtype=dtype)
        K = model_input["intrinsics"].to(device=device, dtype=dtype)
        uv = model_input["uv"].to(device=device, dtype=dtype)
        N = uv.shape[1]
        z = self.get_z(model_input)
        if z is not None:
            z = z.to(device)
        phi = self.phi_layers(z)
        if initial_depth is None:
            initial_depth = self.initial_depth(B, N, device, dtype)
        elif tuple(initial_depth.shape) not in ((B, N, 1), (B, N)):
            raise ModelInputError(f"initial_depth must have shape [B, N, 1] = [{B}, {N}, 1], "
                                  f"got {_shape(initial_depth)}")
        lstm = self.ray_marcher.params()
        mode = self.resolved_march_mode(B, N, device, dtype)
        mm = self.resolved_matmul_dtype(device)

        def march(x0, dirs, rs):
            return self.backend.march(x0, dirs, phi, lstm, self.tracing_steps, grad_clamp=10.0, return_steps=rs,
                                      mode=mode, matmul_dtype=mm)

        marched = lift_and_march(march, uv, pose, K, initial_depth.to(device=device, dtype=dtype), return_steps)
        points, depth = marched.points, marched.depth
        result = {}
        if return_steps:
            result["step_depths"] = marched.step_depths
        # march_mode "recompute" is the memory-lean mode throughout: phi at the surface and the pixel generator
        # recompute their activations in backward too; "store" keeps them (faster, more memory).
        keep = mode == "store"
        features = self.backend.mlp(points, phi, matmul_dtype=mm, save_activations=keep)
        rgb = self.backend.mlp(features, self.pixel_generator.layers(), matmul_dtype=mm, save_activations=keep)
        result.update(rgb=rgb, depth=depth, features=features, points=points, z=z)
        return result

    def forward(self, model_input: Dict[str, torch.Tensor], z: Optional[torch.Tensor] = None):
        """Reference signature: returns ``(rgb [B, N, 3], depth [B, N, 1])``; keeps ``self.z`` for the latent loss."""
        if z is not None:
            model_input = dict(model_input, z=z)
        out = self.render(model_input)
        self.z = out["z"]
        return out["rgb"], out["depth"]

    # ------------------------------------------------------------------------------------------------
    # Losses of the reference (srns.py / train.py).
    @staticmethod
    def get_image_loss(prediction, ground_truth) -> torch.Tensor:
        rgb = prediction[0]
        trgt = ground_truth["rgb"].to(rgb.device)
        if trgt.shape != rgb.shape:
            raise ModelInputError(f"ground_truth['rgb'] must have shape {_shape(rgb)}, got {_shape(trgt)}")
        return F.mse_loss(rgb, trgt)

    @staticmethod
    def get_regularization_loss(prediction, ground_truth=None) -> torch.Tensor:
        depth = prediction[1]
        return torch.mean(torch.clamp(depth, max=0.0) ** 2) * 10000.0

    def get_latent_loss(self, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fit_single_srn:
            return torch.zeros((), device=self.pixel_generator.net[0].net[0].weight.device)
        z = self.z if z is None else z
        return torch.mean(z ** 2)

    def losses(self, prediction, ground_truth, z: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The reference's weighted total: 200 * MSE + 1e-3 * depth regulariser + 1 * mean(z^2)."""
        img = self.get_image_loss(prediction, ground_truth)
        reg = self.get_regularization_loss(prediction, ground_truth)
        lat = self.get_latent_loss(z)
        total = IMG_LOSS_WEIGHT * img + DEPTH_REG_WEIGHT * reg + LATENT_REG_WEIGHT * lat
        return {"total": total, "img": img, "depth_reg": reg, "latent": lat}
