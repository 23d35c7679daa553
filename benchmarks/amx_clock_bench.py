"""What an AMX GEMM costs the code after it: why phi's bf16 share of torch's bf16 bmm stops short on an AMX CPU.

Builds and runs ``benchmarks/micro/amx_clock.cpp`` (the C++ compiler torch's extensions use, torch's headers, and
srn_fast's own AMX GEMM and LayerNorm row sources) on one core, then prints two tables:

* one tile of phi's bf16 forward, [128, 256] x [256, 256] on the AMX tiles, and the LayerNorm + ReLU rows of its
  output: each alone, one after the other (what the fused op does), and in 32-row stripes with each stripe's rows
  after the next stripe's GEMM (whether the core overlaps them);
* a chain of scalar multiply-adds timed right after AMX GEMMs at growing idle delays, against the same chain after
  no AMX work: the core's clock after AMX, as a ratio.

On a CPU without AMX it says so and writes nothing to measure. ``--json PATH`` writes the result with the machine's
facts (benchmarks/bench_env.py). Needs a C++ compiler (g++ or $CXX) with AMX intrinsics (GCC 11+ or Clang).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

from bench_env import ROOT, import_srn_fast, machine_facts

SOURCES = ("benchmarks/micro/amx_clock.cpp", "csrc/common/cpu_gemm_amx.cpp", "csrc/common/cpu_gemm_dpbf16.cpp",
           "csrc/common/layernorm_avx512.cpp")


def build(out_dir: str) -> str:
    """Compiles the micro-benchmark into out_dir; returns the executable's path."""
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("amx_clock_bench: no C++ compiler found (set CXX or install g++)")
    exe = os.path.join(out_dir, "amx_clock")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd = [cxx, "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc")]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    cmd += [os.path.join(ROOT, s) for s in SOURCES]
    cmd += ["-o", exe, "-L", torch_lib, f"-Wl,-rpath,{torch_lib}", "-lc10"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"amx_clock_bench: the build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return exe


def run(exe: str) -> Dict:
    """Runs the micro-benchmark pinned to one core (the first this process may use) and parses its JSON."""
    cmd = [exe]
    if hasattr(os, "sched_getaffinity") and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), exe]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"amx_clock_bench: the run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def print_tables(res: Dict) -> None:
    g, r = res["gemm_us"], res["rows_us"]
    rows: List[tuple] = [("GEMM alone", g, ""), ("LayerNorm + ReLU rows alone", r, ""),
                         ("GEMM then rows", res["gemm_then_rows_us"], f"sum of the two alone: {g + r:.2f}"),
                         ("32-row stripes, rows one stripe behind", res["striped_us"], "")]
    print(f"# one tile of phi's bf16 forward, {res['tile'][0]} x {res['tile'][1]}, one core (best of 5 x 2000 calls)")
    print(f"{'what':<40} {'us':>8}  note")
    for name, t, note in rows:
        print(f"{name:<40} {t:>8.2f}  {note}")
    print("\n# a scalar chain right after four AMX GEMMs vs after none (TSC ticks)")
    print(f"{'idle before it (us)':>20} {'after AMX':>10} {'without':>10} {'ratio':>7}")
    for a in res["after_amx"]:
        print(f"{a['idle_us']:>20.1f} {a['ticks_after_amx']:>10.0f} {a['ticks_without']:>10.0f} {a['ratio']:>7.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the result and the machine's facts to this file")
    args = p.parse_args(argv)
    import_srn_fast()
    facts = machine_facts("cpu")
    if not (facts["cpu"]["flags"].get("amx_bf16") and facts["cpu"]["flags"].get("amx_tile")):
        print("amx_clock_bench: this CPU has no AMX (amx_tile / amx_bf16 flags): nothing to measure")
        return
    with tempfile.TemporaryDirectory(prefix="srn_amx_clock_") as tmp:
        res = run(build(tmp))
    if not res.get("amx"):
        print("amx_clock_bench: the CPU reports AMX but the process was not granted the tile state: nothing measured")
        return
    print_tables(res)
    if args.json:
        tmp_path = args.json + ".tmp"  # never a half-written result
        with open(tmp_path, "w") as fh:
            json.dump({"result": res, "environment": facts}, fh, indent=1)
        os.replace(tmp_path, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
