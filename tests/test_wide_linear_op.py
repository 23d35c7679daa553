"""srn_fast.ops.wide_linear (the hypernetwork's last layers) against F.linear: values, gradients under a random
cotangent, float64 gradcheck and gradgradcheck, opcheck, the chunked CPU gradient's remainder, the extension's
one-pass CPU backward against the products, errors, the fused model's hypernetwork against the torch backend's, and
CPU vs CUDA."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import srn_fast
from srn_fast import ops
from srn_fast.ops.wide_linear import GRAD_X_CHUNKS, grad_input, wide_linear as wl_op

from op_utils import assert_close, cuda, require_extension

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _args(M, K, O, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=dtype, generator=gen).to(device).requires_grad_() for s in ((M, K), (O, K), (O,))]


# O = 65792 is a hypernetwork's 256 -> 256x256 + 256 layer; 1027 and 300 leave a remainder after the chunks; O < the
# chunk count and M = 1 take the plain product.
@pytest.mark.parametrize("M,K,O", [(2, 256, 65792), (3, 5, 1027), (5, 7, 300), (4, 6, 50), (1, 4, 1)])
def test_values_and_gradients_match_linear(M, K, O):
    args = _args(M, K, O)
    ref = [a.detach().clone().requires_grad_() for a in args]
    y, y_ref = ops.wide_linear(*args), F.linear(*ref)
    assert y.shape == (M, O) and y.is_contiguous()
    assert_close(y, y_ref, 1e-12, 1e-12, "y")
    g = torch.randn(M, O, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for name, a, b in zip(("x", "weight", "bias"), torch.autograd.grad(y, args, g), torch.autograd.grad(y_ref, ref, g)):
        assert_close(a, b, 1e-11, 1e-11, name)


@pytest.mark.parametrize("layout", ["addmm", "linear"])
def test_both_forward_layouts_match_linear(monkeypatch, layout):
    wl = importlib.import_module("srn_fast.ops.wide_linear")  # the module (srn_fast.ops.wide_linear is the function)

    monkeypatch.setattr(wl, "forward_layout", lambda x, weight: layout)
    monkeypatch.setattr(wl, "_fused_cpu", lambda t: None)  # the layouts: where the extension's forward does not run
    args = _args(2, 256, 1027)
    y = ops.wide_linear(*args)
    assert y.shape == (2, 1027) and y.is_contiguous()
    assert_close(y, F.linear(*args), 1e-12, 1e-12, layout)


def test_forward_layout_is_measured_once_per_shape(monkeypatch):
    wl = importlib.import_module("srn_fast.ops.wide_linear")  # the module (srn_fast.ops.wide_linear is the function)

    monkeypatch.setattr(wl, "MEASURE_MIN_NUMEL", 1)  # a small weight, timed as a large one is
    x, w, _ = _args(2, 8, 333)
    wl._layout_choice.clear()
    first = wl.forward_layout(x, w)
    assert first in ("addmm", "linear") and list(wl._layout_choice) == [((333, 8), 2, torch.float64)]
    wl._layout_choice[((333, 8), 2, torch.float64)] = "other"  # cached: not measured again
    assert wl.forward_layout(x, w) == "other"
    wl._layout_choice.clear()


def test_grad_input_chunks_cover_every_row():
    """The chunked CPU product of the gradient of x sums every one of the O rows once, remainder included."""
    for O in (GRAD_X_CHUNKS * 3, GRAD_X_CHUNKS * 3 + 7, GRAD_X_CHUNKS - 1):
        g = torch.zeros(2, O, dtype=torch.float64)
        w = torch.ones(O, 3, dtype=torch.float64)
        g[0] = 1.0
        g[1, -1] = 5.0
        out = grad_input(g, w)
        assert out[0].tolist() == [float(O)] * 3 and out[1].tolist() == [5.0] * 3


def test_gradcheck_gradgradcheck_and_opcheck():
    args = _args(3, 5, 300)
    assert torch.autograd.gradcheck(ops.wide_linear, args)
    assert torch.autograd.gradgradcheck(ops.wide_linear, args)
    torch.library.opcheck(torch.ops.srn_fast.wide_linear.default, tuple(a.detach().requires_grad_() for a in args),
                          test_utils=OPCHECK_TESTS)
    torch.library.opcheck(torch.ops.srn_fast.wide_linear.default, tuple(a.detach().float() for a in args),
                          test_utils=OPCHECK_TESTS)


# K = 256 / 16 / 8 (float32 / float64) rows fill 64-byte lines: grad_weight is streamed; K = 5, 7 take plain stores
@pytest.mark.parametrize("M,K,O", [(2, 256, 4160), (3, 16, 1027), (1, 8, 300), (4, 5, 77), (2, 7, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_cpu_backward_matches_products(M, K, O, dtype):
    """The extension's one-pass CPU backward (grad_x and grad_weight from one read of the weight, grad_weight
    streamed) against the plain products, for both gradients, each alone, and a grad_weight slot off a cache line."""
    ext = require_extension()
    wl = importlib.import_module("srn_fast.ops.wide_linear")
    gen = torch.Generator().manual_seed(3)
    g, x, w = (torch.randn(*s, dtype=dtype, generator=gen) for s in ((M, O), (M, K), (O, K)))
    assert wl._fused_cpu(g) is ext  # the path under test is the one the op takes
    eps = torch.finfo(dtype).eps
    d = [t.double() for t in (g, x, w)]
    rx, rw = d[0] @ d[2], d[0].t() @ d[1]  # float64 products; a sum of n terms is off by <= n eps sum |terms|
    bx, bw = 2 * O * eps * (d[0].abs() @ d[2].abs()), 2 * M * eps * (d[0].t().abs() @ d[1].abs())

    def check(a, ref, bound, name):
        assert a.dtype == dtype and a.shape == ref.shape, name
        err = (a.double() - ref).abs()
        assert (err <= bound + 1e-300).all(), f"{name}: max err {err.max().item():.3e}"

    gx, gw = torch.ops.srn_fast.wide_linear_grads(g, x, w, True, True)
    check(gx, rx, bx, "grad_x")
    check(gw, rw, bw, "grad_weight")
    gx1, gw1 = torch.ops.srn_fast.wide_linear_grads(g, x, w, True, False)
    assert gw1.shape == (0,) and torch.equal(gx1, gx)
    gx1, gw1 = torch.ops.srn_fast.wide_linear_grads(g, x, w, False, True)
    assert gx1.shape == (0,) and torch.equal(gw1, gw)
    off = torch.full((O * K + 1,), float("nan"), dtype=dtype)[1:].view(O, K)  # 4 or 8 bytes past a line
    ext.wide_linear_backward(g, x, w, torch.empty(0, dtype=dtype), off)
    assert torch.equal(off, gw), "grad_weight off a line"


@pytest.mark.parametrize("M,K,O", [(2, 256, 4160), (3, 16, 1027), (1, 7, 300), (8, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_cpu_forward_matches_linear(M, K, O, dtype):
    """The extension's one-pass CPU forward (the op's path on the CPU) against float64 F.linear, within the bound of
    a K-term sum; without a bias too; its errors name the argument."""
    ext = require_extension()
    wl = importlib.import_module("srn_fast.ops.wide_linear")
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, dtype=dtype, generator=gen) for s in ((M, K), (O, K), (O,)))
    assert wl._fused_cpu(x) is ext  # the path under test is the one the op takes
    y = ops.wide_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (M, O) and y.is_contiguous()
    d = [t.double() for t in (x, w, b)]
    bound = 2 * (K + 1) * torch.finfo(dtype).eps * (d[0].abs() @ d[1].abs().t() + d[2].abs())
    err = (y.double() - F.linear(*d)).abs()
    assert (err <= bound + 1e-300).all(), f"max err {err.max().item():.3e}"
    out = torch.full((M, O), float("nan"), dtype=dtype)
    ext.wide_linear_forward(x, w, torch.empty(0, dtype=dtype), out)
    err = (out.double() - d[0] @ d[1].t()).abs()  # every slot written (NaN before), within the bound
    assert (err <= bound + 1e-300).all(), f"no bias: max err {err.max().item():.3e}"
    with pytest.raises(RuntimeError, match=r"weight must have shape \[O, K\] with x's K"):
        ext.wide_linear_forward(x, w[:, :-1] if K > 1 else torch.empty(O, 2, dtype=dtype), b, out)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[O\] with weight's O"):
        ext.wide_linear_forward(x, w, torch.zeros(O + 1, dtype=dtype), out)
    with pytest.raises(RuntimeError, match=r"output out must have shape"):
        ext.wide_linear_forward(x, w, b, torch.empty(M, O + 1, dtype=dtype))


def test_fused_cpu_backward_opcheck_and_errors():
    ext = require_extension()
    g, x, w = torch.randn(2, 300, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64), torch.randn(300, 16)
    w = w.double()
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.srn_fast.wide_linear_grads.default, (g, x, w, *need),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    empty = torch.empty(0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[O, K\] with grad's O and x's K, got \[300, 15\]"):
        ext.wide_linear_backward(g, x, w[:, :15], empty, empty)
    with pytest.raises(RuntimeError, match=r"output grad_weight must have shape \[300, 16\], got \[300, 17\]"):
        ext.wide_linear_backward(g, x, w, empty, torch.empty(300, 17, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x has dtype Float but grad has dtype Double; they must match"):
        ext.wide_linear_backward(g, x.float(), w, empty, empty)


def test_only_the_needed_gradients():
    x, w, b = _args(2, 4, 260)
    w.requires_grad_(False)
    ops.wide_linear(x, w, b).sum().backward()
    assert w.grad is None and x.grad is not None and b.grad is not None


@pytest.mark.parametrize("args,match", [
    (((3, 4), (5, 4), (4,)), r"expected x \[M, K\], weight \[O, K\] and bias \[O\]"),
    (((3, 4), (5, 3), (5,)), r"expected x \[M, K\], weight \[O, K\] and bias \[O\]"),
    (((2, 3, 4), (5, 4), (5,)), r"x must be a 2-D tensor, got \(2, 3, 4\)"),
    (((3, 4), (5, 4), (1, 5)), r"bias must be a 1-D tensor, got \(1, 5\)"),
])
def test_bad_shapes_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        ops.wide_linear(*[torch.zeros(s) for s in args])


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match=r"weight must have x's dtype and device \(torch.float32, cpu\), got "
                                         r"torch.float64"):
        ops.wide_linear(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4))


def test_fused_hypernetwork_matches_torch_backend(monkeypatch):
    """The fused model evaluates its hypernetwork's last layers with wide_linear (one call per phi layer): phi's
    weights and the gradients of every hypernetwork parameter equal the torch backend's (float64)."""
    require_extension()
    calls = []
    monkeypatch.setattr(ops, "wide_linear", lambda *a: calls.append(a[1].shape) or wl_op(*a))
    torch.manual_seed(0)
    fused = srn_fast.SRNModel(3, latent_dim=16, phi_hidden=16, backend="fused").double()
    ref = srn_fast.SRNModel(3, latent_dim=16, phi_hidden=16, backend="torch").double()
    ref.load_state_dict(fused.state_dict())
    z = torch.randn(2, 16, dtype=torch.float64)
    grads = []
    for m in (fused, ref):
        layers = m.phi_layers(z)
        cot = torch.Generator().manual_seed(4)
        loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=cot)).sum()
                   for layer in layers for t in (layer.weight, layer.bias))
        grads.append(dict(zip([n for n, _ in m.hyper_phi.named_parameters()],
                              torch.autograd.grad(loss, list(m.hyper_phi.parameters())))))
    assert calls == [(16 * 3 + 16, 16)] + [(16 * 16 + 16, 16)] * 3, calls  # weight [O, K] of each phi layer
    for (a, b) in zip(fused.phi_layers(z), ref.phi_layers(z)):
        # the fused model hands its ops contiguous weights (one copy a layer, not one per op call)
        assert a.weight.is_contiguous() and a.bias.is_contiguous()
        assert_close(a.weight, b.weight, 1e-12, 1e-12, "phi weight")
        assert_close(a.bias, b.bias, 1e-12, 1e-12, "phi bias")
    for name in grads[1]:
        assert_close(grads[0][name], grads[1][name], 1e-10, 1e-12, name)


@cuda
def test_cuda_matches_cpu():
    cpu = _args(2, 64, 4160, dtype=torch.float32)
    gpu = [a.detach().cuda().requires_grad_() for a in cpu]
    g = torch.randn(2, 4160)
    y_cpu, y_gpu = ops.wide_linear(*cpu), ops.wide_linear(*gpu)
    assert_close(y_gpu.cpu(), y_cpu, 1e-4, 1e-4, "y")
    for name, a, b in zip(("x", "weight", "bias"), torch.autograd.grad(y_gpu, gpu, g.cuda()),
                          torch.autograd.grad(y_cpu, cpu, g)):
        assert_close(a.cpu(), b, 1e-4, 1e-3, name)
