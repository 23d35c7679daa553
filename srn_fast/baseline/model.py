"""The encoder-decoder novel-view baseline of Tatarchenko, Dosovitskiy & Brox (ECCV 2016), the 2D baseline of
the SRN paper's Figure 2.

The network sees ONE image of an object and a target viewpoint and directly "imagines" the target view: a
convolutional encoder turns the image into a code, the viewpoint passes through a small MLP and is concatenated
to the code, fully connected layers mix the two, and an up-convolutional decoder outputs the target view's RGB
and depth. There is no 3D structure anywhere (no rays, no geometry): exactly the property SRN argues against.

Adaptation to our image sizes (the paper works at 128 x 128 with 5x5/3x3 strided convolutions, LeakyReLU,
large fully connected layers, a 64-unit viewpoint MLP and up-convolutions; widths here are ours):

    input image [B, 3, S, S] (S a power of two >= 8; 64 by default)
      encoder: log2(S) - 2 stages, each Conv(k5 for the first two stages, k3 after, stride 2) + LeakyReLU(0.2),
               channels width * (1, 2, 4, 8, 8, ...) -> [B, C, 4, 4] -> flatten -> FC(code) -> FC(code)
      viewpoint v [B, P] (see :func:`viewpoint_vector`) -> FC(64) -> FC(64) -> FC(64), LeakyReLU
      joint: concat(code, view) -> FC(code) -> FC(code) -> FC(C * 4 * 4) -> reshape [B, C, 4, 4]
      decoder: log2(S) - 2 stages of ConvTranspose(k4, stride 2) + LeakyReLU, mirroring the encoder channels;
               the last stage outputs 4 channels: RGB (tanh, so colours lie in [-1, 1]) and depth (linear).

Viewpoint encodings (``pose_mode``): ``"both"`` (default): the input and target cam2world matrices (top 3x4 rows,
24 numbers) -- the same information SRN gets when it fits a latent code from the posed input view and renders
the target pose; ``"target"``: only the target cam2world (12 numbers; the paper's choice of an absolute target
viewpoint for canonically aligned objects); ``"relative"``: the target camera in the input camera's frame,
``inv(input) @ target`` (12 numbers).

Loss (:func:`baseline_loss`): L2 on colour over all pixels plus ``depth_weight`` (1.0 by default) times L2 on depth
over the target's foreground pixels (ground-truth depth > 0), each a mean over its pixels.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

POSE_MODES = {"both": 24, "target": 12, "relative": 12}
VIEW_HIDDEN = 64
NEG_SLOPE = 0.2


def _lrelu():
    return nn.LeakyReLU(NEG_SLOPE, inplace=True)


def viewpoint_vector(input_pose: torch.Tensor, target_pose: torch.Tensor, pose_mode: str = "both") -> torch.Tensor:
    """Flattened viewpoint fed to the viewpoint MLP.

    Args:
        input_pose: ``[B, 4, 4]`` cam2world of the input view.
        target_pose: ``[B, 4, 4]`` cam2world of the view to predict.
        pose_mode: ``"both"``, ``"target"`` or ``"relative"`` (see the module docstring).
    Returns:
        ``[B, P]`` with P = 24 for ``"both"``, 12 otherwise.
    """
    if pose_mode not in POSE_MODES:
        raise ValueError(f"pose_mode must be one of {sorted(POSE_MODES)}, got {pose_mode!r}")
    for name, t in (("input_pose", input_pose), ("target_pose", target_pose)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (4, 4):
            raise ValueError(f"{name} must have shape [B, 4, 4], got {list(t.shape)}")
    if input_pose.shape[0] != target_pose.shape[0]:
        raise ValueError(f"input_pose and target_pose must have the same batch size, got "
                         f"{input_pose.shape[0]} and {target_pose.shape[0]}")
    B = target_pose.shape[0]
    if pose_mode == "target":
        return target_pose[:, :3, :].reshape(B, 12)
    if pose_mode == "relative":
        return (torch.linalg.inv(input_pose) @ target_pose)[:, :3, :].reshape(B, 12)
    return torch.cat([input_pose[:, :3, :].reshape(B, 12), target_pose[:, :3, :].reshape(B, 12)], dim=1)


class TatarchenkoNet(nn.Module):
    """Image + target viewpoint -> target RGB and depth (see the module docstring for the layers).

    Args:
        sidelength: image size S (power of two, >= 8).
        width: channels of the first encoder stage (the paper's first layer has 32).
        code_dim: width of the fully connected code layers.
        pose_mode: viewpoint encoding, ``"both"``, ``"target"`` or ``"relative"``.
    """

    def __init__(self, sidelength: int = 64, width: int = 32, code_dim: int = 1024, pose_mode: str = "both"):
        super().__init__()
        if sidelength < 8 or sidelength & (sidelength - 1):
            raise ValueError(f"sidelength must be a power of two >= 8, got {sidelength}")
        if width < 1 or code_dim < 1:
            raise ValueError(f"width and code_dim must be >= 1, got {width} and {code_dim}")
        if pose_mode not in POSE_MODES:
            raise ValueError(f"pose_mode must be one of {sorted(POSE_MODES)}, got {pose_mode!r}")
        self.config = dict(sidelength=sidelength, width=width, code_dim=code_dim, pose_mode=pose_mode)
        self.sidelength, self.pose_mode = sidelength, pose_mode
        stages = int(math.log2(sidelength)) - 2
        chans = [width * 2 ** min(k, 3) for k in range(stages)]
        enc, c_in = [], 3
        for k, c in enumerate(chans):
            ks = 5 if k < 2 else 3
            enc += [nn.Conv2d(c_in, c, ks, stride=2, padding=ks // 2), _lrelu()]
            c_in = c
        self.encoder = nn.Sequential(*enc)
        self.bottleneck = (chans[-1], 4, 4)
        flat = chans[-1] * 16
        self.encoder_fc = nn.Sequential(nn.Linear(flat, code_dim), _lrelu(), nn.Linear(code_dim, code_dim), _lrelu())
        self.view_mlp = nn.Sequential(nn.Linear(POSE_MODES[pose_mode], VIEW_HIDDEN), _lrelu(),
                                      nn.Linear(VIEW_HIDDEN, VIEW_HIDDEN), _lrelu(),
                                      nn.Linear(VIEW_HIDDEN, VIEW_HIDDEN), _lrelu())
        self.joint_fc = nn.Sequential(nn.Linear(code_dim + VIEW_HIDDEN, code_dim), _lrelu(),
                                      nn.Linear(code_dim, code_dim), _lrelu(), nn.Linear(code_dim, flat), _lrelu())
        dec, c_in = [], chans[-1]
        outs = list(reversed(chans[:-1])) + [4]
        for k, c in enumerate(outs):
            dec.append(nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1))
            if k < len(outs) - 1:
                dec.append(_lrelu())
            c_in = c
        self.decoder = nn.Sequential(*dec)

    def forward(self, image: torch.Tensor, input_pose: torch.Tensor, target_pose: torch.Tensor
                ) -> Dict[str, torch.Tensor]:
        """Predict the target view.

        Args:
            image: ``[B, 3, S, S]`` input view, colours in [-1, 1].
            input_pose, target_pose: ``[B, 4, 4]`` cam2world matrices.
        Returns:
            dict with ``rgb [B, 3, S, S]`` in [-1, 1] and ``depth [B, 1, S, S]`` (camera z).
        """
        S = self.sidelength
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, S, S):
            raise ValueError(f"image must have shape [B, 3, {S}, {S}], got {list(image.shape)}")
        if image.shape[0] != target_pose.shape[0]:
            raise ValueError(f"image and target_pose must have the same batch size, got {image.shape[0]} and "
                             f"{target_pose.shape[0]}")
        B = image.shape[0]
        dtype = image.dtype
        code = self.encoder_fc(self.encoder(image).reshape(B, -1))
        view = self.view_mlp(viewpoint_vector(input_pose.to(dtype), target_pose.to(dtype), self.pose_mode))
        h = self.joint_fc(torch.cat([code, view], dim=1)).reshape(B, *self.bottleneck)
        out = self.decoder(h)
        return {"rgb": torch.tanh(out[:, :3]), "depth": out[:, 3:4]}


def baseline_loss(pred: Dict[str, torch.Tensor], target_rgb: torch.Tensor, target_depth: Optional[torch.Tensor],
                  depth_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """L2 on colour (all pixels) + ``depth_weight`` * L2 on depth (ground-truth foreground, depth > 0).

    Args:
        pred: output of :class:`TatarchenkoNet` (``rgb [B, 3, S, S]``, ``depth [B, 1, S, S]``).
        target_rgb: ``[B, 3, S, S]`` in [-1, 1].
        target_depth: ``[B, 1, S, S]`` camera z with 0 on the background, or None (no depth term).
    Returns:
        dict with ``total``, ``rgb`` and ``depth`` (scalars; ``depth`` is 0 without depth or foreground).
    """
    if target_rgb.shape != pred["rgb"].shape:
        raise ValueError(f"target_rgb must have shape {list(pred['rgb'].shape)}, got {list(target_rgb.shape)}")
    rgb = F.mse_loss(pred["rgb"], target_rgb)
    depth = rgb.new_zeros(())
    if target_depth is not None and depth_weight != 0:
        if target_depth.shape != pred["depth"].shape:
            raise ValueError(f"target_depth must have shape {list(pred['depth'].shape)}, "
                             f"got {list(target_depth.shape)}")
        fg = (target_depth > 0).to(pred["depth"].dtype)
        n = fg.sum()
        if n > 0:
            depth = (((pred["depth"] - target_depth) ** 2) * fg).sum() / n
    return {"total": rgb + depth_weight * depth, "rgb": rgb, "depth": depth}
