import math

import numpy as np
import pytest
import torch

from srn_fast import geometry as g


def _cam(B=1, eye=(1.0, -2.0, 0.5)):
    c2w = torch.tensor(g.look_at(np.array(eye)), dtype=torch.float64)
    return c2w.expand(B, 4, 4).contiguous()


def test_principal_point_lifts_onto_optical_axis():
    K = g.intrinsics_matrix(50.0, 31.5, 20.0).double()[None]
    c2w = _cam()
    uv = torch.tensor([[[31.5, 20.0]]], dtype=torch.float64)
    for depth in (0.5, 2.0, 7.0):
        p = g.world_from_xy_depth(uv, torch.full((1, 1), depth, dtype=torch.float64), c2w, K)
        centre, axis = c2w[0, :3, 3], c2w[0, :3, 2]
        assert torch.allclose(p[0, 0], centre + depth * axis, atol=1e-12)
    d = g.get_ray_directions(uv, c2w, K)
    assert torch.allclose(d[0, 0], c2w[0, :3, 2], atol=1e-12)


def test_hand_computed_pixel():
    # identity camera: x = (u - cx) / f * z, y = (v - cy) / f * z
    K = g.intrinsics_matrix(10.0, 4.0, 3.0).double()[None]
    c2w = torch.eye(4, dtype=torch.float64)[None]
    uv = torch.tensor([[[6.0, 1.0]]], dtype=torch.float64)
    p = g.world_from_xy_depth(uv, torch.tensor([[2.0]], dtype=torch.float64), c2w, K)
    assert torch.allclose(p, torch.tensor([[[0.4, -0.4, 2.0]]], dtype=torch.float64))
    d = g.get_ray_directions(uv, c2w, K)
    expected = torch.tensor([0.2, -0.2, 1.0], dtype=torch.float64)
    assert torch.allclose(d[0, 0], expected / expected.norm())


