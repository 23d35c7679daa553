import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import srn_fast
from srn_fast import geometry as g
from srn_fast.data import DatasetError, SRNDataset, generate, instance_parts, load_meta, shapes

SURFACE_TOL = 1e-3  # |SDF| at lifted ground-truth depth; depth is stored in 1e-4 units, tracing stops at 1e-5


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "chairs")
    generate("chairs", instances=2, views=3, size=32, seed=1, out=out, test_views=2, unseen_instances=1,
             unseen_views=2, progress=False)
    return out


def test_generated_layout_and_load(generated):
    assert sorted(os.listdir(generated)) == ["meta.json", "test", "train", "unseen"]
    ds = SRNDataset(os.path.join(generated, "train"), sidelength=32)
    assert ds.num_instances == 2 and len(ds) == 6
    s = ds[4]
    assert s["instance_idx"].item() == 1 and s["observation_idx"].item() == 1
    assert s["rgb"].shape == (1024, 3) and s["uv"].shape == (1024, 2) and s["pose"].shape == (4, 4)
    assert s["depth"].shape == (1024, 1) and s["semantic"].shape == (1024,)
    assert s["rgb"].min() >= -1 and s["rgb"].max() <= 1
    test = SRNDataset(os.path.join(generated, "test"), sidelength=32)
    assert test.instance_names == ds.instance_names  # held-out views align with training codes
    # the model takes a collated batch directly
    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    m = srn_fast.SRNModel(ds.num_instances, latent_dim=8, phi_hidden=16, tracing_steps=2, backend="torch")
    rgb, depth = m(batch)
    assert rgb.shape == (2, 1024, 3)


def test_generator_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        generate("cars", instances=1, views=2, size=16, seed=5, out=out, test_views=1, unseen_instances=1,
                 unseen_views=1, progress=False)
    for sub in ("train/car_0000/rgb/000001.png", "train/car_0000/pose/000001.txt", "unseen/unseen_0000/depth/000000.png"):
        assert open(os.path.join(a, sub), "rb").read() == open(os.path.join(b, sub), "rb").read()
    assert load_meta(a)["part_names"] == shapes.CAR_PARTS


@pytest.mark.parametrize("split", ["train", "test", "unseen"])
def test_depth_lifts_onto_surface_and_labels_agree(generated, split):
    """Generator, loader and geometry agree: every foreground pixel's depth lifts onto the SDF's zero set."""
    ds = SRNDataset(os.path.join(generated, split), sidelength=32)
    n_fg = 0
    for idx in range(len(ds)):
        s = ds[idx]
        fg = s["depth"][:, 0] > 0
        assert fg.any() and (~fg).any()
        pts = g.world_from_xy_depth(s["uv"][None].double(), s["depth"][None].double(), s["pose"][None].double(),
                                    s["intrinsics"][None].double())[0]
        parts = instance_parts(generated, split, ds.instance_names[s["instance_idx"].item()])
        d = shapes.sdf(parts, pts[fg].float())
        assert d.abs().max().item() < SURFACE_TOL, d.abs().max().item()
        lab = shapes.labels(parts, pts[fg].float())
        assert (lab == s["semantic"][fg]).float().mean() > 0.98  # ties at part junctions may differ
        assert torch.all(s["semantic"][~fg] == 0)
        # background is white
        assert torch.all(s["rgb"][~fg] == 1.0)
        n_fg += int(fg.sum())
    assert n_fg > 100


def test_atomic_and_no_overwrite(tmp_path):
    out = str(tmp_path / "d")
    generate("chairs", 1, 1, 8, 0, out, test_views=1, unseen_instances=1, unseen_views=1, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        generate("chairs", 1, 1, 8, 0, out, progress=False)
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []


def _handmade(root, name="obj", n=2, H=6, W=8, pose_form="one"):
    inst = os.path.join(root, name)
    os.makedirs(os.path.join(inst, "rgb"))
    os.makedirs(os.path.join(inst, "pose"))
    rng = np.random.default_rng(0)
    imgs = []
    for v in range(n):
        img = rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
        imageio.imwrite(os.path.join(inst, "rgb", f"{v:03d}.png"), img)
        imgs.append(img)
        M = np.eye(4) + v
        text = " ".join(map(str, M.ravel())) if pose_form == "one" else "\n".join(" ".join(map(str, r)) for r in M)
        with open(os.path.join(inst, "pose", f"{v:03d}.txt"), "w") as fh:
            fh.write(text)
    with open(os.path.join(inst, "intrinsics.txt"), "w") as fh:
        fh.write(f"10 {W / 2} {H / 2} 0\n0 0 0\n1\n{H} {W}\n")
    return inst, imgs


@pytest.mark.parametrize("pose_form", ["one", "four"])
def test_loader_conventions(tmp_path, pose_form):
    inst, imgs = _handmade(str(tmp_path), pose_form=pose_form)
    ds = SRNDataset(str(tmp_path), sidelength=3)
    s = ds[1]
    # centre crop of the 6x8 image to 6x6 (columns 1..6), area resize 6 -> 3 (2x2 block means), [-1, 1]
    crop = imgs[1][:, 1:7, :3].astype(np.float64) / 255
    expected = crop.reshape(3, 2, 3, 2, 3).mean(axis=(1, 3))
    assert np.allclose(s["rgb"].numpy(), (expected.reshape(-1, 3) - 0.5) * 2, atol=1e-6)
    assert s["uv"][:4].tolist() == [[0, 0], [1, 0], [2, 0], [0, 1]]
    K = s["intrinsics"].numpy()  # cx' = 4 / 8 * 3, cy' = 3 / 6 * 3, f' = 3 / 6 * 10
    assert np.allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], [5.0, 5.0, 1.5, 1.5])
    assert np.allclose(s["pose"].numpy(), np.eye(4) + 1)
    assert "depth" not in s and "semantic" not in s


