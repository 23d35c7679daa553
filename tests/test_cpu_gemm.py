"""The tile loops' cpu::gemm against torch.mm, in every layout and for beta 0 and 1, at the thin shapes (one side
<= 4: phi's 3-wide first layer, the 3-wide rgb layer) that it runs with its own loops instead of the BLAS (on a CPU
with AVX-512 the float N <= 4 shapes with K or M a multiple of 16 take thin_f32_avx512, with their row and column
tails: 130 rows, 80 = 64 + 16 columns; the others the generic loops)."""
import pytest
import torch

import srn_fast

from op_utils import require_extension

require_extension()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,N,K", [(128, 256, 3), (128, 3, 256), (256, 3, 128), (3, 256, 128), (4, 5, 6),
                                   (7, 1, 9), (5, 6, 4), (16, 24, 32), (130, 3, 32), (80, 4, 5), (48, 1, 16)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_every_layout_matches_mm(dtype, M, N, K, ta, tb):
    ext = srn_fast._ext.load()
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn((K, M) if ta else (M, K), dtype=dtype, generator=g)
    b = torch.randn((N, K) if tb else (K, N), dtype=dtype, generator=g)
    ref = (a.t() if ta else a) @ (b.t() if tb else b)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    c = torch.full((M, N), float("nan"), dtype=dtype)  # beta 0: C must not be read
    ext.cpu_gemm(ta, tb, a, b, c, 0.0)
    torch.testing.assert_close(c, ref, rtol=tol, atol=tol)
    c0 = torch.randn(M, N, dtype=dtype, generator=g)
    c = c0.clone()
    ext.cpu_gemm(ta, tb, a, b, c, 1.0)
    torch.testing.assert_close(c, ref + c0, rtol=tol, atol=tol)


def test_bad_arguments_are_named():
    ext = srn_fast._ext.load()
    with pytest.raises(RuntimeError, match="cpu_gemm: shapes do not match"):
        ext.cpu_gemm(False, False, torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(2, 5), 0.0)


@pytest.mark.parametrize("bf16_route", ["mkl", "widened", "onednn", "avx512bf16", "amx", "amx-mkl"],
                         indirect=True)
@pytest.mark.parametrize("M,N,K", [(128, 256, 256), (256, 256, 128), (37, 64, 48), (9, 70, 33), (300, 17, 301),
                                   (64, 32, 64), (33, 96, 512)])
@pytest.mark.parametrize("ta,tb", [(False, True), (False, False), (True, False)])
def test_bf16_routes_compute_a_bf16_product(bf16_route, M, N, K, ta, tb):
    """Every route multiplies the bf16 operands exactly (products exact in float32) and sums in float32, in every
    layout the tile loops use (forward A B^T, input gradient A B, weight gradient A^T B), beta 0 and 1; oneDNN
    rounds its result to bf16 (its only difference). "amx-mkl": the amx route with its weight gradients on MKL's
    bf16 GEMM (by default they run on srn_fast's AMX kernel too)."""
    route = bf16_route
    ext = srn_fast._ext.load()
    assert ext.cpu_bf16_route() == route.replace("-mkl", "")
    g = torch.Generator().manual_seed(M + N + K)
    a = torch.randn((K, M) if ta else (M, K), generator=g).bfloat16()
    b = torch.randn((N, K) if tb else (K, N), generator=g).bfloat16()
    ref = (a.double().t() if ta else a.double()) @ (b.double().t() if tb else b.double())
    tol = 4e-3 * ref.abs().max().item() if route == "onednn" else 1e-5 * K ** 0.5
    c = torch.full((M, N), float("nan"))
    ext.cpu_gemm(ta, tb, a, b, c, 0.0)
    assert (c.double() - ref).abs().max().item() <= tol
    c0 = torch.randn(M, N, generator=g)
    c = c0.clone()
    ext.cpu_gemm(ta, tb, a, b, c, 1.0)
    assert (c.double() - ref - c0.double()).abs().max().item() <= tol + 1e-6


def test_the_routes_this_machine_has_are_measured():
    """widened and onednn everywhere; avx512bf16 exactly where the CPU has AVX512-BF16 and amx exactly where it has
    AMX-BF16 (so that the skips of the routes' tests can only mean the hardware lacks it); auto never picks onednn
    (it rounds results to bf16)."""
    import platform

    from srn_fast.ops import precision
    from srn_fast.ops._layers import cpu_flags

    rates = precision.tile_gemm_rates()
    assert {"float32", "onednn", "widened"} <= set(rates)
    flags = cpu_flags()
    if flags and platform.machine() in ("x86_64", "AMD64"):
        assert ("avx512bf16" in rates) == ("avx512_bf16" in flags), (sorted(rates), "avx512_bf16" in flags)
        assert ("amx" in rates) == ("amx_bf16" in flags and "avx512_bf16" in flags), (sorted(rates), flags & {
            "amx_bf16", "amx_tile"})
    ext = srn_fast._ext.load()
    ext.set_cpu_bf16_route("auto")
    assert ext.cpu_bf16_route() in ("mkl", "widened", "avx512bf16", "amx")


def test_auto_keeps_amx_unless_another_route_is_clearly_faster():
    """auto's rule, from the rates it measured: the fastest route with a float32 result, except that amx stays unless
    another measures 1.25x its rate (the one-GEMM probe does not show amx's packed weights; see chosen_route)."""
    from srn_fast.ops import precision

    rates = precision.tile_gemm_rates()
    candidates = {k: v for k, v in rates.items() if k in ("mkl", "widened", "avx512bf16", "amx")}
    best = max(candidates, key=candidates.get)
    if "amx" in candidates and candidates[best] < 1.25 * candidates["amx"]:
        best = "amx"
    ext = srn_fast._ext.load()
    ext.set_cpu_bf16_route("auto")
    assert ext.cpu_bf16_route() == best, rates


@pytest.mark.parametrize("bf16_route", ["widened"], indirect=True)
def test_route_is_selectable_and_a_bad_name_is_refused(bf16_route):
    ext = srn_fast._ext.load()
    assert ext.cpu_bf16_route() == "widened"
    with pytest.raises(RuntimeError, match="bf16 route must be 'auto', 'mkl', 'onednn', 'widened', 'avx512bf16' or "
                       "'amx', got 'fast'"):
        ext.set_cpu_bf16_route("fast")
    assert ext.cpu_bf16_route() == "widened"  # a refused name changes nothing
