"""What every benchmark shares: which srn_fast it measures, and the facts of the machine it ran on.

``import_srn_fast()`` imports the srn_fast that ``import srn_fast`` gives from anywhere (an installed copy, editable
or not); only when none is installed does it fall back to this source tree. It prints which copy that is and
whether its compiled extension loaded, so a result can never silently come from an unbuilt copy.
``machine_facts()`` is the block every JSON result carries: CPU model and the flags that decide the matmul paths
(AVX2, AVX-512, AVX512-BF16, AMX), threads, load, versions, commit, GPU name, and on the CPU the tile GEMM rates
(float32 and each bf16 route) with the bf16 route that srn_fast picked from them.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def import_srn_fast(verbose: bool = True):
    try:
        import srn_fast
    except ModuleNotFoundError:
        sys.path.insert(0, ROOT)  # not installed: the source tree (built in place, or torch-only)
        import srn_fast
    from srn_fast import _ext

    if verbose:
        print(_ext.describe(), flush=True)
    return srn_fast


def cpu_info() -> Dict:
    """CPU model name and the matmul-relevant flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def machine_facts(device: str = "cpu") -> Dict:
    import torch

    from srn_fast import _ext

    ext = _ext.load()
    facts = {
        "cpu": cpu_info(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda},
        "srn_fast": _ext.describe(), "commit": git_commit(),
        "cpu_gemm": ext.cpu_gemm_backend() if ext is not None and hasattr(ext, "cpu_gemm_backend") else None,
    }
    if str(device).startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name()
    elif ext is not None and hasattr(ext, "cpu_bf16_route"):
        facts["cpu_tile_gemm_gflops"] = {name: float(r) for name, r in ext.cpu_tile_gemm_rates()}
        facts["cpu_bf16_route"] = ext.cpu_bf16_route()
    return facts
