// CPU path of the fused march (csrc/march/march.cpp): a tile of R rays of one scene goes through all T steps
// (phi -> LSTM cell -> step) while its activations stay in cache; at::parallel_for runs tiles side by side.
// Everything here works on raw pointers: phi through srn::tile (common/mlp_tile.h), the LSTM matmuls through
// srn_fast's AVX-512 loops for float where the CPU has AVX-512F (common/gemm_f32_avx512.cpp), else cpu::gemm (MKL),
// the cell and its VJP through the per-element functions of common/srn_math.h.
//
// The LSTM's two input products are one GEMM: the tile keeps its LSTM input as [R, F + H] rows [phi's output | h]
// against the concatenated weight [W_ih | W_hh] (one call with K = F + H instead of a second one with K = H, which
// MKL ran at a small fraction of the first one's rate); likewise both input gradients and both weight gradients.
// Where march.cpp folds phi's last (plain linear) layer into W_ih, the tiles run phi without it, F is the width of
// its layer L - 2 and W_ih the folded per-scene weight (march.cpp, "LstmInput").
//
// Saved state (recompute / store modes), full-size buffers indexed [t, b, n, ...] so that a tile's rows are one
// contiguous block per step:
//   xs [T, B, N, 3] (x_t), hs, cs [T + 1, B, N, H] (h_t, c_t; index 0 = zeros), gates [T, B, N, 4H] (activated)
//   store mode only, per step t and phi layer l: act [B, N, C_l] (tile::forward's saved activation) and
//   rstd [B, N]; when phi's last layer is plain linear its act holds phi's output (the LSTM input) itself.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/aligned.h"
#include "common/cpu_gemm.h"
#include "common/mlp_tile.h"
#include "common/srn_math.h"

