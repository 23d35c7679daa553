"""SRNDataset on small handmade SRN folders: the reference's conventions, hand-computed, and every bad case."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srn_fast.data import DataError, SRNDataset
from srn_fast.data import io as dio
from srn_fast.geometry import GeometryError

pytestmark = pytest.mark.filterwarnings("ignore:.*not square")

H, W = 6, 8  # raw image size: centre crop keeps rows 0:6, columns 1:7


def _img(seed, h=H, w=W, c=3):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


POSE = np.array([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, -0.25], [0.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 1.0]])


def make_instance(folder, n_views=3, pose_one_line=True, depth=False, semantic=False, seed=0):
    """rgb/ (H x W random colours), pose/, intrinsics.txt (f=10 cx=4 cy=3, H x W), optional depth/semantic."""
    for sub in ("rgb", "pose") + (("depth",) if depth else ()) + (("semantic",) if semantic else ()):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    imgs = []
    for v in range(n_views):
        a = _img(seed * 100 + v)
        imgs.append(a)
        Image.fromarray(a).save(os.path.join(folder, "rgb", f"{v:06d}.png"))
        p = POSE.copy()
        p[0, 3] += v
        text = " ".join(repr(float(x)) for x in p.ravel()) if pose_one_line else \
            "\n".join(" ".join(repr(float(x)) for x in row) for row in p)
        with open(os.path.join(folder, "pose", f"{v:06d}.txt"), "w") as fh:
            fh.write(text + "\n")
        if depth:
            z = np.arange(H * W, dtype=np.float64).reshape(H, W) * 0.01 + 0.1 * v
            dio.save_depth(os.path.join(folder, "depth", f"{v:06d}.png"), z)
        if semantic:
            dio.save_semantic(os.path.join(folder, "semantic", f"{v:06d}.png"),
                              (np.arange(H * W).reshape(H, W) % 5).astype(np.int64))
    with open(os.path.join(folder, "intrinsics.txt"), "w") as fh:
        fh.write(f"10. 4. 3. 0.\n0. 0. 0.\n1.\n{H} {W}\n")
    return imgs


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    make_instance(str(r / "b_obj"), n_views=3, pose_one_line=True, depth=True, semantic=True, seed=1)
    make_instance(str(r / "a_obj"), n_views=10, pose_one_line=False, depth=True, semantic=True, seed=2)
    return r


def _quiet(**kw):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SRNDataset(**kw)


def test_crop_resize_colour_uv_and_intrinsics(root):
    with pytest.warns(UserWarning, match="not square"):
        ds = SRNDataset(root, sidelength=3)
        s = ds[0]
    assert ds.instance_names == ["a_obj", "b_obj"]  # sorted
    assert len(ds) == 13 and ds.num_views(0) == 10 and ds.num_views(1) == 3
    raw = _img(200).astype(np.float64) / 255.0  # a_obj view 0
    crop = raw[0:6, 1:7]  # H=6, W=8: min 6, centre (3, 4) -> rows 0:6, cols 1:7
    expected = crop.reshape(3, 2, 3, 2, 3).mean(axis=(1, 3))  # exact 2x2 area means
    expected = (expected - 0.5) * 2
    assert s["rgb"].shape == (9, 3) and s["rgb"].dtype == torch.float32
    np.testing.assert_allclose(s["rgb"].numpy(), expected.reshape(9, 3), atol=1e-6)
    assert s["rgb"].min() >= -1 and s["rgb"].max() <= 1
    # uv: (column, row), row-major: pixel k is row k // 3, column k % 3
    assert s["uv"].tolist() == [[c, r] for r in range(3) for c in range(3)]
    assert s["uv"].dtype == torch.float32
    # intrinsics rescaled as the reference: cx' = 4/8*3, cy' = 3/6*3, f' = 3/6*10
    K = s["intrinsics"]
    assert K.shape == (4, 4) and K.dtype == torch.float32
    assert torch.allclose(K, torch.tensor([[5.0, 0, 1.5, 0], [0, 5.0, 1.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert s["pose"].dtype == torch.float32 and torch.equal(s["pose"], torch.tensor(POSE, dtype=torch.float32))
    assert s["instance_idx"].dtype == torch.int64 and s["instance_idx"].dim() == 0
    # depth and semantic: same crop, nearest rule src = floor(dst * 6 / 3) -> crop rows/cols 0, 2, 4
    z = (np.arange(H * W).reshape(H, W) * 0.01)[0:6, 1:7][::2, ::2]
    np.testing.assert_allclose(s["depth"].numpy(), z.reshape(9, 1), atol=6e-5)
    assert s["depth"].shape == (9, 1) and s["semantic"].dtype == torch.int64
    sem = (np.arange(H * W).reshape(H, W) % 5)[0:6, 1:7][::2, ::2]
    assert s["semantic"].tolist() == sem.ravel().tolist()


def test_both_pose_forms_and_collate(root):
    ds = _quiet(root=root, sidelength=2)
    one_line = ds[10]  # b_obj view 0 (one-line pose file)
    four_lines = ds[0]  # a_obj view 0 (four lines of four)
    assert torch.equal(one_line["pose"], four_lines["pose"])
    batch = torch.utils.data.default_collate([ds[0], ds[11], ds[5]])
    assert batch["instance_idx"].tolist() == [0, 1, 0] and batch["observation_idx"].tolist() == [0, 1, 5]
    assert batch["uv"].shape == (3, 4, 2) and batch["pose"].shape == (3, 4, 4)
    from srn_fast.model import check_model_input
    assert check_model_input(batch, num_instances=ds.num_instances) == 3


def test_area_resize_is_exact_area_averaging():
    # integer ratio: block means, which PIL's BOX filter also computes
    rng = np.random.default_rng(0)
    img = rng.random((12, 12, 3)).astype(np.float32)
    ours = dio.resize_area(img, 4)
    for c in range(3):
        pil = np.asarray(Image.fromarray(img[:, :, c]).resize((4, 4), Image.BOX))
        np.testing.assert_allclose(ours[:, :, c], pil, atol=1e-6)
    # non-integer ratio (3 -> 2): fractional pixel coverage, as OpenCV's INTER_AREA (the reference's filter)
    a = np.array([1.0, 4.0, 10.0])
    img = (a[:, None] * a[None, :])[:, :, None]
    out = dio.resize_area(img, 2)[:, :, 0]
    w = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]) / 1.5
    np.testing.assert_allclose(out, w @ img[:, :, 0] @ w.T, rtol=1e-6)
    assert out[0, 0] == pytest.approx(((1 + 2) / 1.5) ** 2)
    assert np.allclose(dio.area_matrix(13, 5).sum(1), 1.0)
    # odd-sized crop drops the last row/column as the reference
    assert dio.square_crop(np.zeros((5, 7))).shape == (4, 4)
    assert dio.resize_nearest(np.arange(8)[:, None] * np.ones((1, 8)), 3)[:, 0].tolist() == [0, 2, 5]


def test_max_observations_specific_idcs_and_instances(root):
    ds = _quiet(root=root, sidelength=2, max_observations=3)
    # np.linspace(0, 10, 3, endpoint=False) = 0, 3.33, 6.67 -> 0, 3, 6; b_obj has 3 views -> all
    assert [int(ds[i]["observation_idx"]) for i in range(len(ds))] == [0, 3, 6, 0, 1, 2]
    assert len(_quiet(root=root, sidelength=2, specific_observation_idcs=2)) == 2
    ds = _quiet(root=root, sidelength=2, specific_observation_idcs=[2, 1])
    assert [int(ds[i]["observation_idx"]) for i in range(len(ds))] == [2, 1, 2, 1]
    assert torch.equal(ds[0]["pose"][0, 3], torch.tensor(0.5 + 2.0))
    ds = _quiet(root=root, sidelength=2, max_num_instances=1)
    assert ds.num_instances == 1 and ds.instance_names == ["a_obj"] and len(ds) == 10
    with pytest.raises(DataError, match=r"b_obj.*out of range"):
        _quiet(root=root, sidelength=2, specific_observation_idcs=[5])


def test_ray_subsets_and_sidelength(root):
    full = _quiet(root=root, sidelength=4)
    ds = _quiet(root=root, sidelength=4, num_rays=5, seed=3)
    a, b = ds[0], ds[0]
    assert a["rgb"].shape == (5, 3) and a["uv"].shape == (5, 2) and a["depth"].shape == (5, 1)
    assert a["semantic"].shape == (5,)
    f = full[0]
    idx = (a["uv"][:, 1] * 4 + a["uv"][:, 0]).long()  # same subset for every key
    for k in ("rgb", "depth", "semantic"):
        assert torch.equal(a[k], f[k][idx])
    assert len(set(idx.tolist())) == 5
    assert not torch.equal(a["uv"], b["uv"])  # fresh subset per access
    again = _quiet(root=root, sidelength=4, num_rays=5, seed=3)
    assert torch.equal(again[0]["uv"], a["uv"])  # deterministic per seed
    # multi-resolution: N and intrinsics follow set_sidelength; the cache is keyed by sidelength
    full.set_sidelength(2)
    s2 = full[0]
    assert s2["rgb"].shape == (4, 3) and float(s2["intrinsics"][0, 0]) == pytest.approx(2 / 6 * 10)
    full.set_sidelength(4)
    assert torch.equal(full[0]["rgb"], f["rgb"])
    assert {k[0] for k in full._cache} == {2, 4}
    with pytest.raises(ValueError, match="num_rays"):
        ds.set_sidelength(2)


def test_dataloader_workers(root):
    ds = _quiet(root=root, sidelength=4, num_rays=6)
    dl = torch.utils.data.DataLoader(ds, batch_size=13, num_workers=2, shuffle=False)
    batch = next(iter(dl))
    assert batch["rgb"].shape == (13, 6, 3) and batch["instance_idx"].tolist() == [0] * 10 + [1] * 3


def test_depth_npy_rgba_and_world2cam_flag(tmp_path):
    make_instance(str(tmp_path / "x"), n_views=1)
    os.makedirs(tmp_path / "x" / "depth")
    z = np.full((H, W), 1.25, dtype=np.float32)
    np.save(tmp_path / "x" / "depth" / "000000.npy", z)
    a = _img(7, c=4)
    Image.fromarray(a).save(tmp_path / "x" / "rgb" / "000000.png")  # RGBA: first three channels
    with open(tmp_path / "x" / "intrinsics.txt", "a") as fh:
        fh.write("1\n")  # world2cam flag: the pose files hold world2cam
    ds = _quiet(root=tmp_path, sidelength=6)
    s = ds[0]
    assert torch.allclose(s["depth"], torch.full((36, 1), 1.25))
    exp = (a[:, 1:7, :3].astype(np.float64) / 255 - 0.5) * 2
    np.testing.assert_allclose(s["rgb"].numpy(), exp.reshape(36, 3), atol=1e-6)
    assert torch.allclose(s["pose"], torch.tensor(np.linalg.inv(POSE), dtype=torch.float32), atol=1e-6)


# ------------------------------------------------------------------------------------------ bad data

def _expect(root, match, exc=DataError, load=False, **kw):
    with pytest.raises(exc, match=match):
        ds = _quiet(root=root, sidelength=2, **kw)
        if load:
            for i in range(len(ds)):
                ds[i]


def test_empty_or_missing_root(tmp_path):
    _expect(tmp_path, "no instance folders")
    _expect(tmp_path / "nope", "root folder not found")


@pytest.mark.parametrize("sub", ["rgb", "pose"])
def test_missing_rgb_or_pose(tmp_path, sub):
    make_instance(str(tmp_path / "x"))
    import shutil
    shutil.rmtree(tmp_path / "x" / sub)
    _expect(tmp_path, rf"x[/\\]{sub}: missing {sub}/")


def test_missing_intrinsics(tmp_path):
    make_instance(str(tmp_path / "x"))
    os.remove(tmp_path / "x" / "intrinsics.txt")
    _expect(tmp_path, r"intrinsics.txt: missing")


def test_count_mismatch(tmp_path):
    make_instance(str(tmp_path / "x"), n_views=3)
    os.remove(tmp_path / "x" / "pose" / "000001.txt")
    _expect(tmp_path, r"x: 3 images in rgb/ but 2 pose files")


@pytest.mark.parametrize("text,match", [("1 2 3", "16 numbers.*found 3"), ("1 " * 15 + "nan", "non-finite"),
                                        ("1 " * 15 + "x", "non-numeric"), ("1 " * 17, "found 17")])
def test_bad_pose(tmp_path, text, match):
    make_instance(str(tmp_path / "x"))
    (tmp_path / "x" / "pose" / "000001.txt").write_text(text)
    _expect(tmp_path, r"000001.txt: pose file.*" + match, exc=GeometryError)


@pytest.mark.parametrize("text,match", [("10 4 3 0\n0 0 0\n1\n", "at least 4 lines"),
                                        ("10 4 3\n0 0 0\n1\n6 8\n", "line 1"),
                                        ("10 4 3 0\n0 0 0\n1\n6 eight\n", "line 4"),
                                        ("10 4 3 0\n0 0 0\n1\n0 8\n", "positive")])
def test_malformed_intrinsics(tmp_path, text, match):
    make_instance(str(tmp_path / "x"))
    (tmp_path / "x" / "intrinsics.txt").write_text(text)
    _expect(tmp_path, r"intrinsics.txt: .*" + match, exc=GeometryError)


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_and_truncated_image(tmp_path):
    """A clear error naming the file, and the file closed (PIL keeps a truncated image's file open on its error)."""
    make_instance(str(tmp_path / "x"))
    (tmp_path / "x" / "rgb" / "000001.png").write_bytes(b"not a png at all")
    _expect(tmp_path, r"000001.png: cannot read rgb image", load=True)
    good = (tmp_path / "x" / "rgb" / "000002.png").read_bytes()
    (tmp_path / "x" / "rgb" / "000001.png").write_bytes(good[: len(good) // 2])
    _expect(tmp_path, r"000001.png: cannot read rgb image", load=True)


def test_unexpected_file_in_rgb(tmp_path):
    make_instance(str(tmp_path / "x"))
    (tmp_path / "x" / "rgb" / "notes.txt").write_text("hi")
    _expect(tmp_path, r"notes.txt: unexpected entry in rgb/")


def test_bad_optional_folders(tmp_path):
    make_instance(str(tmp_path / "x"), depth=True, semantic=True)
    make_instance(str(tmp_path / "y"))
    _expect(tmp_path, r"y[/\\]depth: missing depth/ folder while other instances have one")
    ds = _quiet(root=tmp_path, sidelength=2, with_depth=False, with_semantic=False)
    assert "depth" not in ds[0] and "semantic" not in ds[0]
    import shutil
    shutil.rmtree(tmp_path / "y")
    os.remove(tmp_path / "x" / "depth" / "000000.png")
    _expect(tmp_path, r"x[/\\]depth: 2 files in depth/ but 3 images")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "x" / "depth" / "000000.png")  # 8-bit
    _expect(tmp_path, r"000000.png: depth PNG must be 16-bit", load=True)
    Image.fromarray(_img(0)).save(tmp_path / "x" / "semantic" / "000000.png")
    _expect(tmp_path, r"semantic[/\\]000000.png: semantic PNG must be greyscale or palette", load=True,
            with_depth=False)


def test_generated_top_folder_hint(tmp_path):
    make_instance(str(tmp_path / "train" / "x"))
    os.makedirs(tmp_path / "test")
    _expect(tmp_path, r"generated dataset's top folder")


# ------------------------------------------------------------------------------------------ data that makes no sense

def test_pose_that_is_not_rigid_names_the_file(tmp_path):
    make_instance(str(tmp_path / "x"))
    p = POSE.copy()
    p[:3, :3] *= 1.5  # a scale
    (tmp_path / "x" / "pose" / "000001.txt").write_text(" ".join(repr(float(v)) for v in p.ravel()))
    _expect(tmp_path, r"000001.txt: pose is not a rigid transform \(a scale", exc=GeometryError)


def test_zero_focal_length_names_the_file(tmp_path):
    make_instance(str(tmp_path / "x"))
    (tmp_path / "x" / "intrinsics.txt").write_text(f"0. 4. 3. 0.\n0. 0. 0.\n1.\n{H} {W}\n")
    _expect(tmp_path, r"x[/\\]intrinsics.txt: line 1.*focal length must be positive", exc=GeometryError)


def _warnings_of(fn):
    import warnings
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in got if issubclass(w.category, UserWarning) and "not square" not in str(w.message)]


def test_intrinsics_image_size_that_disagrees_with_the_images_warns_once(tmp_path):
    for name in ("a", "b"):
        make_instance(str(tmp_path / name))
        (tmp_path / name / "intrinsics.txt").write_text(f"10. 4. 3. 0.\n0. 0. 0.\n1.\n{2 * H} {2 * W}\n")
    ds = SRNDataset(tmp_path, sidelength=4)
    got = _warnings_of(lambda: [ds[i] for i in range(len(ds))])
    assert len(got) == 1, got
    assert f"a{os.sep}intrinsics.txt: says the images are {2 * W} x {2 * H}" in got[0] and f"is {W} x {H}" in got[0]
    make_instance(str(tmp_path / "good" / "c"))  # intrinsics.txt says H x W: no warning
    good = SRNDataset(tmp_path / "good", sidelength=4)
    assert _warnings_of(lambda: [good[i] for i in range(len(good))]) == []


def test_sidelength_above_the_images_size_warns_once(tmp_path):
    make_instance(str(tmp_path / "x"), n_views=3)
    make_instance(str(tmp_path / "y"), n_views=2)
    ds = SRNDataset(tmp_path, sidelength=8)  # images are 8 x 6: the square crop is 6 x 6
    got = _warnings_of(lambda: [ds[i] for i in range(len(ds))])
    assert len(got) == 1 and "smaller than the sidelength 8" in got[0] and "000000.png" in got[0], got
    ds.set_sidelength(6)
    assert _warnings_of(lambda: [ds[i] for i in range(len(ds))]) == []