def test_observation_selection_and_ray_subsets(tmp_path):
    _handmade(str(tmp_path), n=10, H=4, W=4)
    ds = SRNDataset(str(tmp_path), sidelength=4, max_observations=3)
    assert [ds[i]["observation_idx"].item() for i in range(len(ds))] == [0, 3, 6]
    ds = SRNDataset(str(tmp_path), sidelength=4, specific_observation_idcs=[7, 2])
    assert [ds[i]["observation_idx"].item() for i in range(len(ds))] == [7, 2]
    ds = SRNDataset(str(tmp_path), sidelength=4, num_rays=5)
    full = SRNDataset(str(tmp_path), sidelength=4)[0]
    s = ds[0]
    assert s["rgb"].shape == (5, 3) and s["uv"].shape == (5, 2)
    flat = (s["uv"][:, 1] * 4 + s["uv"][:, 0]).long()
    assert torch.equal(s["rgb"], full["rgb"][flat])  # the same rays for every key
    ds.set_sidelength(2)
    assert ds[0]["intrinsics"][0, 0].item() == pytest.approx(10 * 2 / 4)
    with pytest.raises(DatasetError, match="out of range"):
        SRNDataset(str(tmp_path), specific_observation_idcs=[12])


def test_dataloader_workers(generated):
    ds = SRNDataset(os.path.join(generated, "train"), sidelength=16, num_rays=32)
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(batches) == 2 and batches[0]["rgb"].shape == (3, 32, 3)


def _break(root, how):
    inst = os.path.join(root, "obj")
    if how == "no_rgb":
        import shutil
        shutil.rmtree(os.path.join(inst, "rgb"))
    elif how == "no_pose":
        import shutil
        shutil.rmtree(os.path.join(inst, "pose"))
    elif how == "count":
        os.remove(os.path.join(inst, "pose", "001.txt"))
    elif how == "bad_pose":
        with open(os.path.join(inst, "pose", "001.txt"), "w") as fh:
            fh.write("1 2 3")
    elif how == "nan_pose":
        with open(os.path.join(inst, "pose", "001.txt"), "w") as fh:
            fh.write("nan " * 16)
    elif how == "intrinsics":
        with open(os.path.join(inst, "intrinsics.txt"), "w") as fh:
            fh.write("10 4\n")
    elif how == "image":
        with open(os.path.join(inst, "rgb", "001.png"), "wb") as fh:
            fh.write(b"not a png")


@pytest.mark.parametrize("how,match", [
    ("no_rgb", r"obj: missing folder 'rgb/'"), ("no_pose", r"obj: missing folder 'pose/'"),
    ("count", r"2 images in rgb/ but 1 poses"), ("bad_pose", r"001.txt: pose file must hold 16 numbers"),
    ("nan_pose", r"001.txt: pose file holds a non-finite"), ("intrinsics", r"intrinsics.txt"),
    ("image", r"001.png: cannot read image"),
])
def test_bad_data_names_the_file(tmp_path, how, match):
    _handmade(str(tmp_path))
    _break(str(tmp_path), how)
    with pytest.raises(ValueError, match=match):
        ds = SRNDataset(str(tmp_path), sidelength=4)
        [ds[i] for i in range(len(ds))]


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="no instance folders"):
        SRNDataset(str(tmp_path))
    with pytest.raises(DatasetError, match="data folder not found"):
        SRNDataset(str(tmp_path / "nope"))


def test_make_data_cli(tmp_path, capsys):
    from srn_fast.cli import main
    out = str(tmp_path / "cli")
    assert main(["make-data", "--kind", "cars", "--instances", "1", "--views", "2", "--size", "8", "--out", out,
                 "--unseen-instances", "1", "--unseen-views", "1", "--test-views", "1"]) == 0
    assert os.path.isfile(os.path.join(out, "train", "car_0000", "rgb", "000001.png"))
    assert main(["make-data", "--instances", "1", "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
