"""march_bench's --rounds summary: per backend the min / median / max of the rounds' speed-ups over torch (the
ratio of medians and the paired median), the torch rows and failed rounds left out."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import march_bench  # noqa: E402


def _row(backend, speedup, paired=None, rnd=0):
    r = {"name": "train_step_64x64", "backend": backend, "speedup_vs_torch": speedup, "round": rnd}
    if paired is not None:
        r["speedup_vs_torch_paired"] = {"median": paired, "min": paired - 0.1, "max": paired + 0.1}
    return r


def test_summary_over_rounds(capsys):
    rows = []
    for k, (s, p) in enumerate([(1.5, 1.6), (1.3, 1.4), (1.7, 1.5)]):
        rows += [_row("fused", s, p, k), _row("torch", 1.0, None, k), _row("fused-bf16", float("nan"), None, k)]
    out = march_bench.summarise_rounds(rows)
    assert [o["backend"] for o in out] == ["fused"]  # torch is the reference; a backend that never ran is left out
    assert out[0]["rounds"] == 3
    assert out[0]["speedup_vs_torch"] == [1.3, 1.5, 1.7]
    assert out[0]["speedup_vs_torch_paired"] == [1.4, 1.5, 1.6]
    assert "x torch over 3 rounds: min 1.30, median 1.50, max 1.70" in capsys.readouterr().out


def test_failed_rounds_do_not_count():
    rows = [_row("fused", 1.4, 1.4, 0), _row("fused", float("nan"), None, 1), _row("fused", 1.6, 1.6, 2)]
    (out,) = march_bench.summarise_rounds(rows)
    assert out["rounds"] == 2  # the rounds that ran
    assert out["speedup_vs_torch"] == [1.4, 1.5, 1.6] and not any(math.isnan(v) for v in out["speedup_vs_torch"])


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        march_bench.main(["--rounds", "0"])
    assert "--rounds: expected a positive count, got 0" in capsys.readouterr().err