namespace srn {
namespace march_cpu {

template <typename T>
struct Lstm {
  const T* w_in;   // [4H, F + H]: [W_ih | W_hh]
  const T* w_in_t; // [F + H, 4H]: w_in transposed (the forward's B operand on the AVX-512 path)
  const T* bias;   // [4H] (b_ih + b_hh)
  const T* w_out;  // [H]
  const T* b_out;  // [1]
  int64_t H, F;    // F: the width of the LSTM input the tiles compute
  int64_t K() const { return F + H; }
};

template <typename T>
struct LstmGrad {  // per-thread accumulators (+=)
  T* w_in;         // [4H, F + H]
  T* bias;         // [4H]
  T* w_out;        // [H]
  T* b_out;        // [1]
};

// Pointers to the full-size saved buffers (null members = not kept); see the file comment.
template <typename T>
struct Saved {
  T* xs = nullptr;
  T* hs = nullptr;
  T* cs = nullptr;
  T* gates = nullptr;
  std::vector<T*> act, rstd;  // store mode: T * L each, index t * L + l
  std::vector<c10::BFloat16*> act_mm;  // store mode, likewise: a norm layer's xhat kept as bf16 (act then null)
  T* steps = nullptr;         // [T + 1, B, N, 3] per-step points, when requested
  int64_t BN = 0;             // B * N
};

// Per-thread scratch of the march (besides phi's tile::Workspace).
template <typename T>
struct Scratch {
  aligned_vector<T> in, pre, h[2], c[2], x[2], v_in, v_h, v_c, v_x, v_dirs, zeros;  // in, v_in: [R, F + H]
  std::vector<T*> act, rstd;  // this step's phi activations (L pointers each), for tile::forward / backward
  std::vector<c10::BFloat16*> act_mm;  // ... and its bf16 xhat rows (null where act is used)
  Scratch(int64_t R, int64_t H, int64_t F, int L) : act(L), rstd(L), act_mm(L, nullptr) {
    const int64_t r = std::max<int64_t>(R, 1);
    in.resize(r * (F + H));
    pre.resize(r * 4 * H);
    for (int k = 0; k < 2; ++k) {
      h[k].resize(r * H);
      c[k].resize(r * H);
      x[k].resize(r * 3);
    }
    v_in.resize(r * (F + H));
    v_h.resize(r * H);
    v_c.resize(r * H);
    v_x.resize(r * 3);
    v_dirs.resize(r * 3);
    zeros.assign(r * H, T(0));  // c_0 = 0 (a plain pointer keeps the cell loops free of branches)
  }
};

// Step t's saved phi rows of the tile starting at `row` into sc.act / sc.rstd / sc.act_mm (store mode).
template <typename T>
void step_rows(const Saved<T>& sv, int64_t t, int L, int64_t row, const tile::Layer<T>* phi, Scratch<T>& sc) {
  for (int l = 0; l < L; ++l) {
    const int64_t i = t * L + l, off = row * phi[l].cout;
    sc.act[l] = sv.act[i] ? sv.act[i] + off : nullptr;
    sc.act_mm[l] = sv.act_mm[i] ? sv.act_mm[i] + off : nullptr;
    sc.rstd[l] = sv.rstd[i] ? sv.rstd[i] + row : nullptr;
  }
}

// sigmoid and tanh for the float LSTM cell, written so that GCC vectorises the cell loops (std::exp / std::tanh
// are scalar library calls: they took ~10% of a float march; check with objdump that lstm_step_row<float, FastMathF>
// uses ymm/zmm registers). exp: Cephes' range reduction + degree-6 polynomial,
// relative error < 2e-7 on the clamped range; tanh(x) = 1 - 2 / (1 + exp(2x)), absolute error < 2e-7.
// double keeps the standard library (StdMath): the float64 tests compare with the oracle at 1e-9.
struct FastMathF {
  static inline float exp(float x) {
    x = std::min(std::max(x, -87.3f), 88.3f);
    // n = round(x / ln 2) by the 1.5 * 2^23 trick (std::floor does not vectorise without -fno-trapping-math, and
    // the clamps plus a floor-by-compare made GCC thread jumps and keep the loop scalar): exact while |x / ln 2| < 2^22
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  }
  static inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
  static inline float tanh(float x) { return 1.0f - 2.0f / (1.0f + exp(2.0f * x)); }
};
template <typename T>
struct CpuMath {
  using type = StdMath<T>;
};
template <>
struct CpuMath<float> {
  using type = FastMathF;
};

// The LSTM's three products of a tile, C[M, N] (+)= op(A) B with op(A) = A [M, K] or (ta) A^T (A stored [K, M]), row
// stride lda, and B [K, N] row-major (ldb): AVX-512 loops for float where the CPU has them
// (common/gemm_f32_avx512.cpp), else cpu::gemm (MKL), which takes B^T [N, K] instead where B_t is given (B is then a
// transposed copy of it: the forward's weight).
template <typename T>
void lstm_gemm(bool ta, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               const T* B_t, bool accumulate, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::lstm_gemm_avx512()) {
      return cpu::gemm_f32_avx512(M, N, K, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, accumulate, C, ldc);
    }
  }
  const T beta = accumulate ? T(1) : T(0);
  if (B_t) return cpu::gemm(ta, true, M, N, K, A, lda, B_t, K, beta, C, ldc);
  cpu::gemm(ta, false, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// One LSTM cell + step for R rays (srn_math.h's lstm_step_row per ray). pre [R, 4H]: gate pre-activations without
// the bias, turned into the activated gates (into `gates`, which may be pre). Writes c, h [R, H] and x_new [R, 3].
template <typename T>
void cell_forward(const Lstm<T>& lw, int64_t R, T* pre, T* gates, const T* c_prev, const T* x, const T* dirs, T* c,
                  T* h, T* x_new) {
  using M = typename CpuMath<T>::type;
  const int64_t H = lw.H;
  for (int64_t r = 0; r < R; ++r) {
    lstm_step_row<T, M>(int(H), pre + r * 4 * H, lw.bias, c_prev + r * H, lw.w_out, lw.b_out[0], x + r * 3,
                        dirs + r * 3, gates + r * 4 * H, c + r * H, h + r * H, x_new + r * 3);
  }
}

// VJP of cell_forward for R rays (srn_math.h's lstm_step_row_vjp per ray): v_x [R, 3] gradient of x_new, v_h [R, H]
// in, v_c [R, H] in/out. Writes v_pre [R, 4H]; adds v_x * s into v_dirs and the step head's gradients into g.
template <typename T>
void cell_backward(const Lstm<T>& lw, int64_t R, const T* gates, const T* c_prev, const T* c, const T* h,
                   const T* dirs, const T* v_x, const T* v_h, T* v_c, T clamp_v, T* v_pre, T* v_dirs,
                   LstmGrad<T>& g) {
  using M = typename CpuMath<T>::type;
  const int64_t H = lw.H;
  // clamp to [lo, hi]; no clamp = infinite bounds (a select either way, so the loop vectorises)
  const T lo = clamp_v >= T(0) ? -clamp_v : -std::numeric_limits<T>::infinity();
  const T hi = clamp_v >= T(0) ? clamp_v : std::numeric_limits<T>::infinity();
  T v_bout = T(0);
  constexpr int64_t kAhead = 4;  // the saved rows come from memory: asked for ahead (prefetch_span)
  for (int64_t r = 0; r < R; ++r) {
    if (r + kAhead < R) {
      const int64_t q = r + kAhead;
      prefetch_span(gates + q * 4 * H, int64_t(sizeof(T)) * 4 * H);
      for (const T* s : {c_prev, c, h}) prefetch_span(s + q * H, int64_t(sizeof(T)) * H);
    }
    v_bout += lstm_step_row_vjp<T, M>(int(H), gates + r * 4 * H, c_prev + r * H, c + r * H, h + r * H, lw.w_out,
                                      lw.b_out[0], dirs + r * 3, v_x + r * 3, v_h + r * H, v_c + r * H, lo, hi,
                                      v_pre + r * 4 * H, v_dirs + r * 3, g.w_out);
  }
  g.b_out[0] += v_bout;
}

// The h columns of the tile's LSTM input rows (in [R, F + H], row stride K): h_prev [R, H], or zeros before the
// first step.
template <typename T>
void set_h_columns(int64_t R, int64_t F, int64_t H, const T* h_prev, T* in) {
  const int64_t K = F + H;
  for (int64_t r = 0; r < R; ++r) {
    T* dst = in + r * K + F;
    if (h_prev) {
      std::memcpy(dst, h_prev + r * H, sizeof(T) * H);
    } else {
      std::fill(dst, dst + H, T(0));
    }
  }
}

// Forward of one tile: R rays of one scene starting at global row `row` (= b * N + n0).
// x0, dirs: the tile's [R, 3] rows; xT [R, 3] written.
template <typename T>
void tile_forward(const tile::Layer<T>* phi, int L, const Lstm<T>& lw, int64_t R, int64_t row, const T* x0,
                  const T* dirs, int64_t steps, T* xT, Saved<T>& sv, tile::Workspace<T>& ws, Scratch<T>& sc) {
  if (R <= 0) return;
  const int64_t H = lw.H, F = lw.F, K = lw.K(), BN = sv.BN;
  const bool keep = sv.xs != nullptr;
  const bool store = !sv.act.empty();
  std::vector<T*>& act = sc.act;
  std::vector<T*>& rstd = sc.rstd;
  const T* x = x0;
  const T* h_prev = nullptr;
  const T* c_prev = nullptr;
  T* in = sc.in.data();  // [R, K]: phi's output | h_prev
  if (sv.steps) std::memcpy(sv.steps + row * 3, x0, sizeof(T) * R * 3);
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t o = t * BN + row, o1 = (t + 1) * BN + row;
    if (keep) {
      T* xs = sv.xs + o * 3;
      if (xs != x) std::memcpy(xs, x, sizeof(T) * R * 3);
    }
    // phi into the first F columns (store mode with a plain last layer: into its saved block, then copied)
    const bool out_saved = store && !phi[L - 1].norm;
    if (store) step_rows(sv, t, L, row, phi, sc);
    tile::forward<T>(phi, L, R, x, 3, out_saved ? act[L - 1] : in, out_saved ? F : K,
                     store ? act.data() : nullptr, store ? rstd.data() : nullptr, ws, /*stream_act=*/store,
                     store ? sc.act_mm.data() : nullptr);
    if (out_saved) {
      for (int64_t r = 0; r < R; ++r) std::memcpy(in + r * K, act[L - 1] + r * F, sizeof(T) * F);
    }
    set_h_columns(R, F, H, h_prev, in);
    // LSTM gates: [feat | h] [W_ih | W_hh]^T (+ bias in the cell)
    T* pre = sc.pre.data();
    lstm_gemm<T>(false, R, 4 * H, K, in, K, lw.w_in_t, 4 * H, lw.w_in, false, pre, 4 * H);
    T* c = sc.c[t & 1].data();
    T* h = sc.h[t & 1].data();
    T* x_new = (t == steps - 1) ? xT : (keep ? sv.xs + o1 * 3 : sc.x[t & 1].data());
    cell_forward<T>(lw, R, pre, pre, c_prev ? c_prev : sc.zeros.data(), x, dirs, c, h, x_new);
    if (keep) {  // computed in cache, kept for the backward with non-temporal stores (no read of the lines first)
      stream_copy(sv.gates + o * 4 * H, pre, int64_t(sizeof(T)) * R * 4 * H);
      stream_copy(sv.cs + o1 * H, c, int64_t(sizeof(T)) * R * H);
      stream_copy(sv.hs + o1 * H, h, int64_t(sizeof(T)) * R * H);
    }
    if (sv.steps) std::memcpy(sv.steps + o1 * 3, x_new, sizeof(T) * R * 3);
    x = x_new;
    h_prev = h;
    c_prev = c;
  }
  if (steps == 0) std::memcpy(xT, x0, sizeof(T) * R * 3);
}

// The saved rows that the backward of step t of the tile at `row` (R rays) reads first: the cell's, x_t and phi's
// stored output (store mode; F wide), as Trickle spans.
template <typename T>
void ask_step(Trickle& tr, const Saved<T>& sv, int L, int64_t H, int64_t F, int64_t t, int64_t row, int64_t R) {
  const int64_t o = t * sv.BN + row, o1 = o + sv.BN, b = int64_t(sizeof(T)) * R;
  tr.add(sv.gates + o * 4 * H, b * 4 * H);
  if (t > 0) tr.add(sv.cs + o * H, b * H);
  if (t > 0) tr.add(sv.hs + o * H, b * H);
  tr.add(sv.cs + o1 * H, b * H);
  tr.add(sv.hs + o1 * H, b * H);
  tr.add(sv.xs + o * 3, b * 3);
  if (sv.act.empty()) return;
  const int64_t i = t * L + L - 1;
  if (sv.act_mm[i]) {
    tr.add(sv.act_mm[i] + row * F, int64_t(sizeof(c10::BFloat16)) * R * F);
  } else if (sv.act[i]) {
    tr.add(sv.act[i] + row * F, b * F);
  }
}

// Backward of one tile (the points x_t come from the saved xs). v_xT [R, 3]; writes v_x0, v_dirs [R, 3]; adds
// into the per-thread accumulators. next_row / next_R: the tile this thread runs next (next_R 0: none).
template <typename T>
void tile_backward(const tile::Layer<T>* phi, int L, const Lstm<T>& lw, int64_t R, int64_t row, const T* dirs,
                   int64_t steps, const T* v_xT, T clamp_v, const Saved<T>& sv, const tile::LayerGrad<T>* g_phi,
                   LstmGrad<T>& g, T* v_x0, T* v_dirs, tile::Workspace<T>& ws, Scratch<T>& sc, int64_t next_row = 0,
                   int64_t next_R = 0) {
  if (R <= 0) return;
  const int64_t H = lw.H, F = lw.F, K = lw.K(), BN = sv.BN;
  const bool store = !sv.act.empty();
  T* v_x = sc.v_x.data();
  T* v_h = sc.v_h.data();
  T* v_c = sc.v_c.data();
  T* vd = sc.v_dirs.data();
  T* v_pre = sc.pre.data();
  T* in = sc.in.data();      // [R, K]: phi's output at x_t | h_{t-1}
  T* v_in = sc.v_in.data();  // [R, K]: their gradients
  std::memcpy(v_x, v_xT, sizeof(T) * R * 3);
  std::fill(v_h, v_h + R * H, T(0));
  std::fill(v_c, v_c + R * H, T(0));
  std::fill(vd, vd + R * 3, T(0));
  std::vector<T*>& act = sc.act;
  std::vector<T*>& rstd = sc.rstd;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t o = t * BN + row, o1 = (t + 1) * BN + row;
    const T* gates = sv.gates + o * 4 * H;
    const T* c_prev = t > 0 ? sv.cs + o * H : sc.zeros.data();
    const T* h_prev = t > 0 ? sv.hs + o * H : nullptr;
    const T* c_new = sv.cs + o1 * H;
    const T* h_new = sv.hs + o1 * H;
    const T* x_t = sv.xs + o * 3;
    cell_backward<T>(lw, R, gates, c_prev, c_new, h_new, dirs, v_x, v_h, v_c, clamp_v, v_pre, vd, g);
    // phi's output at x_t: recomputed (keeping its activations in ws), or rebuilt from the stored ones
    if (store) {
      step_rows(sv, t, L, row, phi, sc);
      const tile::Layer<T>& last = phi[L - 1];
      const c10::BFloat16* am = sc.act_mm[L - 1];
      const bool fast_act = std::is_same_v<T, float> && cpu::avx512_rows() && F % 16 == 0;
      for (int64_t r = 0; r < R; ++r) {
        constexpr int64_t kAhead = 6;  // the saved rows come from memory (prefetch_span)
        if (am && r + kAhead < R) prefetch_span(am + (r + kAhead) * F, int64_t(sizeof(c10::BFloat16)) * F);
        T* f = in + r * K;
        if (last.norm) {
          tile::detail::act_row<T>(am ? nullptr : act[L - 1] + r * F, am ? am + r * F : nullptr, F, last.ln_weight,
                                   last.ln_bias, fast_act, f);
        } else if (am) {
          tile::detail::from_bf16(am + r * F, F, f);
        } else {
          std::memcpy(f, act[L - 1] + r * F, sizeof(T) * F);
        }
      }
    } else {
      tile::forward<T>(phi, L, R, x_t, 3, in, K, ws.act(), ws.rstd(), ws);
      for (int l = 0; l < L; ++l) {
        act[l] = ws.act()[l];
        rstd[l] = ws.rstd()[l];
        sc.act_mm[l] = nullptr;
      }
    }
    set_h_columns(R, F, H, h_prev, in);
    // gradients of the gate matmul: [W_ih | W_hh] and the bias; of its input: [feat | h_prev]
    lstm_gemm<T>(true, 4 * H, K, R, v_pre, 4 * H, in, K, nullptr, true, g.w_in, K);
    tile::detail::add_row_sums(v_pre, R, 4 * H, 4 * H, g.bias);
    lstm_gemm<T>(false, R, K, 4 * H, v_pre, 4 * H, lw.w_in, K, nullptr, false, v_in, K);
    if (t > 0) {
      for (int64_t r = 0; r < R; ++r) std::memcpy(v_h + r * H, v_in + r * K + F, sizeof(T) * H);
    }
    // what step t - 1 (or the next tile's last step) reads first from memory, asked for during phi's backward below
    // (128x128 bf16 step on a Zen 4, both threads, 3 steps: cell backward 120 -> 90 Mcycles, rebuild 125 -> 70,
    // phi's VJP rows 1260 -> 980 with the layers' own rows asked for likewise; ~40 ms a step)
    Trickle next;
    if (t > 0) {
      ask_step(next, sv, L, H, F, t - 1, row, R);
    } else if (next_R > 0) {
      ask_step(next, sv, L, H, F, steps - 1, next_row, next_R);
    }
    // through phi into x_t (x_{t+1} = x_t + dirs * s: the identity part is already in v_x)
    tile::backward<T>(phi, L, R, x_t, 3, act.data(), rstd.data(), v_in, K, v_x, 3, true, g_phi, ws,
                      sc.act_mm.data(), &next);
  }
  std::memcpy(v_x0, v_x, sizeof(T) * R * 3);
  std::memcpy(v_dirs, vd, sizeof(T) * R * 3);
}

}  // namespace march_cpu
}  // namespace srn
