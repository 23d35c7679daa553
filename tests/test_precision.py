"""Reduced precision and the choices made for the user.

Precision budget (as flash-attention's tests): the fused ops' bf16 outputs and gradients, against a float64
oracle, may be off by at most K_BUDGET times what PyTorch's own bf16 (torch.autocast) is off by against the same
oracle. The fused path keeps LayerNorm, the LSTM and the step update in float32 and accumulates in float32, so it
is expected well inside the budget; K_BUDGET = 2 leaves room for the different rounding order. Errors are RMS errors
relative to the reference's RMS, for the output, the inputs' gradients, and the gradients of each parameter group
(phi's tensors together, the LSTM's together): a single bias of a few numbers is a sum over every ray and step with
heavy cancellation, whose relative error is noise (it varied 1x-9x between seeds for either implementation).
"""
import logging
import math

import pytest
import torch

import srn_fast
from srn_fast import ops, torch_impl
from srn_fast.ops import precision

from op_utils import layer_tensors, make_layers, make_lstm, require_extension, with_tensors

require_extension()

K_BUDGET = 2.0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS error relative to the reference's RMS."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def _f32(ts):
    return [t.detach().float().requires_grad_() for t in ts]


def _errors(fn_fused, fn_oracle, inputs64, v64, groups):
    """(fused bf16 errors, autocast bf16 errors) vs float64 of the output and of the gradients of each group of
    inputs (``groups``: lists of input indices)."""
    ref = fn_oracle(inputs64)
    g_ref = torch.autograd.grad(ref, inputs64, v64)
    inputs = _f32(inputs64)
    out = fn_fused(inputs)
    g = torch.autograd.grad(out, inputs, v64.float())
    inputs_ac = _f32(inputs64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = fn_oracle(inputs_ac)
    g_ac = torch.autograd.grad(out_ac.float(), inputs_ac, v64.float())
    def cat(gs, idx):
        return torch.cat([gs[i].detach().reshape(-1).double() for i in idx])

    fused = [rel_err(out, ref)] + [rel_err(cat(g, ix), cat(g_ref, ix)) for ix in groups]
    auto = [rel_err(out_ac, ref)] + [rel_err(cat(g_ac, ix), cat(g_ref, ix)) for ix in groups]
    return fused, auto


# The CPU bf16 GEMM routes held to the budget (conftest's bf16_route fixture sets each): the measured choice, and
# each route that computes in float32 ("mkl", "widened", "avx512bf16", "amx", and "amx-mkl": amx with its weight
# gradients on MKL's GEMM; a route this torch build or CPU lacks is skipped). "onednn" rounds every GEMM's result to bf16 and exceeds the budget on the march's LSTM gradients (2.3x
# autocast's error on a Zen 4): auto never picks it and it is never forced here.
ROUTES = ["auto", "mkl", "widened", "avx512bf16", "amx", "amx-mkl"]


def _assert_budget(fused, auto, names):
    for name, f, a in zip(names, fused, auto):
        assert f <= K_BUDGET * a, f"{name}: fused bf16 error {f:.2e} > {K_BUDGET} x autocast bf16 error {a:.2e}"


@pytest.mark.filterwarnings("ignore:.*bf16 matmul instructions")
@pytest.mark.parametrize("tile_rows", [128, 0], ids=["tiles", "batched"])
@pytest.mark.parametrize("bf16_route", ROUTES, indirect=True)
def test_mlp_bf16_within_budget_of_autocast(tile_rows, bf16_route):
    gen = torch.Generator().manual_seed(0)
    layers = make_layers(2, [3, 64, 64, 64], per_scene=True, affine=True, dtype=torch.float64, gen=gen)
    x = torch.randn(2, 300, 3, dtype=torch.float64, generator=gen).requires_grad_()
    inputs = [x] + layer_tensors(layers)
    v = torch.randn(2, 300, 64, dtype=torch.float64, generator=gen)
    fused, auto = _errors(
        lambda t: ops.mlp(t[0], with_tensors(layers, t[1:]), matmul_dtype=torch.bfloat16, tile_rows=tile_rows),
        lambda t: torch_impl.mlp(t[0], with_tensors(layers, t[1:])), inputs, v, [[0], list(range(1, len(inputs)))])
    _assert_budget(fused, auto, ["out", "grad x", "grad layers"])


@pytest.mark.filterwarnings("ignore:.*bf16 matmul instructions")
@pytest.mark.parametrize("last_linear", [False, True], ids=["last-norm", "last-linear"])
@pytest.mark.parametrize("mode", ["recompute", "store"])
@pytest.mark.parametrize("bf16_route", ROUTES, indirect=True)
def test_march_bf16_within_budget_of_autocast(mode, bf16_route, last_linear):
    # last-linear: phi's last layer plain linear, as the reference's: the CPU tiles fold it into the LSTM's GEMM
    gen = torch.Generator().manual_seed(1)
    widths = [3, 64, 64, 64] if last_linear else [3, 64, 64]
    phi = make_layers(2, widths, per_scene=True, dtype=torch.float64, gen=gen, last_linear=last_linear)
    lstm = make_lstm(64, 16, dtype=torch.float64, gen=gen)
    x0 = (torch.randn(2, 150, 3, dtype=torch.float64, generator=gen) * 0.3).requires_grad_()
    dirs = torch.nn.functional.normalize(torch.randn(2, 150, 3, dtype=torch.float64, generator=gen), dim=-1)
    dirs.requires_grad_()
    n_phi = len(layer_tensors(phi))
    inputs = [x0, dirs] + layer_tensors(phi) + list(lstm)

    def split(t):
        return t[0], t[1], with_tensors(phi, t[2:2 + n_phi]), srn_fast.LSTMParams(*t[2 + n_phi:])

    v = torch.randn(2, 150, 3, dtype=torch.float64, generator=gen)
    fused, auto = _errors(
        lambda t: ops.march(*split(t), 4, mode=mode, matmul_dtype=torch.bfloat16),
        lambda t: torch_impl.march(*split(t), 4), inputs, v,
        [[0], [1], list(range(2, 2 + n_phi)), list(range(2 + n_phi, len(inputs)))])
    _assert_budget(fused, auto, ["x_T", "grad x0", "grad dirs", "grad phi", "grad lstm"])


def test_matmul_dtype_auto_follows_the_measured_rates(monkeypatch):
    # the real measurement on this machine: the float32 rate and at least one bf16 route, all positive
    rates = precision.tile_gemm_rates()
    assert rates["float32"] > 0 and "onednn" in rates and all(r > 0 for r in rates.values())
    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 60.0, "avx512bf16": 150.0})
    assert precision.resolve_matmul_dtype("auto", "cpu") is torch.bfloat16
    # oneDNN rounds its results to bf16: the tile loops never pick it on their own, so neither does auto
    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 60.0, "onednn": 150.0})
    assert precision.resolve_matmul_dtype("auto", "cpu") is None
    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 81.0, "onednn": 12.0})
    assert precision.resolve_matmul_dtype("auto", "cpu") is None  # within the margin: not worth the precision
    # "widened" is float32 arithmetic: a noisy measurement above float32 must not pick bf16
    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 60.0, "widened": 95.0})
    assert precision.resolve_matmul_dtype("auto", "cpu") is None
    for spec, want in ((None, None), (torch.float32, None), (torch.bfloat16, torch.bfloat16)):
        assert precision.resolve_matmul_dtype(spec, "cpu") is want
    with pytest.raises(ValueError, match="matmul_dtype must be None, torch.float32, torch.bfloat16 or 'auto'"):
        precision.resolve_matmul_dtype(torch.float16, "cpu")


