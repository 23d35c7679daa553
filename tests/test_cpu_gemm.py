"""The tile loops' cpu::gemm against torch.mm, in every layout and for beta 0 and 1, at the thin shapes (one side
<= 4: phi's 3-wide first layer, the 3-wide rgb layer) that it runs with its own loops instead of the BLAS."""
import pytest
import torch

import srn_fast

from op_utils import require_extension

require_extension()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,N,K", [(128, 256, 3), (128, 3, 256), (256, 3, 128), (3, 256, 128), (4, 5, 6),
                                   (7, 1, 9), (5, 6, 4), (16, 24, 32)])
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
