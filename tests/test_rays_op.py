import numpy as np
import pytest
import torch

from srn_fast import geometry as g
from srn_fast.ops import lift_rays

from op_utils import cuda, require_extension

ext = require_extension()


def _inputs(dtype, device="cpu", B=2, N=37):
    gen = torch.Generator().manual_seed(3)
    uv = (torch.rand(B, N, 2, generator=gen) * 32).to(dtype)
    K = g.intrinsics_matrix(40.0, 16.0, 15.0).to(dtype).expand(B, 3, 3).contiguous()
    c2w = torch.stack([torch.tensor(g.look_at(np.array(e))) for e in [(1, 2, 0.5), (-2, 0.3, 1)][:B]]).to(dtype)
    d0 = (torch.rand(B, N, generator=gen) + 0.01).to(dtype)
    return [t.to(device) for t in (uv, c2w, K, d0)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_lift_rays_matches_geometry(dtype, tol):
    uv, c2w, K, d0 = _inputs(dtype)
    x0, d = lift_rays(uv, c2w, K, d0)
    assert torch.allclose(x0, g.world_from_xy_depth(uv, d0, c2w, K), atol=tol)
    assert torch.allclose(d, g.get_ray_directions(uv, c2w, K), atol=tol)


def test_lift_rays_zero_rays_and_errors():
    uv, c2w, K, d0 = _inputs(torch.float32, N=0)
    x0, d = lift_rays(uv, c2w, K, d0)
    assert x0.shape == (2, 0, 3)
    fx, fy, cx, cy = g.parse_intrinsics_tensor(K)
    Kv = torch.stack([fx, fy, cx, cy], -1)
    with pytest.raises(RuntimeError, match=r"c2w must have shape \[B, 3, 4\]"):
        torch.ops.srn_fast.lift_rays(uv, Kv, c2w, d0)
    with pytest.raises(RuntimeError, match="depth0 has dtype Double but uv has dtype Float"):
        torch.ops.srn_fast.lift_rays(uv, Kv, c2w[:, :3], d0.double())


@cuda
def test_lift_rays_cuda_matches_cpu():
    cpu = _inputs(torch.float32)
    gpu = [t.cuda() for t in cpu]
    for a, b in zip(lift_rays(*cpu), lift_rays(*gpu)):
        assert torch.allclose(a, b.cpu(), atol=1e-5)