def test_model_auto_precision_and_march_mode(monkeypatch, caplog):
    from test_model import make_input

    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 200.0})
    torch.manual_seed(0)
    inp = make_input()
    kw = dict(latent_dim=16, phi_hidden=32, tracing_steps=3, backend="fused")
    with caplog.at_level(logging.INFO, logger="srn_fast"):
        big = srn_fast.SRNModel(3, matmul_dtype="auto", store_budget=10 ** 9, **kw)
        assert big.resolved_matmul_dtype(torch.device("cpu")) is torch.bfloat16
        assert big.resolved_march_mode(2, 36, torch.device("cpu"), torch.float32) == "store"
        small = srn_fast.SRNModel(3, store_budget=1000, **kw)
        assert small.resolved_march_mode(2, 36, torch.device("cpu"), torch.float32) == "recompute"
        # bf16 on the CPU tiles keeps xhat in bf16: a budget between the bf16 and the float32 need stores with bf16
        # only (2 x 36 rays, 3 steps, phi 32 wide, pixel generator 5 x 32 + 3: see store_bytes below)
        need32 = precision.store_bytes(2, 36, 3, [32] * 4, [32] * 5 + [3], tiles=True)
        need16 = precision.store_bytes(2, 36, 3, [32] * 4, [32] * 5 + [3], tiles=True, xhat_size=2)
        kw3 = dict(kw, phi_hidden=32, rendering_layers=5)
        mid = (need16 + need32) // 2
        bf16 = srn_fast.SRNModel(3, matmul_dtype=torch.bfloat16, store_budget=mid, **kw3)
        assert bf16._pix_widths == [32] * 5 + [3] and bf16._phi_widths == [32] * 4
        assert bf16.resolved_march_mode(2, 36, torch.device("cpu"), torch.float32) == "store"
        f32 = srn_fast.SRNModel(3, store_budget=mid, **kw3)
        assert f32.resolved_march_mode(2, 36, torch.device("cpu"), torch.float32) == "recompute"
        for _ in range(3):
            small.render(inp)
    logged = [r.getMessage() for r in caplog.records if "march_mode='auto'" in r.getMessage()]
    # once per model and mode (small rendered three times): big, bf16 store; small, f32 recompute
    assert sum("'recompute'" in m for m in logged) == 2 and sum("'store'" in m for m in logged) == 2, logged
    # what store mode keeps, 2 x 36 rays, (3 + 1) phi evaluations: batched (CUDA) every layer's pre-activation,
    # 4 x 32 (phi) and 5 x 32 + 3 (pixel generator) floats; CPU tiles xhat and rstd of the LayerNorm layers only,
    # 3 x 32 + 3 and 5 x 32 + 5
    assert precision.store_bytes(2, 36, 3, [32] * 4, [32] * 5 + [3]) == 2 * 36 * (4 * 128 + 163) * 4
    assert precision.store_bytes(2, 36, 3, [32] * 4, [32] * 5 + [3], tiles=True) == 2 * 36 * (4 * 99 + 165) * 4
    # bf16 matmuls on the tiles: the xhat values in 2 bytes, rstd still 4
    assert precision.store_bytes(2, 36, 3, [32] * 4, [32] * 5 + [3], tiles=True, xhat_size=2) == \
        2 * 36 * (4 * (96 * 2 + 3 * 4) + (160 * 2 + 5 * 4))
    # the default budget: a quarter of the available memory
    assert precision.store_budget("cpu") == pytest.approx(0.25 * precision.available_memory("cpu"), rel=0.2)
    with pytest.raises(ValueError, match="march_mode must be one of"):
        srn_fast.SRNModel(3, march_mode="fast", **kw)


