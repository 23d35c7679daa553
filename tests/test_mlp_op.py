"""srn_fast.ops.mlp (fused MLP, hand-written backward) against the pure-PyTorch oracle torch_impl.mlp."""
import pytest
import torch

import srn_fast
from srn_fast import ops, torch_impl
from srn_fast.torch_impl import Layer

from op_utils import cuda, require_extension
from op_utils import assert_close, layer_tensors, with_tensors
from op_utils import make_layers as make_case_layers

ext = require_extension()

KINDS = ("phi", "pixgen", "mixed")


def make_layers(kind, B, widths, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """phi: per-scene weights, LayerNorm without affine on every layer; pixgen: shared weights, affine
    LayerNorm, plain linear last layer; mixed: per-scene and shared layers, affine and not, linear last."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    layers = []
    L = len(widths) - 1
    for l in range(L):
        ci, co = widths[l], widths[l + 1]
        per_scene = kind == "phi" or (kind == "mixed" and l % 2 == 0)
        affine = kind == "pixgen" or (kind == "mixed" and l % 2 == 1)
        norm = kind == "phi" or l < L - 1
        wshape = (B, co, ci) if per_scene else (co, ci)
        bshape = (B, co) if per_scene else (co,)
        W, b = rnd(*wshape, scale=ci ** -0.5), rnd(*bshape, scale=0.3)
        if affine and norm:
            layers.append(Layer(W, b, True, rnd(co, scale=0.3).detach().add_(1.0).requires_grad_(requires_grad),
                                rnd(co, scale=0.3)))
        else:
            layers.append(Layer(W, b, norm))
    return layers


def tensors_of(x, layers):
    return [x] + layer_tensors(layers)


def max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.fixture(params=["blas", "aten"])
def gemm_backend(request):
    """Both CPU matmul backends of the tile loops (torch's MKL symbols, or at::mm on views)."""
    if request.param == "blas":
        try:
            ext.set_cpu_gemm_backend("blas")
        except RuntimeError:
            pytest.skip("this torch build exports no BLAS symbols")
    else:
        ext.set_cpu_gemm_backend("aten")
    yield request.param
    ext.set_cpu_gemm_backend("auto")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("save", [True, False])
def test_forward_backward_match_oracle(kind, dtype, tol, save, gemm_backend):
    B, N, widths = 2, 45, [3, 24, 20, 16, 5]
    layers = make_layers(kind, B, widths, dtype, requires_grad=True)
    x = torch.randn(B, N, 3, dtype=dtype, requires_grad=True)
    v = torch.randn(B, N, widths[-1], dtype=dtype)
    inputs = tensors_of(x, layers)
    # tile_rows=16: several tiles per scene and a partial last tile
    y = ops.mlp(x, layers, tile_rows=16, save_activations=save)
    y_ref = torch_impl.mlp(x, layers)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert max_err(y, y_ref) < tol * 10
    grads = torch.autograd.grad(y, inputs, v)
    grads_ref = torch.autograd.grad(y_ref, inputs, v)
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert g.shape == r.shape, i
        scale = max(1.0, r.abs().max().item())
        assert max_err(g, r) < tol * 50 * scale, (i, max_err(g, r))


CASES = [
    dict(per_scene=True, affine=False, last_linear=False),   # phi
    dict(per_scene=False, affine=True, last_linear=True),    # pixel generator
    dict(per_scene=True, affine=True, last_linear=True),
    dict(per_scene=False, affine=False, last_linear=False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-4, 2e-4)])
def test_layer_kinds_match_oracle_default_tiles(case, dtype, rtol, atol):
    """Default tile size, several tiles and a partial one; element-wise tolerances."""
    gen = torch.Generator().manual_seed(0)
    B, N = 2, 333
    layers = make_case_layers(B, [3, 24, 24, 5], dtype=dtype, gen=gen, **case)
    x = torch.randn(B, N, 3, dtype=dtype, generator=gen).requires_grad_()
    ref = torch_impl.mlp(x, layers)
    out = ops.mlp(x, layers)
    assert_close(out, ref, rtol, atol, "forward")
    v = torch.randn(ref.shape, dtype=dtype, generator=gen)
    inputs = [x] + layer_tensors(layers)
    grads = torch.autograd.grad(out, inputs, v, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, inputs, v, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_close(a, b, rtol * 10, atol * 10, f"grad of input {i}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("save", [True, False])
def test_batched_path_matches_oracle(case, save):
    """tile_rows=0: the whole batch as one tile through batched GEMMs and the element-wise stages, i.e. the CUDA
    backend's code path, here on the CPU (so its logic is tested without a GPU)."""
    gen = torch.Generator().manual_seed(1)
    B, N = 2, 57
    layers = make_case_layers(B, [3, 24, 24, 5], dtype=torch.float64, gen=gen, **case)
    x = torch.randn(B, N, 3, dtype=torch.float64, generator=gen).requires_grad_()
    ref = torch_impl.mlp(x, layers)
    out = ops.mlp(x, layers, tile_rows=0, save_activations=save)
    assert_close(out, ref, 1e-10, 1e-10, "forward")
    v = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    inputs = [x] + layer_tensors(layers)
    grads = torch.autograd.grad(out, inputs, v, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, inputs, v, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_close(a, b, 1e-9, 1e-9, f"grad of input {i}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save", [True, False])
def test_gradcheck_float64(kind, save):
    layers = make_layers(kind, 2, [3, 6, 5, 4], torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    inputs = tensors_of(x, layers)

    def f(x, *params):
        return ops.mlp(x, with_tensors(layers, params), tile_rows=3, save_activations=save)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("N", [0, 1])
@pytest.mark.parametrize("kind", ["phi", "pixgen"])
def test_zero_and_one_ray(N, kind):
    layers = make_layers(kind, 2, [3, 8, 4], torch.float64, requires_grad=True)
    x = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
    y, y_ref = ops.mlp(x, layers), torch_impl.mlp(x, layers)
    assert y.shape == (2, N, 4)
    assert max_err(y, y_ref) < 1e-12
    inputs = tensors_of(x, layers)
    v = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, inputs, v), torch.autograd.grad(y_ref, inputs, v)):
        assert g.shape == r.shape and max_err(g, r) < 1e-12


def test_non_contiguous_inputs():
    B, N = 2, 33
    layers = make_layers("mixed", B, [3, 12, 10, 4], torch.float64)
    # transposed storage for x and every weight, a strided bias
    x = torch.randn(3, N, B, dtype=torch.float64).permute(2, 1, 0).requires_grad_()
    nc = []
    for ly in layers:
        W = ly.weight.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
        b = torch.stack([ly.bias.detach(), ly.bias.detach()], -1)[..., 0].requires_grad_()
        assert not W.is_contiguous() and not b.is_contiguous()
        ln = {k: getattr(ly, k).detach().requires_grad_() for k in ("ln_weight", "ln_bias")
              if getattr(ly, k) is not None}
        nc.append(ly._replace(weight=W, bias=b, **ln))
    assert not x.is_contiguous()
    y, y_ref = ops.mlp(x, nc, tile_rows=8), torch_impl.mlp(x, nc)
    assert max_err(y, y_ref) < 1e-12
    inputs = tensors_of(x, nc)
    v = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, inputs, v), torch.autograd.grad(y_ref, inputs, v)):
        assert max_err(g, r) < 1e-11


def test_gradients_gated_on_requires_grad():
    layers = make_layers("pixgen", 2, [3, 8, 4], torch.float64)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y = ops.mlp(x, layers)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_ref,) = torch.autograd.grad(torch_impl.mlp(x, layers).sum(), [x])
    assert max_err(gx, gx_ref) < 1e-12
    # only one weight requires grad: the others get none
    W = layers[1].weight.clone().requires_grad_()
    ls = [layers[0], layers[1]._replace(weight=W)]
    x2 = x.detach()
    y = ops.mlp(x2, ls)
    y.sum().backward()
    assert W.grad is not None and layers[0].weight.grad is None and not x2.requires_grad
    # no grad at all: no autograd graph
    with torch.no_grad():
        assert ops.mlp(x, layers).grad_fn is None


