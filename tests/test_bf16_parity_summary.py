"""benchmarks/bf16_parity.py --summarize: the per-precision means and same-seed differences, over all seeds and
without the collapsed runs (a run's own flag, or for an older run the health event in its run folder's
metrics.jsonl): each precision against float32 over the seeds where neither run collapsed."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bf16_parity  # noqa: E402


def _run(folder, precision, seed, psnr, collapsed=None, health_log=None):
    name = f"{precision}_s{seed}"
    run = {"seed": seed, "precision": precision, "backend": "fused", "heldout_psnr": psnr, "heldout_ssim": 0.8,
           "train_seconds": 60.0 + seed, "steps": 1500, "matmul_dtype": "None", "cpu": "test cpu"}
    if collapsed is not None:
        run["collapsed"] = collapsed
    (folder / f"{name}.json").write_text(json.dumps(run))
    if health_log is not None:  # the run folder an older run left (no "collapsed" in its JSON)
        (folder / name).mkdir()
        (folder / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in health_log) + "\n")


def test_collapsed_runs_are_named_and_left_out_of_the_healthy_figures(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _run(runs, "fp32", 0, 21.0, collapsed=False)
    _run(runs, "bf16", 0, 20.8, collapsed=False)
    _run(runs, "fp32", 1, 12.8, collapsed=True)  # collapsed: its seed leaves the healthy figures
    _run(runs, "bf16", 1, 20.0, collapsed=False)
    # older runs without the flag: the run folder's health log says whether they collapsed
    _run(runs, "fp32", 2, 20.0, health_log=[{"kind": "train", "step": 10, "note": "no collapse"}])
    _run(runs, "bf16", 2, 13.0, health_log=[{"kind": "train", "step": 10},
                                             {"kind": "health", "event": "collapse", "step": 400}])
    _run(runs, "fp32", 3, 20.4, health_log=[{"kind": "train", "step": 10}])  # older, healthy
    _run(runs, "bf16", 3, 20.6)  # older, no run folder: counted healthy
    out = tmp_path / "result.json"
    assert bf16_parity.summarize(str(runs), str(out), "a note") == 0
    res = json.loads(out.read_text())
    assert res["collapsed_runs"] == [{"precision": "bf16", "seed": 2}, {"precision": "fp32", "seed": 1}]
    bf16 = res["summary"]["bf16"]
    assert bf16["runs"] == 4 and bf16["mean_psnr"] == pytest.approx((20.8 + 20.0 + 13.0 + 20.6) / 4)
    assert bf16["mean_same_seed_delta_db"] == pytest.approx((-0.2 + 7.2 - 7.0 + 0.2) / 4)
    healthy = bf16["healthy"]  # seeds 1 (fp32 collapsed) and 2 (bf16 collapsed) left out
    assert healthy["seeds"] == [0, 3] and healthy["runs"] == 2 and healthy["mean_psnr"] == pytest.approx(20.7)
    assert healthy["fp32_mean_psnr_same_seeds"] == pytest.approx(20.7)
    assert healthy["mean_same_seed_delta_db"] == pytest.approx(0.0)
    assert healthy["same_seed_delta_db_vs_fp32"] == {"0": pytest.approx(-0.2), "3": pytest.approx(0.2)}
    fp32 = res["summary"]["fp32"]["healthy"]  # float32's own collapsed run only
    assert fp32["seeds"] == [0, 2, 3] and fp32["mean_psnr"] == pytest.approx((21.0 + 20.0 + 20.4) / 3)
    assert [r["collapsed"] for r in res["runs"]] == [False, False, True, False, False, True, False, False]
    printed = capsys.readouterr().out
    assert "collapsed: bf16 seed 2, fp32 seed 1; without them" in printed
    assert "bf16: 2 runs, mean held-out PSNR 20.70 dB (fp32 20.70 over the same seeds)" in printed


def test_no_collapse_gives_the_same_figures_twice(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed, (a, b) in enumerate([(21.0, 20.5), (20.0, 20.9)]):
        _run(runs, "fp32", seed, a, collapsed=False)
        _run(runs, "bf16", seed, b, collapsed=False)
    out = tmp_path / "result.json"
    assert bf16_parity.summarize(str(runs), str(out)) == 0
    res = json.loads(out.read_text())
    assert res["collapsed_runs"] == []
    s = res["summary"]["bf16"]
    assert s["healthy"]["seeds"] == [0, 1]
    assert s["healthy"]["mean_same_seed_delta_db"] == s["mean_same_seed_delta_db"] == pytest.approx(0.2)
    assert "collapsed:" not in capsys.readouterr().out


def test_an_empty_folder_is_an_error(tmp_path, capsys):
    assert bf16_parity.summarize(str(tmp_path), str(tmp_path / "r.json")) == 2
    assert "no runs" in capsys.readouterr().err