def test_train_bf16_warns_where_bf16_is_slower(monkeypatch, tiny_data, tmp_path):
    from srn_fast.cli import main

    monkeypatch.setattr(precision, "tile_gemm_rates", lambda: {"float32": 80.0, "mkl": 20.0, "onednn": 5.0})
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--sidelengths", "8",
            "--batch-sizes", "2", "--steps", "1", "--latent-dim", "8", "--phi-hidden", "16", "--tracing-steps", "2",
            "--rendering-layers", "1", "--val-every", "0", "--no-progress", "--device", "cpu"]
    with pytest.warns(RuntimeWarning, match="--bf16: this CPU runs bf16 matmuls no faster than float32"):
        assert main(args + ["--bf16"]) == 0
    assert main(args[:4] + [str(tmp_path / "run_auto")] + args[5:] + ["--bf16", "auto"]) == 0


def test_fused_model_under_autocast_says_what_to_use_instead():
    """torch.autocast would hand the fused kernels bf16 tensors they do not take: one clear error naming the
    alternatives, instead of a dtype error from deep inside an op; the torch backend autocasts as before."""
    from test_model import make_input

    inp = make_input(B=2, S=4)
    fused = srn_fast.SRNModel(2, latent_dim=8, phi_hidden=16, tracing_steps=2, backend="fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"backend='fused' does not run under torch.autocast .* "
                                             r"matmul_dtype=torch.bfloat16"):
            fused.render(inp)
        ref = srn_fast.SRNModel(2, latent_dim=8, phi_hidden=16, tracing_steps=2, backend="torch")
        assert ref.render(inp)["rgb"].dtype == torch.bfloat16
    assert fused.render(inp)["rgb"].dtype == torch.float32


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_avx512_rows_match_the_generic_rows(matmul_dtype):
    """The CPU tile loops' AVX-512 LayerNorm rows (forward, the thin input layer computed inside its rows, xhat
    streamed in store mode, the bf16 VJP, the bf16 rebuilt activation; CPUs with AVX512-BF16) against the generic
    rows: the MLP op (affine LayerNorm, kept and recomputed activations) and the march (plain LayerNorm, folded last
    layer, recompute and store modes), outputs and every gradient. float32 differs only in summation order; in bf16
    a value rounded to the other neighbour moves a few elements by one bf16 step."""
    import platform

    from srn_fast.ops._layers import cpu_flags

    ext = srn_fast._ext.load()
    if cpu_flags() and platform.machine() in ("x86_64", "AMD64"):
        assert ext.cpu_avx512_rows() == ("avx512_bf16" in cpu_flags())
    if not ext.cpu_avx512_rows():
        pytest.skip("needs a CPU with AVX512-BF16: on this one the tile loops have only the generic rows")
    gen = torch.Generator().manual_seed(5)
    mlp_layers = make_layers(2, [3, 64, 48, 32], per_scene=True, affine=True, dtype=torch.float32, gen=gen)
    phi = make_layers(2, [3, 64, 64, 32], per_scene=True, dtype=torch.float32, gen=gen, last_linear=True)
    lstm = make_lstm(32, 16, dtype=torch.float32, gen=gen)
    x = torch.randn(2, 200, 3, generator=gen) * 0.3
    dirs = torch.nn.functional.normalize(torch.randn(2, 200, 3, generator=gen), dim=-1)
    n_mlp, n_phi = len(layer_tensors(mlp_layers)), len(layer_tensors(phi))
    inputs = [x.requires_grad_()] + layer_tensors(mlp_layers) + layer_tensors(phi) + list(lstm)

    def run():
        t = [i.detach().requires_grad_() for i in inputs]
        ly = with_tensors(mlp_layers, t[1:1 + n_mlp])
        ph = with_tensors(phi, t[1 + n_mlp:1 + n_mlp + n_phi])
        ls = srn_fast.LSTMParams(*t[1 + n_mlp + n_phi:])
        outs = [ops.mlp(t[0], ly, matmul_dtype=matmul_dtype, save_activations=save) for save in (True, False)]
        outs += [ops.march(t[0], dirs, ph, ls, 3, mode=mode, matmul_dtype=matmul_dtype) for mode in ("recompute", "store")]
        g = torch.Generator().manual_seed(6)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, t))

    fast = run()
    ext.set_cpu_avx512_rows(False)
    try:
        generic = run()
    finally:
        ext.set_cpu_avx512_rows(True)
    tol = 1e-5 if matmul_dtype is None else 1e-2
    for i, (a, b) in enumerate(zip(fast, generic)):
        assert rel_err(a, b) <= tol, f"result {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("mm_dtype", [0, 1], ids=["float32", "bf16"])
