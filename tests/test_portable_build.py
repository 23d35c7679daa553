"""The CPU kernels that use instruction-set extensions (AVX512-BF16, AMX) reach them through function attributes,
so that `SRN_FAST_NO_NATIVE=1` builds (`-march` left at the compiler's default, for wheels meant for other machines)
compile. Every such source is compiled here for plain x86-64: an intrinsic called from a function without the
attribute compiles under `-march=native` on a machine that has the extension and fails everywhere else."""
import glob
import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _target_attribute_sources():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)):
        with open(path) as fh:
            if "__attribute__((target(" in fh.read():
                out.append(path)
    return out


def test_target_attribute_sources_compile_for_plain_x86_64(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the extension-specific kernels are x86-64 only")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    from torch.utils.cpp_extension import include_paths

    sources = _target_attribute_sources()
    assert {os.path.basename(s) for s in sources} >= {"cpu_gemm_amx.cpp", "cpu_gemm_dpbf16.cpp",
                                                     "layernorm_avx512.cpp"}
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}",
                                                       f"-I{sysconfig.get_paths()['include']}"]
    for src in sources:
        cmd = [cxx, "-std=c++20", "-O2", "-march=x86-64", "-fPIC", *includes, "-c", src,
               "-o", str(tmp_path / "out.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{os.path.relpath(src, ROOT)} does not compile for plain x86-64:\n" + \
            res.stderr[-3000:]
