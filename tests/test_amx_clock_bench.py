"""benchmarks/amx_clock_bench.py: builds and runs its C++ micro-benchmark against srn_fast's own AMX GEMM and
LayerNorm row sources where the CPU has AMX, and says there is nothing to measure (writing nothing) where it has not."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import amx_clock_bench  # noqa: E402
import bench_env  # noqa: E402


def test_measures_or_says_why_not(tmp_path, capsys):
    path = tmp_path / "amx_clock.json"
    amx_clock_bench.main(["--json", str(path)])
    out = capsys.readouterr().out
    flags = bench_env.cpu_info()["flags"]
    if not (flags["amx_tile"] and flags["amx_bf16"]):
        assert "nothing to measure" in out and not path.exists()
        return
    if "not granted the tile state" in out:  # a kernel that refuses the tile state: said, nothing written
        assert not path.exists()
        return
    data = json.loads(path.read_text())
    res = data["result"]
    assert data["environment"]["cpu"]["flags"]["amx_bf16"]
    assert res["tile"] == [128, 256]
    for key in ("gemm_us", "rows_us", "gemm_then_rows_us", "striped_us"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert len(res["after_amx"]) == 5
    assert all(a["ticks_after_amx"] > 0 and a["ticks_without"] > 0 and a["ratio"] > 0 for a in res["after_amx"])
    assert [a["idle_us"] for a in res["after_amx"]] == sorted(a["idle_us"] for a in res["after_amx"])
    assert "GEMM then rows" in out and f"wrote {path}" in out
