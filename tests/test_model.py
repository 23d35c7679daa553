import numpy as np
import pytest
import torch

import srn_fast
from srn_fast import geometry as g


def reference_keys(num_instances, latent=256, width=256):
    """The reference SRNsModel's state_dict, written out from ../shared/srn_reference.md."""
    keys = {"latent_codes.weight": (num_instances, latent)}
    for k in range(4):
        in_ch = 3 if k == 0 else width
        p = in_ch * width + width
        base = f"hyper_phi.layers.{k}.hyper_linear.hypo_params.net"
        for j in (0, 1):
            keys[f"{base}.{j}.net.0.weight"] = (latent, latent)
            keys[f"{base}.{j}.net.0.bias"] = (latent,)
            keys[f"{base}.{j}.net.1.weight"] = (latent,)
            keys[f"{base}.{j}.net.1.bias"] = (latent,)
        keys[f"{base}.2.weight"] = (p, latent)
        keys[f"{base}.2.bias"] = (p,)
    keys.update({"ray_marcher.lstm.weight_ih": (64, width), "ray_marcher.lstm.weight_hh": (64, 16),
                 "ray_marcher.lstm.bias_ih": (64,), "ray_marcher.lstm.bias_hh": (64,),
                 "ray_marcher.out_layer.weight": (1, 16), "ray_marcher.out_layer.bias": (1,)})
    for j in range(5):
        keys[f"pixel_generator.net.{j}.net.0.weight"] = (width, width)
        keys[f"pixel_generator.net.{j}.net.0.bias"] = (width,)
        keys[f"pixel_generator.net.{j}.net.1.weight"] = (width,)
        keys[f"pixel_generator.net.{j}.net.1.bias"] = (width,)
    keys["pixel_generator.net.5.weight"] = (3, width)
    keys["pixel_generator.net.5.bias"] = (3,)
    return keys


def test_state_dict_matches_reference():
    sd = srn_fast.SRNModel(3, backend="torch").state_dict()
    ref = reference_keys(3)
    assert len(ref) == 69
    assert list(sd.keys()) == list(ref.keys()) or set(sd.keys()) == set(ref.keys())
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    assert sd["hyper_phi.layers.0.hyper_linear.hypo_params.net.2.weight"].shape == (1024, 256)
    assert sd["hyper_phi.layers.3.hyper_linear.hypo_params.net.2.weight"].shape == (65792, 256)


def test_initialisation_as_reference():
    torch.manual_seed(0)
    m = srn_fast.SRNModel(50, backend="torch")
    # latent codes N(0, 0.01)
    assert abs(m.latent_codes.weight.std().item() - 0.01) < 1e-3
    # forget-gate quarter of both LSTM biases is 1, the rest U(-1/4, 1/4)
    for b in (m.ray_marcher.lstm.bias_ih, m.ray_marcher.lstm.bias_hh):
        assert torch.all(b[16:32] == 1.0)
        assert b[:16].abs().max() <= 0.25 and b[32:].abs().max() <= 0.25
    assert m.ray_marcher.lstm.weight_ih.abs().max() <= 0.25
    # hypernetwork last layer: kaiming normal (fan_in 256, relu) times 0.1 -> std sqrt(2/256) / 10
    w = m.hyper_phi.layers[1].hyper_linear.hypo_params.net[2].weight
    assert abs(w.std().item() - (2 / 256) ** 0.5 / 10) < 2e-4
    # other FCBlock Linears: kaiming normal, std sqrt(2 / fan_in)
    w = m.pixel_generator.net[0].net[0].weight
    assert abs(w.std().item() - (2 / 256) ** 0.5) < 3e-3
    ln = m.pixel_generator.net[0].net[1]
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_fit_single_srn_keys():
    m = srn_fast.SRNModel(1, fit_single_srn=True, backend="torch")
    sd = m.state_dict()
    assert "latent_codes.weight" not in sd and not any(k.startswith("hyper_phi") for k in sd)
    assert sd["phi.net.0.net.0.weight"].shape == (256, 3)
    assert sd["phi.net.3.net.0.weight"].shape == (256, 256) and "phi.net.4.net.0.weight" not in sd


def make_input(B=2, S=6, num_instances=3, dtype=torch.float32):
    eyes = [(1.2, -1.0, 0.6), (-0.8, 1.1, 0.9), (0.2, 1.5, -0.4)]
    pose = torch.stack([torch.tensor(g.look_at(np.array(eyes[b % 3])), dtype=dtype) for b in range(B)])
    K = g.intrinsics_matrix(S * 1.2, S / 2, S / 2).to(dtype).expand(B, 3, 3).contiguous()
    uv = g.uv_grid(S).to(dtype)[None].expand(B, -1, -1).contiguous()
    idx = torch.arange(B) % num_instances
    return {"instance_idx": idx, "pose": pose, "intrinsics": K, "uv": uv}


def small_model(**kw):
    kw.setdefault("backend", "torch")
    return srn_fast.SRNModel(3, latent_dim=16, phi_hidden=32, tracing_steps=3, **kw)