def test_per_scene_gradients_flow_into_hypernetwork():
    """Per-scene weights produced from latent codes: the gradient reaches the codes as with the oracle."""
    B, ci, co = 3, 3, 8
    z = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    hyper = torch.randn(4, co * ci + co, dtype=torch.float64)
    x = torch.randn(B, 10, ci, dtype=torch.float64)

    def run(f):
        p = z @ hyper
        layer = Layer(p[:, :co * ci].reshape(B, co, ci), p[:, co * ci:], True)
        return torch.autograd.grad(f(x, [layer]).square().sum(), [z])[0]

    assert max_err(run(ops.mlp), run(torch_impl.mlp)) < 1e-11


@pytest.mark.filterwarnings("ignore:.*without bf16 matmul instructions")  # expected on such CPUs
@pytest.mark.parametrize("kind", ["phi", "pixgen"])
def test_bf16_matmuls_within_tolerance(kind):
    """matmul_dtype=bf16, forward and backward. Precision budget (as flash-attention's tests): the relative
    error vs the float64 oracle is at most 2x (+0.01) that of the oracle itself under bf16 autocast, for the
    output and every gradient; the output's relative error is below 1% (measured: ~0.3%)."""
    torch.manual_seed(1)
    B, N, widths = 2, 70, [3, 64, 64, 48, 32]
    layers = make_layers(kind, B, widths, torch.float32, requires_grad=True)
    x = torch.randn(B, N, 3, requires_grad=True)
    v = torch.randn(B, N, widths[-1])
    inputs = tensors_of(x, layers)

    def run(f, ins):
        y = f()
        return [y] + list(torch.autograd.grad(y, ins, v.to(y.dtype)))

    fused = run(lambda: ops.mlp(x, layers, matmul_dtype=torch.bfloat16, tile_rows=32), inputs)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_impl.mlp(x, layers).float()

    budget = run(autocast, inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    layers64 = with_tensors(layers, inputs64[1:])
    ref = run(lambda: torch_impl.mlp(inputs64[0], layers64), inputs64)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert 0 < rel(fused[0], ref[0]) < 0.01
    for i, (f, a, r) in enumerate(zip(fused, budget, ref)):
        assert rel(f, r) <= 2 * rel(a, r) + 0.01, (i, rel(f, r), rel(a, r))


@pytest.mark.filterwarnings("ignore:.*without bf16 matmul instructions")
def test_bf16_store_keeps_xhat_in_bf16():
    """With bf16 matmuls the CPU tiles keep a LayerNorm layer's xhat in bf16 (half of what store mode writes and
    reads back); the gradients then agree with recompute mode, which keeps float
    xhat in the tile's workspace, to bf16 precision. A saved activation of another dtype is refused by name."""
    from srn_fast.ops.mlp import mlp_backward_op, mlp_op
    from srn_fast.ops._layers import layer_lists

    torch.manual_seed(3)
    layers = make_layers("phi", 2, [3, 64, 64, 32], requires_grad=True)
    x = torch.randn(2, 90, 3, requires_grad=True)
    ll = layer_lists(layers)
    _, acts, rstd = mlp_op(x.detach(), *[[t.detach() for t in lst] for lst in ll[:4]], ll.norm, True, 32, 1)
    assert ll.norm == [True] * 3  # every layer LayerNorm+ReLU: every xhat kept, in bf16
    assert [a.dtype for a in acts] == [torch.bfloat16] * 3 and [a.shape[-1] for a in acts] == [64, 64, 32]
    assert all(r.dtype == torch.float32 and r.shape == (2, 90) for r in rstd)
    _, acts32, _ = mlp_op(x.detach(), *[[t.detach() for t in lst] for lst in ll[:4]], ll.norm, True, 32, 0)
    assert all(a.dtype == torch.float32 for a in acts32)
    v = torch.randn(2, 90, 32)
    inputs = tensors_of(x, layers)
    grads = {save: torch.autograd.grad(ops.mlp(x, layers, matmul_dtype=torch.bfloat16, tile_rows=32,
                                               save_activations=save), inputs, v) for save in (True, False)}
    for i, (a, b) in enumerate(zip(grads[True], grads[False])):
        assert ((a - b).norm() / b.norm()).item() < 2e-2, i
    g = torch.zeros(2, 90, 32)
    with pytest.raises(RuntimeError, match=r"acts\[0\] must be BFloat16 \(what the forward keeps\), got Float"):
        mlp_backward_op(g, x.detach(), acts32, rstd, *[[t.detach() for t in lst] for lst in ll[:4]], ll.norm,
                        True, [True] * 3, [True] * 3, [False] * 3, [False] * 3, 32, 1)


@pytest.mark.parametrize("bf16_route", ["amx", "avx512bf16"], indirect=True)
@pytest.mark.parametrize("kind", ["phi", "pixgen", "mixed"])
def test_weight_gradients_from_zipped_rows_same_bits(bf16_route, kind):
    """On the AMX and AVX512-BF16 routes the VJP rows write a waiting layer's v_z and the output below it straight
    into k-pair panels (cpu::RowZip), two rows a store; the weight-gradient GEMM reads them as they lie (AMX
    transposes one of them). Every gradient has the same bits as with plain bf16 rows packed per GEMM: odd N, partial
    tiles (k-pairs past the tile zero-padded), a 48-wide layer (half a panel), store and recompute."""
    torch.manual_seed(5)
    widths = [3, 64, 48, 64, 32]
    assert ext.cpu_weight_grad_zipped() and ext.cpu_avx512_rows()  # the path under test is the one in use
    for N, tile_rows in ((77, 32), (41, 50), (9, 128)):
        layers = make_layers(kind, 2, widths, requires_grad=True)
        x = torch.randn(2, N, 3, requires_grad=True)
        v = torch.randn(2, N, widths[-1])
        inputs = tensors_of(x, layers)
        for save in (True, False):
            grads = {}
            for zipped in (True, False):
                ext.set_cpu_weight_grad_zipped(zipped)
                try:
                    y = ops.mlp(x, layers, matmul_dtype=torch.bfloat16, tile_rows=tile_rows, save_activations=save)
                    grads[zipped] = torch.autograd.grad(y, inputs, v)
                finally:
                    ext.set_cpu_weight_grad_zipped(True)
            for i, (a, b) in enumerate(zip(grads[True], grads[False])):
                assert torch.isfinite(a).all() and torch.equal(a, b), (N, tile_rows, save, i)


def test_bad_input_errors():
    layers = make_layers("phi", 2, [3, 8, 4])
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[B, N, C_in\]"):
        ops.mlp(x[0], layers)
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        ops.mlp(x, [])
    with pytest.raises(TypeError, match=r"layers\[1\] must be a srn_fast.Layer"):
        ops.mlp(x, [layers[0], (layers[1].weight, layers[1].bias)])
    with pytest.raises(RuntimeError, match=r"layers\[0\].weight has C_in = 3 but its input has 4 channels"):
        ops.mlp(torch.randn(2, 5, 4), layers)
    with pytest.raises(RuntimeError, match=r"layers\[1\].weight has C_in = 4 but its input has 8 channels"):
        ops.mlp(x, [layers[0], layers[1]._replace(weight=torch.randn(2, 4, 4))])
    with pytest.raises(RuntimeError, match=r"layers\[0\].weight is per scene with 3 scenes but x has B = 2"):
        ops.mlp(x, [layers[0]._replace(weight=torch.randn(3, 8, 3))] + layers[1:])
    with pytest.raises(RuntimeError, match=r"layers\[1\].bias must have shape \[B, C_out\]"):
        ops.mlp(x, [layers[0], layers[1]._replace(bias=torch.randn(2, 5))])
    with pytest.raises(RuntimeError, match=r"layers\[1\].weight has dtype Double but x has dtype Float"):
        ops.mlp(x, [layers[0], layers[1]._replace(weight=layers[1].weight.double())])
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        ops.mlp(x.half(), layers)
    with pytest.raises(RuntimeError, match=r"layers\[0\].weight is on meta but x is on cpu"):
        ops.mlp(x, [layers[0]._replace(weight=layers[0].weight.to("meta"))] + layers[1:])
    with pytest.raises(ValueError, match="matmul_dtype must be None or torch.bfloat16"):
        ops.mlp(x, layers, matmul_dtype=torch.float16)
    with pytest.raises(ValueError, match="needs float32 inputs"):
        ops.mlp(x.double(), make_layers("phi", 2, [3, 8, 4], torch.float64), matmul_dtype=torch.bfloat16)


class _FusedMLPTorchMarch:
    """The fused backend's mlp with the oracle's march (the fused march is another op's test)."""

    name = "fused-mlp"

    def mlp(self, x, layers, matmul_dtype=None, save_activations=None):
        return ops.mlp(x, layers, matmul_dtype=matmul_dtype, save_activations=save_activations)

    def hyper_mlp(self, z, layers):
        return torch_impl.mlp(z, layers)

    def march(self, x0, dirs, phi, lstm, steps, grad_clamp=10.0, return_steps=False, mode="recompute",
              matmul_dtype=None):
        return torch_impl.march(x0, dirs, phi, lstm, steps, grad_clamp=grad_clamp, return_steps=return_steps)


@pytest.mark.parametrize("march_mode", ["recompute", "store"])  # the mlp then recomputes / keeps activations
def test_whole_model_fused_mlp_matches_torch_backend(march_mode):
    from test_model import make_input

    torch.manual_seed(0)
    model = srn_fast.SRNModel(3, latent_dim=8, tracing_steps=2, phi_hidden=16, backend="torch",
                              march_mode=march_mode).double()
    inp = make_input(B=2, S=5, dtype=torch.float64)
    depth0 = torch.full((2, 25, 1), 0.05, dtype=torch.float64) + 1e-3 * torch.rand(2, 25, 1, dtype=torch.float64)

    def run():
        model.zero_grad()
        out = model.render(inp, initial_depth=depth0)
        (out["rgb"].square().sum() + out["depth"].sum()).backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    out_t, g_t = run()
    model.backend = _FusedMLPTorchMarch()
    out_f, g_f = run()
    for k in ("rgb", "depth", "features"):
        assert max_err(out_f[k], out_t[k]) < 1e-11, k
    assert g_t.keys() == g_f.keys() and len(g_t) > 20
    for k in g_t:
        assert max_err(g_f[k], g_t[k]) < 1e-10 * max(1.0, g_t[k].abs().max().item()), k


@cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save", [True, False])
def test_cuda_matches_cpu(kind, save):
    B, N, widths = 2, 300, [3, 32, 32, 8]
    layers = make_layers(kind, B, widths, requires_grad=True)
    x = torch.randn(B, N, 3, requires_grad=True)
    v = torch.randn(B, N, widths[-1])
    inputs = tensors_of(x, layers)
    y = ops.mlp(x, layers)
    grads = torch.autograd.grad(y, inputs, v)
    gi = [t.detach().cuda().requires_grad_() for t in inputs]
    gl = with_tensors(layers, gi[1:])
    yc = ops.mlp(gi[0], gl, save_activations=save)
    assert yc.is_cuda and max_err(yc.cpu(), y) < 1e-4
    for g, r in zip(torch.autograd.grad(yc, gi, v.cuda()), grads):
        assert max_err(g.cpu(), r) < 1e-3 * max(1.0, r.abs().max().item())
    yb = ops.mlp(gi[0], gl, matmul_dtype=torch.bfloat16)
    assert ((yb.cpu() - y).norm() / y.norm()).item() < 0.03


@cuda
def test_cuda_device_mismatch_error():
    layers = make_layers("phi", 2, [3, 8, 4])
    with pytest.raises(RuntimeError, match=r"layers\[0\].weight is on cpu but x is on cuda"):
        ops.mlp(torch.randn(2, 5, 3, device="cuda"), layers)


def test_bf16_on_cpu_without_bf16_instructions_warns(monkeypatch):
    import warnings

    from srn_fast.ops import _layers

    x = torch.randn(1, 5, 3)
    layers = make_layers("phi", 1, [3, 16, 16], torch.float32)
    monkeypatch.setattr(_layers, "cpu_has_bf16_matmul", lambda: False)
    with pytest.warns(RuntimeWarning, match="without bf16 matmul instructions"):
        ops.mlp(x, layers, matmul_dtype=torch.bfloat16)
    monkeypatch.setattr(_layers, "cpu_has_bf16_matmul", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.mlp(x, layers, matmul_dtype=torch.bfloat16)
