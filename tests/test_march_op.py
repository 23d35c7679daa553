import pytest
import torch

import srn_fast
from srn_fast import ops, torch_impl
from srn_fast.torch_impl import LSTMParams

from op_utils import cuda, require_extension
from op_utils import assert_close, layer_tensors, make_layers, make_lstm, with_tensors

require_extension()


def setup(B=2, N=150, widths=(3, 16, 16), H=16, dtype=torch.float64, seed=0, per_scene=True, affine=False,
          lstm_scale=1.0, last_linear=False):
    gen = torch.Generator().manual_seed(seed)
    phi = make_layers(B, list(widths), per_scene=per_scene, affine=affine, dtype=dtype, gen=gen,
                      last_linear=last_linear)
    lstm = make_lstm(widths[-1], H, dtype=dtype, gen=gen, scale=lstm_scale)
    x0 = (torch.randn(B, N, 3, dtype=dtype, generator=gen) * 0.3).requires_grad_()
    dirs = torch.nn.functional.normalize(torch.randn(B, N, 3, dtype=dtype, generator=gen), dim=-1).requires_grad_()
    return x0, dirs, phi, lstm


def all_inputs(x0, dirs, phi, lstm):
    return [x0, dirs] + layer_tensors(phi) + list(lstm)


@pytest.mark.parametrize("mode", ["recompute", "store"])
@pytest.mark.parametrize("per_scene,affine", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_points_depth_and_every_gradient_match_oracle(mode, per_scene, affine, dtype, tol):
    x0, dirs, phi, lstm = setup(dtype=dtype, per_scene=per_scene, affine=affine)
    T = 4
    ref = torch_impl.march(x0, dirs, phi, lstm, T)
    out = ops.march(x0, dirs, phi, lstm, T, mode=mode)
    assert_close(out, ref, tol, tol, "x_T")
    cam = torch.eye(4, dtype=dtype).expand(2, 4, 4).clone()
    cam[:, :3, 3] = torch.tensor([0.1, -0.2, -2.0], dtype=dtype)
    assert_close(srn_fast.geometry.get_depth(out, cam), srn_fast.geometry.get_depth(ref, cam), tol, tol, "depth")
    v = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    inputs = all_inputs(x0, dirs, phi, lstm)
    ga = torch.autograd.grad(out, inputs, v)
    gb = torch.autograd.grad(ref, inputs, v)
    names = ["x0", "dirs"] + [f"phi tensor {i}" for i in range(len(layer_tensors(phi)))] + list(LSTMParams._fields)
    for name, a, b in zip(names, ga, gb):
        assert_close(a, b, tol * 10, tol * 10, name)


@pytest.mark.parametrize("mode", ["recompute", "store"])
@pytest.mark.parametrize("tile_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("per_scene", [True, False])
def test_last_layer_plain_linear_and_tile_sizes(mode, tile_rows, per_scene):
    # phi's last layer without LayerNorm (the CPU tiles fold it into the LSTM's input GEMM: per-scene and shared
    # weights, phi's output 8 wide against its hidden 16), and tiles that do not divide N (150) or exceed it: every
    # gradient must still match the oracle.
    x0, dirs, phi, lstm = setup(widths=(3, 16, 16, 8), last_linear=True, affine=True, per_scene=per_scene)
    assert not phi[-1].norm
    ref = torch_impl.march(x0, dirs, phi, lstm, 3)
    out = ops.march(x0, dirs, phi, lstm, 3, mode=mode, tile_rows=tile_rows)
    assert_close(out, ref, 1e-9, 1e-9, "x_T")
    v = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(3))
    inputs = all_inputs(x0, dirs, phi, lstm)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, v), torch.autograd.grad(ref, inputs, v))):
        assert_close(a, b, 1e-8, 1e-8, f"input {i}")