def test_forward_shapes_and_reference_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = small_model()
    inp = make_input()
    d0 = m.initial_depth(2, 36, "cpu")
    out = m.render(inp, initial_depth=d0)
    assert out["rgb"].shape == (2, 36, 3) and out["depth"].shape == (2, 36, 1)
    assert out["features"].shape == (2, 36, 32)
    # A checkpoint in the reference's format loads unchanged and renders the same.
    torch.save({"model": m.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pth")
    m2 = small_model()
    m2.load_state_dict(torch.load(tmp_path / "ckpt.pth")["model"])
    out2 = m2.render(inp, initial_depth=d0)
    assert torch.equal(out["rgb"], out2["rgb"]) and torch.equal(out["depth"], out2["depth"])


def test_forward_returns_tuple_and_losses():
    torch.manual_seed(0)
    m = small_model()
    inp = make_input()
    rgb, depth = m(inp)
    gt = {"rgb": torch.zeros_like(rgb)}
    L = m.losses((rgb, depth), gt)
    expected = 200 * torch.mean(rgb ** 2) + 1e-3 * 1e4 * torch.mean(torch.clamp(depth, max=0) ** 2) \
        + torch.mean(m.z ** 2)
    assert torch.allclose(L["total"], expected)


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    m = small_model()
    inp = make_input()
    rgb, depth = m(inp)
    L = m.losses((rgb, depth), {"rgb": torch.rand_like(rgb)})
    L["total"].backward()
    groups = {"latent_codes": m.latent_codes.weight, "hypernetwork": m.hyper_phi.layers[2].hyper_linear.hypo_params.net[0].net[0].weight,
              "hyper last": m.hyper_phi.layers[0].hyper_linear.hypo_params.net[2].weight,
              "lstm": m.ray_marcher.lstm.weight_ih, "lstm_hh": m.ray_marcher.lstm.weight_hh,
              "step head": m.ray_marcher.out_layer.weight, "pixel generator": m.pixel_generator.net[5].weight,
              "pixel generator LN": m.pixel_generator.net[2].net[1].weight}
    for name, p in groups.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # only the rows of the codes in the batch get gradient
    assert m.latent_codes.weight.grad[2].abs().sum() == 0


def test_z_input_overrides_embedding():
    torch.manual_seed(0)
    m = small_model()
    inp = make_input()
    d0 = m.initial_depth(2, 36, "cpu")
    a = m.render(inp, initial_depth=d0)["rgb"]
    z = m.latent_codes(inp["instance_idx"]).detach()
    inp_z = {k: v for k, v in inp.items() if k != "instance_idx"}
    inp_z["z"] = z
    assert torch.allclose(m.render(inp_z, initial_depth=d0)["rgb"], a)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("uv"), r"missing key\(s\) \['uv'\]"),
    (lambda d: d.pop("pose"), r"missing key"),
    (lambda d: d.update(uv=torch.zeros(2, 36)), r"uv'\] must have shape \[B, N, 2\] with B=2, got \[2, 36\]"),
    (lambda d: d.update(uv=torch.zeros(3, 36, 2)), r"uv'\] must have shape \[B, N, 2\] with B=2"),
    (lambda d: d.update(pose=torch.zeros(2, 3, 4)), r"pose'\] must have shape \[B, 4, 4\].*got \[2, 3, 4\]"),
    (lambda d: d.update(intrinsics=torch.zeros(2, 2, 2)), r"intrinsics'\] must have shape \[B, 3, 3\] or \[B, 4, 4\]"),
    (lambda d: d.update(instance_idx=torch.tensor([0.0, 1.5])), r"instance_idx'\] must hold whole numbers.*got 1.5"),
    (lambda d: d.update(instance_idx=torch.tensor([0.0, float("nan")])), r"instance_idx'\] must hold whole numbers"),
    (lambda d: d.update(instance_idx=torch.tensor([0.0, 3.0])), r"instance_idx'\] must lie in \[0, 2\]"),
    (lambda d: d.update(instance_idx=torch.tensor([-1.0, 0.0])), r"instance_idx'\] must lie in \[0, 2\].*\[-1, 0\]"),
    (lambda d: d.update(instance_idx=torch.tensor([True, False])), r"instance_idx'\] must be an integer tensor"),
    (lambda d: d.update(instance_idx=torch.tensor([0, 7])), r"instance_idx'\] must lie in \[0, 2\]"),
    (lambda d: d.update(instance_idx=torch.tensor([0, 1, 2])), r"instance_idx'\] must have shape \[B\]"),
    (lambda d: d.update(pose=torch.zeros(2, 4, 4, dtype=torch.int64)), r"pose'\] must be a floating-point"),
    (lambda d: d.update(z=torch.zeros(2, 5)), r"z'\] must have shape \[B, 16\]"),
    (lambda d: d.update(uv=[[0, 0]]), r"uv'\] must be a torch.Tensor"),
])
def test_bad_input_names_argument(mutate, match):
    m = small_model()
    inp = make_input()
    mutate(inp)
    with pytest.raises(srn_fast.ModelInputError, match=match):
        m(inp)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        srn_fast.SRNModel(2, backend="cuda-magic")


