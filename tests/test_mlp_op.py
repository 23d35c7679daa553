import pytest
import torch

import srn_fast
from srn_fast import ops, torch_impl
from srn_fast.torch_impl import Layer

from .conftest import cuda
from .op_utils import assert_close, layer_tensors, make_layers

pytest.importorskip("srn_fast._C", reason="extension not built")

CASES = [
    dict(per_scene=True, affine=False, last_linear=False),   # phi
    dict(per_scene=False, affine=True, last_linear=True),    # pixel generator
    dict(per_scene=True, affine=True, last_linear=True),
    dict(per_scene=False, affine=False, last_linear=False),
]


def _grads(out, inputs, v):
    return torch.autograd.grad(out, inputs, v, allow_unused=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-4, 2e-4)])
def test_forward_and_backward_match_oracle(case, dtype, rtol, atol):
    gen = torch.Generator().manual_seed(0)
    B, N = 2, 333  # several tiles and a partial one
    layers = make_layers(B, [3, 24, 24, 5], dtype=dtype, gen=gen, **case)
    x = torch.randn(B, N, 3, dtype=dtype, generator=gen).requires_grad_()
    ref = torch_impl.mlp(x, layers)
    out = ops.mlp(x, layers)
    assert_close(out, ref, rtol, atol, "forward")
    v = torch.randn(ref.shape, dtype=dtype, generator=gen)
    inputs = [x] + layer_tensors(layers)
    for i, (a, b) in enumerate(zip(_grads(out, inputs, v), _grads(ref, inputs, v))):
        assert_close(a, b, rtol * 10, atol * 10, f"grad of input {i}")


@pytest.mark.parametrize("case", CASES[:2])
def test_gradcheck_float64(case):
    gen = torch.Generator().manual_seed(1)
    layers = make_layers(2, [3, 6, 4], gen=gen, **case)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    tensors = layer_tensors(layers)

    def f(x, *ts):
        it = iter(ts)
        ls = [Layer(next(it), next(it), L.norm, next(it) if L.ln_weight is not None else None,
                    next(it) if L.ln_weight is not None else None) for L in layers]
        return ops.mlp(x, ls, tile_rows=2)

    assert torch.autograd.gradcheck(f, (x, *tensors), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("N", [0, 1])
def test_zero_and_one_ray(N):
    layers = make_layers(2, [3, 8, 4])
    x = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
    out = ops.mlp(x, layers)
    assert out.shape == (2, N, 4)
    assert_close(out, torch_impl.mlp(x, layers), 1e-10, 1e-10, "forward")
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert layers[0].weight.grad.shape == layers[0].weight.shape
    if N == 0:
        assert torch.all(layers[0].weight.grad == 0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    layers = make_layers(2, [3, 8, 8], gen=gen)
    big = torch.randn(2, 40, 6, dtype=torch.float64, generator=gen)
    x = big[:, ::2, 1:4].requires_grad_(False)  # strided view
    assert not x.is_contiguous()
    Wt = layers[1].weight.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    layers[1] = Layer(Wt, layers[1].bias, True)
    assert_close(ops.mlp(x, layers), torch_impl.mlp(x, layers), 1e-10, 1e-10, "forward")


def test_bf16_matmuls_within_tolerance():
    gen = torch.Generator().manual_seed(3)
    layers = make_layers(2, [3, 64, 64, 64], dtype=torch.float32, gen=gen, requires_grad=False)
    x = torch.randn(2, 200, 3, generator=gen)
    ref = torch_impl.mlp(x, layers)
    out = ops.mlp(x, layers, matmul_dtype=torch.bfloat16)
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.1, err  # bf16 has an 8-bit mantissa; LayerNorm keeps values O(1)
    with pytest.raises(ValueError, match="matmul_dtype"):
        ops.mlp(x, layers, matmul_dtype=torch.float16)


def test_bad_input_names_argument():
    layers = make_layers(2, [3, 8, 4])
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[B, N, C_in\]"):
        ops.mlp(x[0], layers)
    with pytest.raises(RuntimeError, match=r"layers\[0\].weight has C_in = 3 but its input has 4 channels"):
        ops.mlp(torch.randn(2, 5, 4, dtype=torch.float64), layers)
    with pytest.raises(RuntimeError, match=r"layers\[1\].weight has C_in = 6 but its input has 8 channels"):
        ops.mlp(x, [layers[0], Layer(torch.randn(2, 4, 6, dtype=torch.float64), layers[1].bias)])
    with pytest.raises(RuntimeError, match=r"x has dtype Float"):
        ops.mlp(x.float(), layers)
    with pytest.raises(RuntimeError, match=r"per scene with 2 scenes but x has B = 3"):
        ops.mlp(torch.randn(3, 5, 3, dtype=torch.float64), layers)
    with pytest.raises(RuntimeError, match=r"layers\[0\].bias must have shape \[B, C_out\]"):
        ops.mlp(x, [Layer(layers[0].weight, torch.zeros(2, 7, dtype=torch.float64))])
    with pytest.raises(ValueError, match="non-empty list"):
        ops.mlp(x, [])
    with pytest.raises(TypeError, match=r"layers\[0\] must be a srn_fast.Layer"):
        ops.mlp(x, [(layers[0].weight, layers[0].bias)])
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.mlp(x.half(), [Layer(w.half(), b.half()) for w, b, *_ in layers])


@cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(case):
    gen = torch.Generator().manual_seed(4)
    layers = make_layers(2, [3, 32, 32, 8], dtype=torch.float32, gen=gen, **case)
    x = torch.randn(2, 257, 3, generator=gen, requires_grad=True)
    v = torch.randn(2, 257, 8, generator=gen)
    cpu_out = ops.mlp(x, layers)
    cpu_grads = _grads(cpu_out, [x] + layer_tensors(layers), v)
    xg = x.detach().cuda().requires_grad_()
    lg = [Layer(*(t.detach().cuda().requires_grad_() if isinstance(t, torch.Tensor) else t for t in L))
          for L in layers]
    out = ops.mlp(xg, lg)
    assert_close(out.cpu(), cpu_out, 1e-4, 1e-4, "cuda forward")
    for i, (a, b) in enumerate(zip(_grads(out, [xg] + layer_tensors(lg), v.cuda()), cpu_grads)):
        assert_close(a.cpu(), b, 1e-3, 1e-3, f"cuda grad {i}")