@pytest.mark.parametrize("tile_rows", [64, 0])
def test_folded_last_layer_keeps_nothing_and_partial_gradients(tile_rows):
    # store mode keeps no activation of a folded last layer on the CPU tiles (the batched path keeps every layer's);
    # gradients asked for only in part (last layer's bias but not its weight; no LSTM input weight) still match
    from srn_fast.ops import shapes

    x0, dirs, phi, lstm = setup(widths=(3, 16, 16, 8), last_linear=True, per_scene=True)
    store = srn_fast.types.MARCH_MODES["store"]
    acts = shapes.march_shapes(x0, [l.weight for l in phi], [l.norm for l in phi], lstm.weight_hh, 3, store, False,
                               tile_rows).acts
    assert (acts[-1] == shapes.NONE) == (tile_rows != 0) and all(a != shapes.NONE for a in acts[:-1])
    phi[-1].weight.requires_grad_(False)
    lstm.weight_ih.requires_grad_(False)
    inputs = [x0, phi[-1].bias, phi[0].weight, lstm.weight_hh, lstm.bias_ih]
    ref = torch_impl.march(x0, dirs, phi, lstm, 3)
    out = ops.march(x0, dirs, phi, lstm, 3, mode="store", tile_rows=tile_rows)
    v = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(4))
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, v), torch.autograd.grad(ref, inputs, v))):
        assert_close(a, b, 1e-8, 1e-8, f"input {i}")


@pytest.mark.parametrize("mode", ["recompute", "store"])
@pytest.mark.parametrize("per_scene,affine", [(True, False), (False, True)])
def test_batched_path_matches_oracle(mode, per_scene, affine):
    # tile_rows=0: the whole batch as one tile through batched GEMMs, the CUDA backend's code path, on the CPU
    x0, dirs, phi, lstm = setup(per_scene=per_scene, affine=affine, lstm_scale=3.0)
    ref, steps_ref = torch_impl.march(x0, dirs, phi, lstm, 4, return_steps=True)
    out, steps = ops.march(x0, dirs, phi, lstm, 4, mode=mode, tile_rows=0, return_steps=True)
    assert_close(out, ref, 1e-9, 1e-9, "x_T")
    assert_close(steps, steps_ref, 1e-9, 1e-9, "steps")
    v = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(4))
    inputs = all_inputs(x0, dirs, phi, lstm)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, v), torch.autograd.grad(ref, inputs, v))):
        assert_close(a, b, 1e-8, 1e-8, f"input {i}")


def test_gradcheck_tiny_float64():
    x0, dirs, phi, lstm = setup(B=2, N=3, widths=(3, 8, 8), H=4)
    flat = layer_tensors(phi)

    def f(x0, dirs, *ts):
        return ops.march(x0, dirs, with_tensors(phi, ts[:len(flat)]), LSTMParams(*ts[len(flat):]), 2, tile_rows=2)

    assert torch.autograd.gradcheck(f, (x0, dirs, *flat, *lstm), eps=1e-6, atol=1e-5)


def test_gradient_clamp_is_active_and_matches():
    # a large cotangent makes the gradient reaching h exceed 10: the clamp must change the result
    x0, dirs, phi, lstm = setup(seed=3, lstm_scale=3.0)
    T = 3
    v = torch.full((2, 150, 3), 500.0, dtype=torch.float64)
    inputs = all_inputs(x0, dirs, phi, lstm)
    g_ref = torch.autograd.grad(torch_impl.march(x0, dirs, phi, lstm, T), inputs, v)
    g_noclamp = torch.autograd.grad(torch_impl.march(x0, dirs, phi, lstm, T, grad_clamp=None), inputs, v)
    g_fused = torch.autograd.grad(ops.march(x0, dirs, phi, lstm, T), inputs, v)
    w_ih = 2 + len(layer_tensors(phi))
    assert (g_ref[w_ih] - g_noclamp[w_ih]).abs().max() > 1e-3 * g_noclamp[w_ih].abs().max()
    for i, (a, b) in enumerate(zip(g_fused, g_ref)):
        assert_close(a, b, 1e-8, 1e-8, f"input {i}")
    g_fused_noclamp = torch.autograd.grad(ops.march(x0, dirs, phi, lstm, T, grad_clamp=None), inputs, v)
    assert_close(g_fused_noclamp[w_ih], g_noclamp[w_ih], 1e-8, 1e-8, "no clamp")
    # the batched (CUDA-logic) path clamps alike
    g_batched = torch.autograd.grad(ops.march(x0, dirs, phi, lstm, T, tile_rows=0), inputs, v)
    for i, (a, b) in enumerate(zip(g_batched, g_ref)):
        assert_close(a, b, 1e-8, 1e-8, f"batched path, input {i}")