@pytest.mark.parametrize("tile_rows", [128, 0], ids=["cpu-tiles", "batched"])
def test_store_bytes_matches_what_the_ops_keep(tile_rows, mm_dtype):
    """precision.store_bytes (march_mode="auto"'s estimate) equals what the ops' store mode keeps beyond recompute
    mode: the march's acts and rstd at every step plus the MLP op's saved tensors for phi at the surface and for the
    pixel generator (the SRN networks: every layer LayerNorm+ReLU but a plain last one), in bytes: with bf16 matmuls
    the CPU tiles keep xhat in bf16."""
    from srn_fast.ops import shapes
    from srn_fast.types import MARCH_MODES

    B, N, T, H = 2, 36, 3, 16
    phi_w, pix_w = [32] * 4, [32] * 5 + [3]
    x = torch.zeros(B, N, 3)

    def weights(widths, c_in):
        return [torch.zeros(B, w, c) for w, c in zip(widths, [c_in] + list(widths[:-1]))]

    def norms(widths):
        return [True] * (len(widths) - 1) + [False]

    def nbytes(shape_list, dtypes=None):
        dtypes = dtypes or [None] * len(shape_list)
        return sum(math.prod(s) * (d or torch.float32).itemsize for s, d in zip(shape_list, dtypes)
                   if s != shapes.NONE)

    phi, pix = weights(phi_w, 3), weights(pix_w, phi_w[-1])
    kept = {}
    for mode in ("store", "recompute"):
        m = shapes.march_shapes(x, phi, norms(phi_w), torch.zeros(4 * H, H), T, MARCH_MODES[mode], False, tile_rows,
                                mm_dtype)
        kept[mode] = nbytes(m.acts, m.acts_dtype) + nbytes(m.rstd)
    mlp = [shapes.mlp_shapes(x if ws is phi else torch.zeros(B, N, phi_w[-1]), ws, norms(w), True, tile_rows,
                             mm_dtype) for ws, w in ((phi, phi_w), (pix, pix_w))]
    total = kept["store"] - kept["recompute"] + sum(nbytes(s.acts, s.acts_dtype) + nbytes(s.rstd) for s in mlp)
    bf16_xhat = tile_rows != 0 and mm_dtype == 1
    assert any(d == torch.bfloat16 for s in mlp for d in s.acts_dtype) == bf16_xhat
    assert precision.store_bytes(B, N, T, phi_w, pix_w, tiles=tile_rows != 0,
                                 xhat_size=2 if bf16_xhat else None) == total