def test_any_ray_count():
    m = small_model()
    inp = make_input()
    inp["uv"] = inp["uv"][:, :7]  # not a perfect square
    rgb, depth = m(inp)
    assert rgb.shape == (2, 7, 3)


# ------------------------------------------------------------------------------------------------------------
# The reference's own batches. Its data loader (dataio.SceneInstanceDataset / SceneClassDataset.collate_fn),
# as documented in ../shared/srn_reference.md and the issue, yields per view a dict with
#   instance_idx  a 0-d *float32* tensor (built from a one-element float tensor, squeezed),
#   rgb           float32 [N, 3] in [-1, 1],
#   pose          float32 [4, 4] cam2world,
#   uv            *int64* [N, 2], (column, row), row-major over an S x S grid,
#   param         float32 [1] (a zero when the instance has no params/ folder),
#   intrinsics    float32 [4, 4] (the full 4x4 matrix its parse_intrinsics builds),
# and its collate_fn stacks every key over the batch (samples_per_instance views of each object in a row), so
# SRNModel gets instance_idx [B] float, uv [B, N, 2] int64, param [B, 1], ... and calls .long() on the indices
# itself. The helper below writes those conventions out (it is not the reference's code).
def reference_loader_batch(instances, S=5, samples_per_instance=2, intrinsics_3x3=False):
    eyes = [(1.2, -1.0, 0.6), (-0.8, 1.1, 0.9), (0.2, 1.5, -0.4), (1.0, 1.0, 1.0)]
    rows, cols = np.mgrid[0:S, 0:S]
    uv = torch.from_numpy(np.stack([cols.reshape(-1), rows.reshape(-1)], -1)).long()  # [S*S, 2] int64
    samples = []
    for k, inst in enumerate(instances):
        for j in range(samples_per_instance):
            K = torch.eye(4)
            K[0, 0] = K[1, 1] = 1.2 * S
            K[0, 2] = K[1, 2] = S / 2
            samples.append({
                "instance_idx": torch.Tensor([inst]).squeeze(),
                "rgb": torch.rand(S * S, 3) * 2 - 1,
                "pose": torch.tensor(g.look_at(np.array(eyes[(k + j) % 4])), dtype=torch.float32),
                "uv": uv.clone(),
                "param": torch.from_numpy(np.array([0])).float(),
                "intrinsics": K[:3, :3].clone() if intrinsics_3x3 else K,
            })
    return {key: torch.stack([smp[key] for smp in samples]) for key in samples[0]}


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("intrinsics_3x3", [False, True])
def test_reference_loader_batch_renders_as_a_long_index_batch(backend, intrinsics_3x3):
    torch.manual_seed(0)
    m = small_model(backend=backend)
    ref = reference_loader_batch([2, 0], intrinsics_3x3=intrinsics_3x3)
    assert ref["instance_idx"].dtype == torch.float32 and ref["instance_idx"].shape == (4,)
    assert ref["uv"].dtype == torch.int64 and ref["param"].shape == (4, 1)
    ours = {"instance_idx": ref["instance_idx"].long(), "pose": ref["pose"], "intrinsics": ref["intrinsics"],
            "uv": ref["uv"].float()}
    d0 = m.initial_depth(4, 25, "cpu")
    a = m.render(ref, initial_depth=d0)
    b = m.render(ours, initial_depth=d0)
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["depth"], b["depth"])
    assert torch.equal(a["z"], m.latent_codes.weight[[2, 2, 0, 0]])
    # the reference's forward signature too: model(model_input) -> (rgb, depth), losses on its ground truth
    rgb, depth = m(ref)
    L = m.losses((rgb, depth), {"rgb": ref["rgb"]})
    assert rgb.shape == (4, 25, 3) and depth.shape == (4, 25, 1) and torch.isfinite(L["total"])


def test_reference_loader_batch_bad_index_is_an_error():
    m = small_model()
    for bad, match in ((1.5, r"whole numbers.*1.5"), (3.0, r"must lie in \[0, 2\]")):
        batch = reference_loader_batch([0, bad])
        with pytest.raises(srn_fast.ModelInputError, match=match):
            m(batch)


def test_srn_dataset_batches_still_work(tiny_data):
    """srn_fast's own loader (int64 indices, float uv), through torch's DataLoader."""
    import os

    from srn_fast.data import SRNDataset

    ds = SRNDataset(os.path.join(tiny_data, "train"), sidelength=4)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["instance_idx"].dtype == torch.int64
    m = srn_fast.SRNModel(ds.num_instances, latent_dim=8, phi_hidden=16, tracing_steps=2, rendering_layers=2,
                          backend="torch")
    rgb, depth = m(batch)
    assert rgb.shape == (3, 16, 3) and depth.shape == (3, 16, 1)