def test_depth_round_trip():
    gen = torch.Generator().manual_seed(1)
    B, N = 3, 50
    K = g.intrinsics_matrix(40.0, 16.0, 16.0).double().expand(B, 3, 3)
    c2w = torch.stack([torch.tensor(g.look_at(np.array(e))) for e in [(2, 0, 1), (0, -3, 0.2), (-1, 1, -2)]])
    uv = torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 32
    depth = torch.rand(B, N, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    pts = g.world_from_xy_depth(uv, depth, c2w, K)
    assert torch.allclose(g.get_depth(pts, c2w), depth, atol=1e-10)


def test_uv_grid_row_major_column_row():
    uv = g.uv_grid(4)
    assert uv.shape == (16, 2)
    assert uv[1].tolist() == [1.0, 0.0]  # second pixel: column 1, row 0
    assert uv[4].tolist() == [0.0, 1.0]  # fifth pixel: column 0, row 1


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_intrinsics_rescaled(tmp_path):
    path = _write(tmp_path, "intrinsics.txt", "131.25 64.0 64.0 0.\n0. 0. 0.\n1.\n128 128\n")
    full = g.parse_intrinsics(path)
    assert full.K[0, 0] == 131.25 and full.K[0, 2] == 64.0 and not full.world2cam_poses
    small = g.parse_intrinsics(path, trgt_sidelength=64)
    assert small.K[0, 0] == pytest.approx(131.25 / 2) and small.K[1, 1] == pytest.approx(131.25 / 2)
    assert small.K[0, 2] == pytest.approx(32.0) and small.K[1, 2] == pytest.approx(32.0)
    # non-square source: cx scales with the width, cy and f with the height
    path2 = _write(tmp_path, "intr2.txt", "100 80 30 0\n0 0 0\n1\n60 160\n1\n")
    r = g.parse_intrinsics(path2, trgt_sidelength=30)
    assert r.K[0, 2] == pytest.approx(80 / 160 * 30) and r.K[1, 2] == pytest.approx(30 / 60 * 30)
    assert r.K[0, 0] == pytest.approx(30 / 60 * 100) and r.world2cam_poses


@pytest.mark.parametrize("text,match", [
    ("131.25 64.0 64.0\n0 0 0\n1\n128 128\n", "line 1"),
    ("1 2 3 4\n0 0\n1\n128 128\n", "line 2"),
    ("1 2 3 4\n0 0 0\n1\n", "at least 4 lines"),
    ("1 2 3 4\n0 0 0\nabc\n128 128\n", "line 3"),
    ("1 2 3 4\n0 0 0\n1\n0 128\n", "positive"),
])
def test_intrinsics_malformed(tmp_path, text, match):
    path = _write(tmp_path, "intrinsics.txt", text)
    with pytest.raises(g.GeometryError, match=match) as e:
        g.parse_intrinsics(path)
    assert "intrinsics.txt" in str(e.value)


def test_pose_forms(tmp_path):
    M = g.look_at(np.array([1.1, -0.7, 0.9]))  # a rigid cam2world with full-precision numbers
    one = _write(tmp_path, "a.txt", " ".join(f"{v:.17g}" for v in M.ravel()) + "\n")
    four = _write(tmp_path, "b.txt", "\n".join(" ".join(f"{v:.17g}" for v in row) for row in M) + "\n")
    assert np.array_equal(g.load_pose(one), M)
    assert np.array_equal(g.load_pose(four), M)


@pytest.mark.parametrize("text,match", [("1 2 3", "found 3"), ("1 " * 15 + "nan", "non-finite"),
                                        ("1 " * 15 + "x", "non-numeric")])
def test_pose_malformed(tmp_path, text, match):
    path = _write(tmp_path, "p.txt", text)
    with pytest.raises(g.GeometryError, match=match) as e:
        g.load_pose(path)
    assert "p.txt" in str(e.value)


@pytest.mark.parametrize("change,match", [
    (lambda M: M.__setitem__((slice(0, 3), slice(0, 3)), 2 * M[:3, :3]), r"a scale: its columns have lengths 2, 2, 2"),
    (lambda M: M.__setitem__((slice(0, 3), 0), M[:3, 0] * 1.05), r"a scale"),
    (lambda M: M.__setitem__((slice(0, 3), 1), (M[:3, 1] + 0.3 * M[:3, 0]) / np.sqrt(1.09)),
     r"a shear: its columns are not orthogonal"),  # unit columns, 73 degrees apart
    (lambda M: M.__setitem__((slice(0, 3), 0), -M[:3, 0]), r"a mirror: .*determinant -1"),
    (lambda M: M.__setitem__(3, np.array([0.0, 0.0, 0.1, 1.0])), r"last row 0 0 0.1 1"),
    (lambda M: M.__setitem__(3, np.zeros(4)), r"last row 0 0 0 0"),
])
def test_pose_that_is_not_rigid_is_refused(tmp_path, change, match):
    M = g.look_at(np.array([1.1, -0.7, 0.9]))
    change(M)
    path = _write(tmp_path, "p.txt", " ".join(f"{v:.17g}" for v in M.ravel()))
    with pytest.raises(g.GeometryError, match=r"p\.txt: pose is not a rigid transform \(" + match):
        g.load_pose(path)


def test_pose_rounding_is_accepted(tmp_path):
    """Pose files written with few digits are still rotations to rounding: accepted."""
    M = g.look_at(np.array([1.1, -0.7, 0.9]))
    path = _write(tmp_path, "p.txt", " ".join(f"{v:.4f}" for v in M.ravel()))
    assert np.allclose(g.load_pose(path), M, atol=1e-4)


def test_zero_focal_length_is_refused(tmp_path):
    path = _write(tmp_path, "intrinsics.txt", "0. 32. 32. 0.\n0. 0. 0.\n1.\n64 64\n")
    with pytest.raises(g.GeometryError, match=r"intrinsics.txt: line 1.*focal length must be positive, got 0"):
        g.parse_intrinsics(path, 32)


def test_look_at_is_opencv():
    c2w = g.look_at(np.array([0.0, -3.0, 0.0]))
    assert np.allclose(c2w[:3, 2], [0, 1, 0])  # z forward, towards the origin
    assert np.allclose(c2w[:3, 1], [0, 0, -1])  # y down
    assert math.isclose(np.linalg.det(c2w[:3, :3]), 1.0)
