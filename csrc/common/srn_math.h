// Per-element math of srn_fast, written once for the CPU loops and the CUDA kernels.
//
// Every forward function sits next to its vector-Jacobian product (suffix `_vjp`); gradients carry
// the prefix `v_`. Nothing here includes torch or CUDA headers, so `.cu` files can include it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SRN_HD __host__ __device__ __forceinline__
#else
#define SRN_HD inline
#endif

// Vectorisation hints for the CPU loops (OpenMP SIMD, no threads; the reductions may be reassociated).
#if !defined(__CUDACC__) && defined(_OPENMP)
#define SRN_PRAGMA(x) _Pragma(#x)
#define SRN_SIMD_SUM(...) SRN_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define SRN_SIMD _Pragma("omp simd")
#else
#define SRN_SIMD_SUM(...)
#define SRN_SIMD
#endif

namespace srn {

template <typename T>
SRN_HD T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
SRN_HD T clamp(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// ---------------------------------------------------------------------------------------------
// Row functions take a Lanes policy: how the channels of one row are spread over threads.
//   SerialLanes: one thread walks every channel (the CPU loops; the loops vectorise).
//   On CUDA (common/elementwise_kernels.cu): WarpLanes (a warp per row, lane k takes channels k, k + 32, ...)
//   and BlockLanes (a block per row, thread k takes channel k), whose sum() is a warp- / block-wide reduction
//   that every lane takes part in. Every channel k is read and written by the lane that owns it, so the only
//   communication between lanes is sum().
struct SerialLanes {
  // constexpr, so that the loops are in OpenMP's canonical form with a constant step: their `omp simd` reductions
  // (SRN_SIMD_SUM) then vectorise (a plain call here measured 2.5-3.6x slower LayerNorm rows)
  static constexpr int first() { return 0; }
  static constexpr int step() { return 1; }
  template <typename T>
  static SRN_HD T sum(T v) {
    return v;
  }
};

// Row sums: sum over a row's channels k < n of term(k), reduced across the row's lanes. term is a functor
// (`T operator()(int64_t k) const`, or returning RowPair<T> for row_sum2) that may also write channel k, which only
// this lane owns. SerialLanes: four independent 8-wide partial sums over blocks of 32 channels, so that consecutive
// vector adds do not wait on each other (a single accumulator made the CPU LayerNorm rows latency-bound: a third of
// their time sat on the one dependent add). int64_t indices: int sums wrap under -fwrapv (Python's CFLAGS), and
// GCC then turned the loads into gathers.
template <typename Lanes>
struct SerialRow {
  static constexpr bool value = false;
};
template <>
struct SerialRow<SerialLanes> {
  static constexpr bool value = true;
};

template <typename T>
struct RowPair {
  T a, b;
};

template <typename T, typename Lanes, typename Term>
SRN_HD T row_sum(int n, const Term& term) {
  T s = T(0);
  if constexpr (SerialRow<Lanes>::value) {
    T a0[8] = {}, a1[8] = {}, a2[8] = {}, a3[8] = {};
    int64_t k0 = 0;
    for (; k0 + 32 <= n; k0 += 32) {
      SRN_SIMD
      for (int64_t j = 0; j < 8; ++j) {
        a0[j] += term(k0 + j);
        a1[j] += term(k0 + 8 + j);
        a2[j] += term(k0 + 16 + j);
        a3[j] += term(k0 + 24 + j);
      }
    }
    SRN_SIMD_SUM(s)
    for (int64_t k = k0; k < n; ++k) s += term(k);
    SRN_SIMD_SUM(s)
    for (int j = 0; j < 8; ++j) s += (a0[j] + a1[j]) + (a2[j] + a3[j]);
    return s;
  } else {
    for (int k = Lanes::first(); k < n; k += Lanes::step()) s += term(k);
    return Lanes::sum(s);
  }
}

// Two sums at once (term returns RowPair<T>), as row_sum.
template <typename T, typename Lanes, typename Term>
SRN_HD RowPair<T> row_sum2(int n, const Term& term) {
  T sa = T(0), sb = T(0);
  if constexpr (SerialRow<Lanes>::value) {
    T a0[8] = {}, a1[8] = {}, a2[8] = {}, a3[8] = {}, b0[8] = {}, b1[8] = {}, b2[8] = {}, b3[8] = {};
    int64_t k0 = 0;
    for (; k0 + 32 <= n; k0 += 32) {
      SRN_SIMD
      for (int64_t j = 0; j < 8; ++j) {
        const RowPair<T> p0 = term(k0 + j), p1 = term(k0 + 8 + j), p2 = term(k0 + 16 + j), p3 = term(k0 + 24 + j);
        a0[j] += p0.a, b0[j] += p0.b;
        a1[j] += p1.a, b1[j] += p1.b;
        a2[j] += p2.a, b2[j] += p2.b;
        a3[j] += p3.a, b3[j] += p3.b;
      }
    }
    SRN_SIMD_SUM(sa, sb)
    for (int64_t k = k0; k < n; ++k) {
      const RowPair<T> p = term(k);
      sa += p.a, sb += p.b;
    }
    SRN_SIMD_SUM(sa, sb)
    for (int j = 0; j < 8; ++j) {
      sa += (a0[j] + a1[j]) + (a2[j] + a3[j]);
      sb += (b0[j] + b1[j]) + (b2[j] + b3[j]);
    }
    return {sa, sb};
  } else {
    for (int k = Lanes::first(); k < n; k += Lanes::step()) {
      const RowPair<T> p = term(k);
      sa += p.a, sb += p.b;
    }
    return {Lanes::sum(sa), Lanes::sum(sb)};
  }
}

// ---------------------------------------------------------------------------------------------
// LSTM cell (PyTorch's LSTMCell, gate order i, f, g, o).
//   pre_*: gate pre-activations W_ih v + b_ih + W_hh h + b_hh
//   c_prev: previous cell state
// Outputs the activated gates (kept for the backward pass), the new cell and hidden state.
// M supplies sigmoid and tanh (StdMath: the standard library's; the CPU march passes a vectorisable float
// version, see csrc/march/march_cpu.h).
template <typename T>
struct StdMath {
  static SRN_HD T sigmoid(T x) { return srn::sigmoid(x); }
  static SRN_HD T tanh(T x) {
    using std::tanh;
    return tanh(x);
  }
};

template <typename T, typename M = StdMath<T>>
SRN_HD void lstm_cell(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev,
                      T& gi, T& gf, T& gg, T& go, T& c, T& h) {
  gi = M::sigmoid(pre_i);
  gf = M::sigmoid(pre_f);
  gg = M::tanh(pre_g);
  go = M::sigmoid(pre_o);
  c = gf * c_prev + gi * gg;
  h = go * M::tanh(c);
}

// VJP of lstm_cell: given v_h and v_c (gradients of the new h and c), returns the gradients of the
// four pre-activations and of c_prev.
template <typename T, typename M = StdMath<T>>
SRN_HD void lstm_cell_vjp(T gi, T gf, T gg, T go, T c_prev, T c, T v_h, T v_c,
                          T& v_pre_i, T& v_pre_f, T& v_pre_g, T& v_pre_o, T& v_c_prev) {
  const T tc = M::tanh(c);
  const T v_go = v_h * tc;
  const T v_ctot = v_c + v_h * go * (T(1) - tc * tc);
  v_c_prev = v_ctot * gf;
  const T v_gf = v_ctot * c_prev;
  const T v_gi = v_ctot * gg;
  const T v_gg = v_ctot * gi;
  v_pre_i = v_gi * gi * (T(1) - gi);
  v_pre_f = v_gf * gf * (T(1) - gf);
  v_pre_g = v_gg * (T(1) - gg * gg);
  v_pre_o = v_go * go * (T(1) - go);
}

// One LSTM step of one ray (row): the cell (pre-activations pre [4H] without the bias, + bias [4H]; c_prev [H])
// then the step head s = h . w_out + b_out and the point update x_new = x + dirs * s ([3]). Writes the activated
// gates [4H] (may alias pre), c, h [H] and x_new [3]. Called by the CPU march's tiles, the CPU batched path and
// the CUDA kernel (one warp per row).
template <typename T, typename M = StdMath<T>, typename Lanes = SerialLanes>
SRN_HD void lstm_step_row(int H, const T* pre, const T* bias, const T* c_prev, const T* w_out, T b_out, const T* x,
                          const T* dirs, T* gates, T* c, T* h, T* x_new) {
  // one base pointer per gate: indices like pre[H + k] are int sums that may wrap under -fwrapv (Python's CFLAGS),
  // so GCC turned them into gathers
  const T *pf = pre + H, *pg = pre + 2 * H, *po = pre + 3 * H;
  const T *bf = bias + H, *bg = bias + 2 * H, *bo = bias + 3 * H;
  T *gf_out = gates + H, *gg_out = gates + 2 * H, *go_out = gates + 3 * H;
  T s = T(0);
  SRN_SIMD_SUM(s)
  for (int k = Lanes::first(); k < H; k += Lanes::step()) {
    T gi, gf, gg, go, cn, hn;
    lstm_cell<T, M>(pre[k] + bias[k], pf[k] + bf[k], pg[k] + bg[k], po[k] + bo[k], c_prev[k], gi, gf, gg, go, cn,
                    hn);
    gates[k] = gi;
    gf_out[k] = gf;
    gg_out[k] = gg;
    go_out[k] = go;
    c[k] = cn;
    h[k] = hn;
    s += hn * w_out[k];
  }
  s = Lanes::sum(s) + b_out;
  for (int j = Lanes::first(); j < 3; j += Lanes::step()) x_new[j] = x[j] + dirs[j] * s;
}

// VJP of lstm_step_row, walking backwards. gates [4H] (activated), c_prev, c, h [H] (state before / after the
// step), dirs [3], v_x [3] (gradient of x_new), v_h [H] (gradient reaching h from the next step), v_c [H] (in:
// gradient of c; out: of c_prev). The total gradient of h is clamped to [lo, hi] (the reference's hook; +-inf for
// none). Writes v_pre [4H], adds v_x * s into v_dirs [3] and, when v_w_out is given, vs * h into v_w_out [H].
// Returns vs = v_x . dirs, the gradient of the step length s (and of b_out).
template <typename T, typename M = StdMath<T>, typename Lanes = SerialLanes>
SRN_HD T lstm_step_row_vjp(int H, const T* gates, const T* c_prev, const T* c, const T* h, const T* w_out, T b_out,
                           const T* dirs, const T* v_x, const T* v_h, T* v_c, T lo, T hi, T* v_pre, T* v_dirs,
                           T* v_w_out) {
  T s = T(0);
  SRN_SIMD_SUM(s)
  for (int k = Lanes::first(); k < H; k += Lanes::step()) s += h[k] * w_out[k];
  s = Lanes::sum(s) + b_out;
  const T vs = v_x[0] * dirs[0] + v_x[1] * dirs[1] + v_x[2] * dirs[2];
  for (int j = Lanes::first(); j < 3; j += Lanes::step()) v_dirs[j] += v_x[j] * s;
  if (v_w_out) {
    SRN_SIMD
    for (int k = Lanes::first(); k < H; k += Lanes::step()) v_w_out[k] += vs * h[k];
  }
  const T *gf = gates + H, *gg = gates + 2 * H, *go = gates + 3 * H;  // base pointers: see lstm_step_row
  T *vf = v_pre + H, *vg = v_pre + 2 * H, *vo = v_pre + 3 * H;
  SRN_SIMD
  for (int k = Lanes::first(); k < H; k += Lanes::step()) {
    T vh = v_h[k] + vs * w_out[k];
    vh = vh < lo ? lo : (vh > hi ? hi : vh);
    T vcp;
    lstm_cell_vjp<T, M>(gates[k], gf[k], gg[k], go[k], c_prev[k], c[k], vh, v_c[k], v_pre[k], vf[k], vg[k], vo[k],
                        vcp);
    v_c[k] = vcp;
  }
  return vs;
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (biased variance, eps inside the square root, as torch.nn.LayerNorm) + optional affine + ReLU over
// one row: the one family used by the CPU tiles (csrc/common/mlp_tile.h), the CPU batched path and the CUDA
// kernels (common/elementwise*.{cpp,cu}). The linear layer's bias may be added here, the normalised row xhat is
// what the backward needs (the ReLU mask is xhat * gamma + beta > 0), and the activation may be written in
// another type (bf16 for the next layer's reduced-precision matmul). Reductions are vectorised on the CPU.
// Conversion of an activation to the storage type Y of the next matmul's input (overloaded for bf16 in
// common/mlp_tile.h with a vectorisable rounding).
template <typename Y, typename T>
SRN_HD Y to_storage(T v) {
  return static_cast<Y>(v);
}

// ReLU(xhat * gamma + beta); gamma/beta null = no affine.
template <typename T>
SRN_HD T ln_affine_relu(T xhat, const T* gamma, const T* beta, int k) {
  const T a = gamma ? xhat * gamma[k] + beta[k] : xhat;
  return a > T(0) ? a : T(0);
}

// The terms of the LayerNorm rows' sums (row_sum / row_sum2).
namespace ln_detail {
template <typename T>
struct Value {  // z[k]
  const T* z;
  SRN_HD T operator()(int64_t k) const { return z[k]; }
};
template <typename T>
struct AddBias {  // z[k] += bias[k], then z[k]
  T* z;
  const T* bias;
  SRN_HD T operator()(int64_t k) const { return z[k] += bias[k]; }
};
// (d, d^2) with d = z[k] - shift; with a bias, z[k] += bias[k] first. Two functors, not a `bias ?` per element: that
// select made GCC 12 mask every load and keep the sums on the stack.
template <typename T>
struct ShiftedMoments {
  const T* z;
  T shift;
  SRN_HD RowPair<T> operator()(int64_t k) const {
    const T d = z[k] - shift;
    return {d, d * d};
  }
};
template <typename T>
struct ShiftedMomentsAddBias {
  T* z;
  const T* bias;
  T shift;
  SRN_HD RowPair<T> operator()(int64_t k) const {
    const T d = (z[k] += bias[k]) - shift;
    return {d, d * d};
  }
};
template <typename T>
struct SquaredDeviation {  // (z[k] - mean)^2
  const T* z;
  T mean;
  SRN_HD T operator()(int64_t k) const {
    const T d = z[k] - mean;
    return d * d;
  }
};
// g = v_y[k] * gamma[k] where the ReLU passed (xhat * gamma + beta > 0), else 0; writes v_z[k] = g, gives (g, g xhat).
// The load and product come before the select: selecting `v_y[k]` itself made GCC 12 use a masked load and keep
// the sums in memory (a store-to-load chain through every iteration).
template <typename T>
struct MaskedGradAffine {
  const T *xhat, *v_y, *gamma, *beta;
  T* v_z;
  SRN_HD RowPair<T> operator()(int64_t k) const {
    const T xh = xhat[k], vg = v_y[k] * gamma[k];
    const T g = xh * gamma[k] + beta[k] > T(0) ? vg : T(0);
    v_z[k] = g;
    return {g, g * xh};
  }
};
template <typename T>
struct MaskedGrad {  // no affine: the ReLU mask is xhat > 0
  const T *xhat, *v_y;
  T* v_z;
  SRN_HD RowPair<T> operator()(int64_t k) const {
    const T xh = xhat[k], vy = v_y[k];
    const T g = xh > T(0) ? vy : T(0);
    v_z[k] = g;
    return {g, g * xh};
  }
};
}  // namespace ln_detail

// z: one row of n pre-activations without bias (bias may be null). Adds the bias in place, then writes
// xhat = (z - mean) * rstd to `xhat` (may be z itself, or null) and y = ReLU(xhat * gamma + beta) to `y`
// (may be z itself only when xhat is null or z). Returns rstd.
template <typename T, typename Y, typename Lanes = SerialLanes>
SRN_HD T layernorm_relu_row(T* z, int n, const T* bias, const T* gamma, const T* beta, T eps, T* xhat, Y* y) {
  using std::sqrt;
  T mean, var;
  if constexpr (SerialRow<Lanes>::value) {
    // one pass for both moments on the CPU (a pass over the row fewer: the rows' sums were ~15% of a bf16 march on
    // an AMX CPU), shifted by the row's first value so that the variance keeps its precision when the mean is large
    // against the spread: var = E[d^2] - E[d]^2 with d = z - z_0
    const T shift = z[0] + (bias ? bias[0] : T(0));
    const RowPair<T> m = bias ? row_sum2<T, Lanes>(n, ln_detail::ShiftedMomentsAddBias<T>{z, bias, shift})
                              : row_sum2<T, Lanes>(n, ln_detail::ShiftedMoments<T>{z, shift});
    const T md = m.a / T(n);
    mean = shift + md;
    var = m.b / T(n) - md * md;
    var = var > T(0) ? var : T(0);
  } else {  // lanes of a CUDA warp: two passes (z[0] is one lane's to update)
    const T sum = bias ? row_sum<T, Lanes>(n, ln_detail::AddBias<T>{z, bias})
                       : row_sum<T, Lanes>(n, ln_detail::Value<T>{z});
    mean = sum / T(n);
    var = row_sum<T, Lanes>(n, ln_detail::SquaredDeviation<T>{z, mean}) / T(n);
  }
  const T rstd = T(1) / sqrt(var + eps);
  if (xhat) {
    SRN_SIMD
    for (int k = Lanes::first(); k < n; k += Lanes::step()) {
      const T xh = (z[k] - mean) * rstd;
      xhat[k] = xh;
      y[k] = to_storage<Y>(ln_affine_relu(xh, gamma, beta, k));
    }
  } else {
    SRN_SIMD
    for (int k = Lanes::first(); k < n; k += Lanes::step()) y[k] = to_storage<Y>(ln_affine_relu((z[k] - mean) * rstd, gamma, beta, k));
  }
  return rstd;
}

// First part of layernorm_relu_row_vjp: the masked gradient g (the ReLU's) into v_z, the LayerNorm affine gradients
// accumulated, and the row means of g and g * xhat returned (the rest is v_z = rstd * (g - mean(g) - xhat *
// mean(g xhat))).
template <typename T, typename Lanes = SerialLanes>
SRN_HD RowPair<T> layernorm_relu_row_vjp_means(const T* xhat, const T* v_y, int n, const T* gamma, const T* beta,
                                               T* v_z, T* v_gamma, T* v_beta) {
  // Branch-free loops, one per case, so that the CPU compiler vectorises them (the ReLU mask is a select; loads and
  // products before it, see ln_detail::MaskedGradAffine).
  RowPair<T> sums;
  if (gamma) {
    if (v_gamma && v_beta) {
      SRN_SIMD
      for (int k = Lanes::first(); k < n; k += Lanes::step()) {
        const T xh = xhat[k], vy = v_y[k];
        const T m = xh * gamma[k] + beta[k] > T(0) ? vy : T(0);
        v_gamma[k] += m * xh;
        v_beta[k] += m;
      }
    } else if (v_gamma || v_beta) {
      for (int k = Lanes::first(); k < n; k += Lanes::step()) {
        const T xh = xhat[k];
        const T vy = xh * gamma[k] + beta[k] > T(0) ? v_y[k] : T(0);
        if (v_gamma) v_gamma[k] += vy * xh;
        if (v_beta) v_beta[k] += vy;
      }
    }
    sums = row_sum2<T, Lanes>(n, ln_detail::MaskedGradAffine<T>{xhat, v_y, gamma, beta, v_z});
  } else {
    sums = row_sum2<T, Lanes>(n, ln_detail::MaskedGrad<T>{xhat, v_y, v_z});
  }
  return {sums.a / T(n), sums.b / T(n)};
}

// VJP of layernorm_relu_row from its saved xhat and rstd. v_y: gradient of y; writes the gradient of the
// (biased) pre-activation z to v_z (may alias v_y); accumulates v_gamma / v_beta when non-null (affine only).
template <typename T, typename Lanes = SerialLanes>
SRN_HD void layernorm_relu_row_vjp(const T* xhat, const T* v_y, int n, T rstd, const T* gamma, const T* beta,
                                   T* v_z, T* v_gamma, T* v_beta) {
  const RowPair<T> m = layernorm_relu_row_vjp_means<T, Lanes>(xhat, v_y, n, gamma, beta, v_z, v_gamma, v_beta);
  const T mg = m.a, mgx = m.b;
  SRN_SIMD
  for (int k = Lanes::first(); k < n; k += Lanes::step()) v_z[k] = rstd * (v_z[k] - mg - xhat[k] * mgx);
}

// ---------------------------------------------------------------------------------------------
// Lifting a pixel to a world-space ray (reference geometry.world_from_xy_depth /
// get_ray_directions). c2w is a 3x4 row-major camera-to-world matrix (OpenCV camera).
//   p(z)  = c2w @ [(u - cx) / fx * z, (v - cy) / fy * z, z, 1]
//   dir   = normalise(p(1) - centre);   x0 = p(depth0)
template <typename T>
SRN_HD void lift_ray(T u, T v, T fx, T fy, T cx, T cy, const T* c2w, T depth0, T* x0, T* dir) {
  using std::sqrt;
  const T xc = (u - cx) / fx;
  const T yc = (v - cy) / fy;
  T d[3];
  for (int r = 0; r < 3; ++r) {
    d[r] = c2w[4 * r + 0] * xc + c2w[4 * r + 1] * yc + c2w[4 * r + 2];
  }
  const T norm = sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
  const T inv = T(1) / (norm > T(1e-12) ? norm : T(1e-12));  // as F.normalize(eps=1e-12)
  for (int r = 0; r < 3; ++r) {
    x0[r] = c2w[4 * r + 3] + depth0 * d[r];
    dir[r] = d[r] * inv;
  }
}

}  // namespace srn