def test_zero_rays_and_zero_steps():
    x0, dirs, phi, lstm = setup(N=0)
    out = ops.march(x0, dirs, phi, lstm, 3)
    assert out.shape == (2, 0, 3)
    out.sum().backward()
    assert torch.all(lstm.weight_ih.grad == 0)
    x0, dirs, phi, lstm = setup(N=5)
    out = ops.march(x0, dirs, phi, lstm, 0)
    assert torch.equal(out, x0)


def test_return_steps_and_inference_path():
    x0, dirs, phi, lstm = setup()
    ref, ref_steps = torch_impl.march(x0, dirs, phi, lstm, 3, return_steps=True)
    with torch.no_grad():
        out, steps = ops.march(x0, dirs, phi, lstm, 3, return_steps=True)
    assert not out.requires_grad
    assert steps.shape == (4, 2, 150, 3)
    assert_close(steps, ref_steps, 1e-10, 1e-10, "steps")
    assert_close(out, ref.detach(), 1e-10, 1e-10, "inference x_T")


@pytest.mark.filterwarnings("ignore:.*without bf16 matmul instructions")  # expected on such CPUs
def test_bf16_option_close():
    x0, dirs, phi, lstm = setup(dtype=torch.float32, widths=(3, 64, 64))
    with torch.no_grad():
        ref = torch_impl.march(x0, dirs, phi, lstm, 3)
        out = ops.march(x0, dirs, phi, lstm, 3, matmul_dtype=torch.bfloat16)
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("H,widths,last_linear", [(16, (3, 32, 32), False), (5, (3, 24, 40), True)])
def test_lstm_products_in_avx512_match_mkl_and_oracle(H, widths, last_linear):
    """The march's float32 LSTM products on srn_fast's AVX-512 loops (csrc/common/gemm_f32_avx512.cpp) against the
    same march on MKL's sgemm and against the oracle: 4H = 64 (full vectors) and 4H = 20 (a masked tail), the gate
    input F + H = 48 or 45 (phi's last layer folded into it), a partial last tile, forward and every gradient."""
    ext = srn_fast._ext.load()
    if not ext.cpu_lstm_gemm_avx512():
        pytest.skip("needs a CPU with AVX-512F: on this one the LSTM products run on MKL's sgemm only")
    x0, dirs, phi, lstm = setup(dtype=torch.float32, N=77, widths=widths, H=H, last_linear=last_linear)
    inputs = all_inputs(x0, dirs, phi, lstm)
    runs = {}
    for on in (True, False):
        ext.set_cpu_lstm_gemm_avx512(on)
        try:
            out = ops.march(x0, dirs, phi, lstm, 3, mode="store", tile_rows=32)
            runs[on] = (out, torch.autograd.grad((out * out).sum(), inputs, allow_unused=True))
        finally:
            ext.set_cpu_lstm_gemm_avx512(True)
    ref = torch_impl.march(x0, dirs, phi, lstm, 3)
    ref_g = torch.autograd.grad((ref * ref).sum(), inputs, allow_unused=True)
    assert_close(runs[True][0], runs[False][0], 1e-5, 1e-5, "x_T vs MKL")
    assert_close(runs[True][0], ref, 2e-3, 2e-3, "x_T vs oracle")
    for i, (a, b, r) in enumerate(zip(runs[True][1], runs[False][1], ref_g)):
        assert (a is None) == (b is None) == (r is None), i
        if a is not None:
            assert_close(a, b, 1e-4, 1e-4 * b.abs().max().item(), f"grad {i} vs MKL")
            assert_close(a, r, 2e-3, 2e-3 * max(r.abs().max().item(), 1.0), f"grad {i} vs oracle")


