"""The CPU kernels that use instruction-set extensions (AVX-512F, AVX512-BF16, AMX) reach them through function attributes,
so that `SRN_FAST_NO_NATIVE=1` builds (`-march` left at the compiler's default, for wheels meant for other machines)
compile and run. The sources with such attributes are compiled here for plain x86-64 and linked with a small driver
that runs each kernel this CPU has against a plain reference: an intrinsic called from a function without the
attribute compiles under `-march=native` on a machine with the extension and fails everywhere else, and GCC 12
dropped the stores filling a stack tile configuration in such a build (SIGILL at the first AMX instruction) while the
native build ran."""
import glob
import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
#include "common/cpu_gemm.h"
#include <cmath>
#include <cstdio>
#include <vector>
using srn::cpu::dpbf16_packed_words;
static float bf(c10::BFloat16 v) { return float(v); }
int main() {
  const int64_t M = 37, N = 64, K = 96;  // M not a multiple of the kernels' blocks
  std::vector<c10::BFloat16> A(M * K), W(N * K);  // W [N, K]: C = A W^T, as the tile loops' forward
  for (int64_t i = 0; i < M * K; ++i) A[i] = c10::BFloat16(float((i * 37) % 101) / 50.f - 1.f);
  for (int64_t i = 0; i < N * K; ++i) W[i] = c10::BFloat16(float((i * 53) % 89) / 44.f - 1.f);
  std::vector<float> ref(M * N, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) ref[m * N + n] += bf(A[m * K + k]) * bf(W[n * K + k]);
  auto check = [&](const char* name, const std::vector<float>& c) {
    double err = 0;
    for (int64_t i = 0; i < M * N; ++i) err = std::fmax(err, std::fabs(c[i] - ref[i]));
    std::printf("%s %s %.3g\n", name, err < 1e-3 ? "ok" : "WRONG", err);
    return err < 1e-3;
  };
  bool good = true;
  if (srn::cpu::dpbf16_available()) {
    std::vector<uint32_t> P(dpbf16_packed_words(K, N));
    srn::cpu::dpbf16_pack_b(true, K, N, W.data(), K, P.data());
    std::vector<float> c(M * N, 0.f);
    srn::cpu::gemm_dpbf16_packed(false, M, N, K, A.data(), K, P.data(), 0.f, c.data(), N);
    good &= check("avx512bf16", c);
  }
  if (srn::cpu::amx_available()) {
    std::vector<uint32_t> P(srn::cpu::amx_packed_words(K, N));
    srn::cpu::amx_pack_b(true, K, N, W.data(), K, P.data());
    std::vector<float> c(M * N, 0.f);
    srn::cpu::gemm_amx_packed(false, M, N, K, A.data(), K, P.data(), 0.f, c.data(), N);
    good &= check("amx", c);
  }
  if (srn::cpu::f32_avx512_available()) {  // the float32 loops (the march's LSTM products): 59 columns, a masked tail
    const int64_t n = N - 5;
    std::vector<float> a(M * K), wt(K * N), c(M * N, 0.f);
    for (int64_t i = 0; i < M * K; ++i) a[i] = bf(A[i]);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) wt[k * N + j] = bf(W[j * K + k]);
    srn::cpu::gemm_f32_avx512(M, n, K, a.data(), K, 1, wt.data(), N, false, c.data(), N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n; j < N; ++j) c[m * N + j] = ref[m * N + j];  // columns past n: not written
    good &= check("f32avx512", c);
  }
  if (srn::cpu::ln_row_avx512_available()) {  // LayerNorm+ReLU of ref's rows (n = 64) against a plain loop
    std::vector<float> z = ref, y(M * N), rstd(M);
    srn::cpu::layernorm_relu_rows_avx512(z.data(), M, N, N, nullptr, nullptr, nullptr, 1e-5f, nullptr, nullptr, N,
                                         y.data(), nullptr, N, rstd.data());
    double err = 0;
    for (int64_t m = 0; m < M; ++m) {
      double mean = 0, var = 0;
      for (int64_t n = 0; n < N; ++n) mean += ref[m * N + n] / N;
      for (int64_t n = 0; n < N; ++n) var += (ref[m * N + n] - mean) * (ref[m * N + n] - mean) / N;
      for (int64_t n = 0; n < N; ++n) {
        const double want = std::fmax(0.0, (ref[m * N + n] - mean) / std::sqrt(var + 1e-5));
        err = std::fmax(err, std::fabs(y[m * N + n] - want));
      }
    }
    std::printf("layernorm %s %.3g\n", err < 1e-4 ? "ok" : "WRONG", err);
    good &= err < 1e-4;
  }
  return good ? 0 : 1;
}
"""


def _target_attribute_sources():
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)):
        with open(path) as fh:
            if "__attribute__((target(" in fh.read():
                out.append(path)
    return out


def test_target_attribute_sources_build_and_run_for_plain_x86_64(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the extension-specific kernels are x86-64 only")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    from torch.utils.cpp_extension import include_paths, library_paths

    from srn_fast.ops._layers import cpu_flags

    sources = _target_attribute_sources()
    assert {os.path.basename(s) for s in sources} == {"cpu_gemm_amx.cpp", "cpu_gemm_dpbf16.cpp",
                                                     "gemm_f32_avx512.cpp", "layernorm_avx512.cpp"}
    driver = tmp_path / "driver.cpp"
    driver.write_text(DRIVER)
    lib = library_paths()[0]
    cmd = [cxx, "-std=c++20", "-O2", "-march=x86-64", *[f"-I{p}" for p in include_paths()],
           f"-I{os.path.join(ROOT, 'csrc')}", f"-I{sysconfig.get_paths()['include']}", *sources, str(driver),
           f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-o", str(tmp_path / "driver")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, "the kernels do not build for plain x86-64:\n" + res.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "driver")], capture_output=True, text=True)
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stdout}{run.stderr}"
    flags = cpu_flags()
    if flags:  # the kernels the CPU has ran (not skipped by a failed availability check)
        ran = {line.split()[0] for line in run.stdout.splitlines()}
        want = {"avx512bf16", "layernorm"} if "avx512_bf16" in flags else set()
        if "avx512f" in flags:
            want.add("f32avx512")
        if {"amx_bf16", "avx512_bf16"} <= flags:
            want.add("amx")
        assert ran == want, (run.stdout, sorted(flags & {"avx512_bf16", "amx_bf16"}))
