"""Modules whose parameter names and shapes equal the reference SRN code's, so that its checkpoints load
unchanged (``pytorch_prototyping.FCLayer/FCBlock``, ``hyperlayers.HyperLinear/HyperLayer/HyperFC``,
``custom_layers.Raymarcher``). Their forward passes return :class:`~srn_fast.torch_impl.Layer` lists, which
the chosen backend evaluates; the arithmetic lives in :mod:`srn_fast.torch_impl` and :mod:`srn_fast.ops`.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn

from .torch_impl import mlp
from .types import LAYERNORM_EPS, Layer, LSTMParams


def _kaiming_relu(m: nn.Module) -> None:
    if type(m) == nn.Linear:  # noqa: E721 - exactly nn.Linear, as the reference
        nn.init.kaiming_normal_(m.weight, a=0.0, nonlinearity="relu", mode="fan_in")


class FCLayer(nn.Module):
    """``Linear -> LayerNorm (affine) -> ReLU``; submodules in ``net`` as the reference."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, out_features),
                                 nn.LayerNorm([out_features], eps=LAYERNORM_EPS), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(x)


class FCBlock(nn.Module):
    """FCLayer(in, hidden), ``num_hidden_layers`` x FCLayer(hidden, hidden), then Linear(hidden, out) if
    ``outermost_linear`` else FCLayer(hidden, out); every Linear kaiming-normal (fan_in, relu)."""

    def __init__(self, hidden_ch: int, num_hidden_layers: int, in_features: int, out_features: int,
                 outermost_linear: bool = False):
        super().__init__()
        mods = [FCLayer(in_features, hidden_ch)]
        mods += [FCLayer(hidden_ch, hidden_ch) for _ in range(num_hidden_layers)]
        mods.append(nn.Linear(hidden_ch, out_features) if outermost_linear else FCLayer(hidden_ch, out_features))
        self.net = nn.Sequential(*mods)
        self.net.apply(_kaiming_relu)

    def __getitem__(self, item):
        return self.net[item]

    def layers(self) -> List[Layer]:
        """The block as shared-weight :class:`Layer` specs (affine LayerNorm; last maybe plain linear)."""
        out = []
        for m in self.net:
            if isinstance(m, FCLayer):
                lin, ln = m.net[0], m.net[1]
                out.append(Layer(lin.weight, lin.bias, True, ln.weight, ln.bias))
            else:
                out.append(Layer(m.weight, m.bias, False))
        return out

    def forward(self, x):
        return mlp(x, self.layers())


def _last_hyper_layer_init(m: nn.Module) -> None:
    if type(m) == nn.Linear:  # noqa: E721
        nn.init.kaiming_normal_(m.weight, a=0.0, nonlinearity="relu", mode="fan_in")
        m.weight.data *= 1e-1


class HyperLinear(nn.Module):
    """Predicts one linear layer's weights ``[B, out, in]`` and bias ``[B, out]`` from a latent code."""

    def __init__(self, in_ch: int, out_ch: int, hyper_in_ch: int, hyper_num_hidden_layers: int,
                 hyper_hidden_ch: int):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        self.hypo_params = FCBlock(in_features=hyper_in_ch, hidden_ch=hyper_hidden_ch,
                                   num_hidden_layers=hyper_num_hidden_layers,
                                   out_features=in_ch * out_ch + out_ch, outermost_linear=True)
        self.hypo_params[-1].apply(_last_hyper_layer_init)

    def forward(self, z: torch.Tensor, mlp: Callable = mlp):
        """``z [B, hyper_in]`` -> weight ``[B, out, in]``, bias ``[B, out]``; ``mlp`` evaluates ``hypo_params``
        (a backend's ``hyper_mlp``; default :func:`srn_fast.torch_impl.mlp`)."""
        p = mlp(z, self.hypo_params.layers())
        n = self.in_ch * self.out_ch
        weight = p[..., :n].reshape(*p.shape[:-1], self.out_ch, self.in_ch)
        bias = p[..., n:n + self.out_ch]
        return weight, bias


class HyperLayer(nn.Module):
    """HyperLinear followed by LayerNorm (no affine) and ReLU (``norm_nl``, no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, hyper_in_ch: int, hyper_num_hidden_layers: int,
                 hyper_hidden_ch: int):
        super().__init__()
        self.hyper_linear = HyperLinear(in_ch, out_ch, hyper_in_ch, hyper_num_hidden_layers, hyper_hidden_ch)
        self.norm_nl = nn.Sequential(nn.LayerNorm([out_ch], elementwise_affine=False, eps=LAYERNORM_EPS),
                                     nn.ReLU(inplace=True))

    def forward(self, z: torch.Tensor, mlp: Callable = mlp) -> Layer:
        w, b = self.hyper_linear(z, mlp)
        return Layer(w, b, True)


class HyperFC(nn.Module):
    """A hypernetwork predicting a fully connected network; ``forward(z)`` returns its per-scene layers."""

    def __init__(self, hyper_in_ch: int, hyper_num_hidden_layers: int, hyper_hidden_ch: int, hidden_ch: int,
                 num_hidden_layers: int, in_ch: int, out_ch: int, outermost_linear: bool = False):
        super().__init__()
        kw = dict(hyper_in_ch=hyper_in_ch, hyper_num_hidden_layers=hyper_num_hidden_layers,
                  hyper_hidden_ch=hyper_hidden_ch)
        self.layers = nn.ModuleList([HyperLayer(in_ch, hidden_ch, **kw)])
        self.layers.extend(HyperLayer(hidden_ch, hidden_ch, **kw) for _ in range(num_hidden_layers))
        self.layers.append(HyperLinear(hidden_ch, out_ch, **kw) if outermost_linear
                           else HyperLayer(hidden_ch, out_ch, **kw))

    def forward(self, z: torch.Tensor, mlp: Callable = mlp) -> List[Layer]:
        """phi's per-scene layers from the codes ``z [B, hyper_in]``; ``mlp`` evaluates each hypernetwork."""
        out = []
        for m in self.layers:
            if isinstance(m, HyperLayer):
                out.append(m(z, mlp))
            else:
                w, b = m(z, mlp)
                out.append(Layer(w, b, False))
        return out


class Raymarcher(nn.Module):
    """Parameters of the reference ray marcher: ``lstm = LSTMCell(F, 16)`` and ``out_layer = Linear(16, 1)``.

    Initialisation as the reference: LSTMCell keeps PyTorch's default U(-1/sqrt(H), 1/sqrt(H)); the forget-gate
    quarter of both biases is set to 1.
    """

    def __init__(self, num_feature_channels: int, hidden_size: int = 16):
        super().__init__()
        self.lstm = nn.LSTMCell(input_size=num_feature_channels, hidden_size=hidden_size)
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if "bias" in name:
                    n = p.shape[0]
                    p[n // 4:n // 2].fill_(1.0)
        self.out_layer = nn.Linear(hidden_size, 1)

    def params(self) -> LSTMParams:
        l = self.lstm
        return LSTMParams(l.weight_ih, l.weight_hh, l.bias_ih, l.bias_hh, self.out_layer.weight,
                          self.out_layer.bias)
