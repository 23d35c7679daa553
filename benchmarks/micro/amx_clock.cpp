// What an AMX GEMM does to the vector and scalar code after it, on one core: built and run by
// benchmarks/amx_clock_bench.py (which records the machine's facts with the result). Prints one JSON object.
//
//  1. One tile of phi's bf16 forward, [128, 256] x [256, 256] (cpu::gemm_amx_packed), and the LayerNorm + ReLU rows
//     of its 128 x 256 output (cpu::layernorm_relu_rows_avx512): each alone, one after the other (what the fused
//     forward does), and in 32-row stripes where stripe s's GEMM is followed by stripe s - 1's rows (does the core
//     overlap them?). Best of 5 runs of 2000 calls, microseconds.
//  2. A dependent chain of scalar multiply-adds (no vector, no memory) timed in TSC ticks right after four such
//     GEMMs, at growing idle delays after them, against the same chain after no AMX work: a ratio above 1 is the
//     core running slower after AMX.
#include "common/aligned.h"
#include "common/cpu_gemm.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

using namespace srn;
using namespace srn::cpu;

namespace {

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((noinline)) long scalar_chain(long n) {
  long x = 1;
  for (long i = 0; i < n; ++i) {
    x = x * 3 + i;
    asm volatile("" : "+r"(x));
  }
  return x;
}

template <typename F>
double best_us(F f) {
  for (int i = 0; i < 200; ++i) f();
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const double t = now_us();
    for (int i = 0; i < 2000; ++i) f();
    best = std::min(best, (now_us() - t) / 2000);
  }
  return best;
}

}  // namespace

int main() {
  if (!amx_available()) {
    std::printf("{\"amx\": false}\n");
    return 0;
  }
  constexpr int R = 128, C = 256, S = 32;  // tile rows, width, stripe rows
  std::mt19937 gen(1);
  std::normal_distribution<float> nd;
  aligned_vector<c10::BFloat16> A(R * C), W(C * C), Y(R * C);  // A [R, C] activations, W [C, C], Y [R, C] out
  for (auto& v : A) v = c10::BFloat16(nd(gen));
  for (auto& v : W) v = c10::BFloat16(0.06f * nd(gen));
  aligned_vector<uint32_t> Wp(amx_packed_words(C, C));
  amx_pack_b(false, C, C, W.data(), C, Wp.data());  // op(B) = W^T, as the forward packs it
  aligned_vector<float> Z(R * C), bias(C), rstd(R);  // Z [R, C] pre-activation, bias [C], rstd [R]
  for (auto& v : bias) v = 0.1f * nd(gen);
  auto gemm = [&](int r0, int rows) {
    gemm_amx_packed(false, rows, C, C, A.data() + r0 * C, C, Wp.data(), 0.f, Z.data() + r0 * C, C);
  };
  auto rows = [&](int r0, int n) {
    layernorm_relu_rows_avx512(Z.data() + r0 * C, n, C, C, bias.data(), nullptr, nullptr, 1e-5f, nullptr, nullptr, C,
                               nullptr, Y.data() + r0 * C, C, rstd.data() + r0, false);
  };
  const double t_gemm = best_us([&] { gemm(0, R); });
  const double t_rows = best_us([&] { rows(0, R); });
  const double t_seq = best_us([&] { gemm(0, R); rows(0, R); });
  const double t_striped = best_us([&] {
    for (int s = 0; s < R; s += S) {
      gemm(s, S);
      if (s > 0) rows(s - S, S);
    }
    rows(R - S, S);
  });
  std::printf("{\"amx\": true, \"tile\": [%d, %d], \"gemm_us\": %.3f, \"rows_us\": %.3f, \"gemm_then_rows_us\": %.3f, "
              "\"striped_us\": %.3f, \"after_amx\": [",
              R, C, t_gemm, t_rows, t_seq, t_striped);
  volatile long sink = 0;
  const long delays[] = {0, 2000, 20000, 200000, 2000000};  // scalar iterations idled before the timed chain
  for (int d = 0; d < 5; ++d) {
    constexpr int n = 300;
    constexpr long chain = 2000;
    uint64_t after = 0, base = 0;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < 4; ++j) gemm(0, R);
      sink = scalar_chain(delays[d]);
      const uint64_t t = __builtin_ia32_rdtsc();
      sink = scalar_chain(chain);
      after += __builtin_ia32_rdtsc() - t;
    }
    const double t_idle = now_us();
    for (int i = 0; i < n; ++i) sink = scalar_chain(delays[d]);
    const double idle_us = (now_us() - t_idle) / n;
    for (int i = 0; i < n; ++i) {
      sink = scalar_chain(delays[d] + 100000);
      const uint64_t t = __builtin_ia32_rdtsc();
      sink = scalar_chain(chain);
      base += __builtin_ia32_rdtsc() - t;
    }
    std::printf("%s{\"idle_us\": %.2f, \"ticks_after_amx\": %.1f, \"ticks_without\": %.1f, \"ratio\": %.3f}",
                d ? ", " : "", idle_us, double(after) / n, double(base) / n, double(after) / double(base));
  }
  std::printf("]}\n");
  return 0;
}