@pytest.mark.parametrize("bf16_route", ["amx", "avx512bf16"], indirect=True)
@pytest.mark.parametrize("mode", ["recompute", "store"])
def test_weight_gradients_from_zipped_rows_same_bits(bf16_route, mode):
    """The march's phi backward on the AMX and AVX512-BF16 routes: weight gradients from the k-pair panels the VJP
    rows write have the same bits as from plain bf16 rows packed per GEMM (odd N, a partial last tile, a 48-wide
    layer)."""
    ext = srn_fast._ext.load()
    x0, dirs, phi, lstm = setup(dtype=torch.float32, N=77, widths=(3, 64, 48, 64))
    assert ext.cpu_weight_grad_zipped() and ext.cpu_avx512_rows()  # the path under test is the one in use
    inputs = all_inputs(x0, dirs, phi, lstm)
    grads = {}
    for zipped in (True, False):
        ext.set_cpu_weight_grad_zipped(zipped)
        try:
            out = ops.march(x0, dirs, phi, lstm, 3, matmul_dtype=torch.bfloat16, mode=mode, tile_rows=32)
            grads[zipped] = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        finally:
            ext.set_cpu_weight_grad_zipped(True)
    for i, (a, b) in enumerate(zip(grads[True], grads[False])):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.isfinite(a).all() and torch.equal(a, b), i


def test_bad_input_names_argument():
    x0, dirs, phi, lstm = setup(N=4)
    with pytest.raises(ValueError, match=r"x0 must be a tensor of shape \[B, N, 3\]"):
        ops.march(x0[..., :2], dirs, phi, lstm, 2)
    with pytest.raises(RuntimeError, match=r"dirs must have shape \[B, N, 3\] like x0"):
        ops.march(x0, dirs[:, :3], phi, lstm, 2)
    with pytest.raises(RuntimeError, match=r"lstm.weight_ih must have shape \[4H, F\]"):
        ops.march(x0, dirs, phi, lstm._replace(weight_ih=torch.zeros(64, 7, dtype=torch.float64)), 2)
    with pytest.raises(ValueError, match="tile_rows must be >= 1"):
        ops.march(x0, dirs, phi, lstm, 2, tile_rows=-3)
    with pytest.raises(ValueError, match="mode must be"):
        ops.march(x0, dirs, phi, lstm, 2, mode="fast")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        ops.march(x0, dirs, phi, lstm, -1)
    with pytest.raises(RuntimeError, match="dirs has dtype Float but x0 has dtype Double"):
        ops.march(x0, dirs.float(), phi, lstm, 2)
    with pytest.raises(TypeError, match="lstm must be a srn_fast.LSTMParams"):
        ops.march(x0, dirs, phi, tuple(lstm), 2)


def small_models(fit_single_srn=False):
    torch.manual_seed(0)
    kw = dict(latent_dim=16, phi_hidden=32, tracing_steps=3, fit_single_srn=fit_single_srn)
    a = srn_fast.SRNModel(3, backend="torch", **kw).double()
    b = srn_fast.SRNModel(3, backend="fused", **kw).double()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("fit_single_srn", [False, True])
def test_whole_model_fused_matches_torch(fit_single_srn):
    from test_model import make_input
    a, b = small_models(fit_single_srn)
    inp = make_input(dtype=torch.float64)
    d0 = a.initial_depth(2, 36, "cpu", torch.float64)
    ra, rb = a.render(inp, initial_depth=d0), b.render(inp, initial_depth=d0)
    for k in ("rgb", "depth", "features", "points"):
        assert_close(rb[k], ra[k], 1e-9, 1e-9, k)
    gt = {"rgb": torch.rand(2, 36, 3, dtype=torch.float64)}
    for m, r in ((a, ra), (b, rb)):
        m.losses((r["rgb"], r["depth"]), gt, r["z"])["total"].backward()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name in pa:
        assert pb[name].grad is not None, name
        assert_close(pb[name].grad, pa[name].grad, 1e-8, 1e-9, name)


@cuda
def test_cuda_matches_cpu():
    x0, dirs, phi, lstm = setup(dtype=torch.float32, N=300)
    v = torch.randn(2, 300, 3)
    inputs = all_inputs(x0, dirs, phi, lstm)
    cpu_out = ops.march(x0, dirs, phi, lstm, 4)
    cpu_g = torch.autograd.grad(cpu_out, inputs, v)
    gi = [t.detach().cuda().requires_grad_() for t in inputs]
    nphi = len(layer_tensors(phi))
    phig = with_tensors(phi, gi[2:2 + nphi])
    out = ops.march(gi[0], gi[1], phig, LSTMParams(*gi[2 + nphi:]), 4)
    assert_close(out.cpu(), cpu_out, 1e-3, 1e-3, "cuda x_T")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, gi, v.cuda()), cpu_g)):
        assert_close(a.cpu(), b, 1e-2, 1e-2, f"cuda grad {i}")


