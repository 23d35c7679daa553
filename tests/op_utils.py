"""Helpers shared by the tests: the extension (or a failure that says why it is missing), random layer stacks and
rebuilding them around other tensors, comparisons that report where they fail, and the check of a command's
one-line error."""
import os

import pytest
import torch

from srn_fast import _ext
from srn_fast.torch_impl import Layer, LSTMParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def require_extension():
    """srn_fast._C for the op tests. When it cannot be imported the tests FAIL with the import error, so that a
    run against an unbuilt copy is never green; ``SRN_FAST_ALLOW_NO_EXT=1`` skips them instead (a deliberate
    pure-PyTorch install)."""
    ext = _ext.load()
    if ext is not None:
        return ext
    msg = (f"srn_fast._C could not be imported ({_ext.describe()}); build it with "
           "`pip install --no-build-isolation .`, or set SRN_FAST_ALLOW_NO_EXT=1 to skip the fused-op tests")
    if os.environ.get("SRN_FAST_ALLOW_NO_EXT", "") == "1":
        pytest.skip(msg, allow_module_level=True)
    pytest.fail(msg, pytrace=False)


def assert_close(actual, expected, rtol, atol, name=""):
    """Like torch.testing.assert_close, naming the tensor and reporting max abs / rel error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    if not bool((diff <= tol).all()):
        i = int((diff - tol).argmax())
        raise AssertionError(f"{name}: max abs err {diff.max().item():.3e}, worst at flat index {i}: "
                             f"{actual.reshape(-1)[i].item():.6e} vs {expected.reshape(-1)[i].item():.6e}")


def make_layers(B, widths, per_scene=True, affine=False, last_linear=False, dtype=torch.float64, gen=None,
                requires_grad=True):
    layers = []
    for i, (ci, co) in enumerate(zip(widths[:-1], widths[1:])):
        shape = (B, co, ci) if per_scene else (co, ci)
        W = torch.randn(*shape, dtype=dtype, generator=gen) * (2.0 / ci) ** 0.5
        b = torch.randn(*shape[:-1], dtype=dtype, generator=gen) * 0.1
        linear = last_linear and i == len(widths) - 2
        g = be = None
        if affine and not linear:
            g = 1 + 0.2 * torch.randn(co, dtype=dtype, generator=gen)
            be = 0.1 * torch.randn(co, dtype=dtype, generator=gen)
        tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (W, b, g, be)]
        layers.append(Layer(tensors[0], tensors[1], not linear, tensors[2], tensors[3]))
    return layers


def layer_tensors(layers):
    """The tensors of ``layers`` in order (weight, bias, and the LayerNorm affine pair where present)."""
    return [t for layer in layers for t in (layer.weight, layer.bias, layer.ln_weight, layer.ln_bias)
            if isinstance(t, torch.Tensor)]


def with_tensors(layers, tensors):
    """``layers`` rebuilt around ``tensors`` (as many as :func:`layer_tensors` gives, in its order), e.g. the
    inputs gradcheck perturbs or copies in another dtype or on another device; the layer structure is kept."""
    it = iter(tensors)
    out = [Layer(*(next(it) if isinstance(t, torch.Tensor) else t for t in layer)) for layer in layers]
    if next(it, None) is not None:
        raise ValueError("with_tensors: more tensors than the layers hold")
    return out


def make_lstm(F, H=16, dtype=torch.float64, gen=None, scale=1.0):
    k = 1.0 / H ** 0.5
    def u(*s):
        return ((torch.rand(*s, dtype=dtype, generator=gen) * 2 - 1) * k * scale).requires_grad_()
    return LSTMParams(u(4 * H, F), u(4 * H, H), u(4 * H), u(4 * H), u(1, H), u(1))


def one_line_error(capsys, argv, *needles):
    """Run the command line ``argv``: it must exit with 2 and print one line ``error: ...`` (no traceback) holding
    every one of ``needles``; returns that line."""
    from srn_fast.cli import main

    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err
