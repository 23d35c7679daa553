"""The comparison command: SRN few-shot (one view) vs. the baseline, end to end on a tiny config."""
import json
import math
import os
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch

from srn_fast import SRNModel, checkpoint
from srn_fast.baseline import TatarchenkoNet, save_checkpoint
from srn_fast.cli import main as cli_main
from srn_fast.compare import markdown_table
from srn_fast.compare.grid import make_grid

from _spheres import write_sphere_root
from op_utils import one_line_error

S = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    unseen = write_sphere_root(str(root / "unseen"), n_objects=2, n_views=4, size=S, seed=3)
    torch.manual_seed(0)
    srn = SRNModel(num_instances=3, latent_dim=8, tracing_steps=3, phi_hidden=16, rendering_layers=1,
                   backend="torch")
    checkpoint.save(str(root / "srn.pth"), srn, extra={"step": 0})
    save_checkpoint(str(root / "baseline.pt"), TatarchenkoNet(S, width=4, code_dim=16))
    return root, unseen


def test_compare_cli_end_to_end(setup, capsys):
    root, unseen = setup
    out = str(root / "out")
    rc = cli_main(["compare", "--srn-checkpoint", str(root / "srn.pth"), "--baseline-checkpoint",
                   str(root / "baseline.pt"), "--data", unseen, "--input-view", "1", "--fit-steps", "3",
                   "--fit-lr", "1e-3", "--grid-views", "2", "--out", out, "--no-progress"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["compare.json", "compare.md", "compare_depth_grid.png", "compare_grid.png"]
    with open(os.path.join(out, "compare.json")) as fh:
        rep = json.load(fh)
    for m in ("baseline", "srn"):
        s = rep["summary"][m]
        assert s["num_views"] == 6 and s["num_objects"] == 2  # 2 objects x 3 held-out views
        assert all(math.isfinite(s[k]) for k in ("psnr", "ssim", "depth_abs_error"))
        views = [(r["instance"], r["view"]) for r in rep["per_view"][m]]
        assert (("obj_000", 1) not in views) and len(set(views)) == 6  # the input view is never scored
    assert rep["per_view"]["baseline"][0]["view"] == rep["per_view"]["srn"][0]["view"]
    assert rep["setup"]["input_view"] == 1 and rep["setup"]["fit_steps"] == 3
    md = Path(os.path.join(out, "compare.md")).read_text()
    assert md.count("\n| ") == 3 and "SRN" in md and "Tatarchenko" in md
    assert md in capsys.readouterr().out
    grid = imageio.imread(os.path.join(out, "compare_grid.png"))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]  # 4 columns, 4 rows + a header row, wider than tall
    # the baseline's numbers agree with baseline-eval on the same views
    rc = cli_main(["baseline-eval", "--checkpoint", str(root / "baseline.pt"), "--data", unseen, "--input-view", "1",
                   "--out", str(root / "be.json"), "--no-progress"])
    assert rc == 0
    with open(root / "be.json") as fh:
        be = json.load(fh)
    for k in ("psnr", "ssim", "depth_abs_error"):
        assert be["summary"][k] == pytest.approx(rep["summary"]["baseline"][k])


def test_compare_bad_input(setup, tmp_path, capsys):
    root, unseen = setup
    base = ["compare", "--srn-checkpoint", str(root / "srn.pth"), "--baseline-checkpoint", str(root / "baseline.pt"),
            "--data", unseen, "--out", str(tmp_path / "o"), "--fit-steps", "1", "--no-progress"]
    cases = [
        (base[:1] + ["--srn-checkpoint", str(tmp_path / "none.pth")] + base[3:], "none.pth"),
        (base[:3] + ["--baseline-checkpoint", str(root / "srn.pth")] + base[5:], "not a baseline checkpoint"),
        (base[:5] + ["--data", str(tmp_path / "nowhere")] + base[7:], "--data"),
        (base + ["--input-view", "9"], "input view 9 out of range"),
        (base + ["--fit-steps", "0"], "--fit-steps"),
        (base[:1] + ["--srn-checkpoint", str(root / "srn_nan.pth")] + base[3:], "holds non-finite weights"),
    ]
    ck = torch.load(root / "srn.pth", weights_only=False)
    ck["model"]["ray_marcher.out_layer.bias"][0] = float("inf")
    torch.save(ck, root / "srn_nan.pth")
    for argv, msg in cases:
        one_line_error(capsys, argv, msg)
    assert not os.path.exists(tmp_path / "o" / "compare.json")


def test_grid_layout():
    tile = torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()
    g = make_grid([[tile] * 4, [tile] * 4], ["input", "baseline", "SRN", "truth"], cell=32, pad=2)
    assert g.dtype.name == "uint8" and g.shape[2] == 3
    assert g.shape[1] == 4 * (32 + 2) + 2 and g.shape[0] > 2 * (32 + 2)
    with pytest.raises(ValueError, match="one per header"):
        make_grid([[tile] * 3], ["a", "b", "c", "d"])


def test_markdown_table_reports_both_methods():
    res = {"setup": {"input_view": 0, "num_objects": 2, "data": "D", "sidelength": 16, "fit_steps": 5},
           "summary": {"baseline": {"psnr": 20.0, "ssim": 0.8, "depth_abs_error": None, "num_views": 4},
                       "srn": {"psnr": 21.5, "ssim": 0.85, "depth_abs_error": 0.1, "num_views": 4}}}
    md = markdown_table(res)
    assert "| 20.00 | 0.800 | n/a | 4 |" in md and "| 21.50 | 0.850 | 0.100 | 4 |" in md