def test_march_camera_matches_reference_raymarcher():
    from srn_fast import geometry

    B, S, T = 2, 6, 3
    x0, dirs, phi, lstm = setup(B=B, N=S * S)
    pose = torch.stack([torch.tensor(geometry.look_at(e), dtype=torch.float64)
                        for e in [(1.2, -0.9, 0.6), (-0.8, 1.1, 0.9)]])
    K = geometry.intrinsics_matrix(1.025 * S, S / 2, S / 2).to(torch.float64).expand(B, 3, 3).contiguous()
    uv = geometry.uv_grid(S)[None].expand(B, -1, -1).to(torch.float64)
    d0 = ops.initial_depth(B, S * S, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert d0.shape == (B, S * S, 1) and abs(d0.mean().item() - 0.05) < 1e-3 and d0.std().item() < 2e-3
    res = ops.march_camera(uv, pose, K, phi, lstm, T, initial_depth=d0, return_steps=True)
    # the reference Raymarcher, step for step, in plain torch
    ref_pts = torch_impl.march(geometry.world_from_xy_depth(uv, d0, pose, K), geometry.get_ray_directions(uv, pose, K),
                               phi, lstm, T)
    assert_close(res.points, ref_pts, 1e-9, 1e-9, "points")
    assert_close(res.depth, geometry.get_depth(ref_pts, pose), 1e-9, 1e-9, "depth")
    assert res.step_depths.shape == (T + 1, B, S * S, 1)
    assert_close(res.step_depths[0], d0, 1e-9, 1e-9, "step 0 depth = initial depth")
    assert_close(res.step_depths[-1], res.depth, 1e-12, 1e-12, "last step depth")
    # drawn initial depth: reproducible with a seeded generator
    a = ops.march_camera(uv, pose, K, phi, lstm, T, generator=torch.Generator().manual_seed(1)).points
    b = ops.march_camera(uv, pose, K, phi, lstm, T, generator=torch.Generator().manual_seed(1)).points
    assert torch.equal(a, b)
    # gradients reach the phi weights through the camera entry point too
    g = torch.autograd.grad(res.depth.sum(), [phi[0].weight])[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="initial_depth must have shape"):
        ops.march_camera(uv, pose, K, phi, lstm, T, initial_depth=d0[:, :5])
    with pytest.raises(ValueError, match="cam2world must have shape"):
        ops.march_camera(uv, pose[:1], K, phi, lstm, T)
    with pytest.raises(ValueError, match="uv must be a tensor of shape"):
        ops.march_camera(uv[..., :1], pose, K, phi, lstm, T)


@pytest.mark.parametrize("backend", ["aten", "blas"])
def test_both_cpu_gemm_backends(backend):
    # the march's tile loop calls cpu::gemm: torch's MKL symbols ("blas") or at::mm on views ("aten", the fallback
    # for torch builds without MKL); both must give the oracle's values and gradients
    ext = srn_fast._ext.load()
    try:
        try:
            ext.set_cpu_gemm_backend(backend)
        except RuntimeError:
            pytest.skip("this torch build exports no BLAS symbols")
        assert ext.cpu_gemm_backend() == backend
        x0, dirs, phi, lstm = setup(N=70)
        ref = torch_impl.march(x0, dirs, phi, lstm, 3)
        out = ops.march(x0, dirs, phi, lstm, 3, tile_rows=32)
        assert_close(out, ref, 1e-9, 1e-9, "x_T")
        v = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(8))
        inputs = all_inputs(x0, dirs, phi, lstm)
        for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, v), torch.autograd.grad(ref, inputs, v))):
            assert_close(a, b, 1e-8, 1e-8, f"input {i}")
    finally:
        ext.set_cpu_gemm_backend("auto")
