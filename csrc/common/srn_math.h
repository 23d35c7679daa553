// Per-element math of srn_fast, written once for the CPU loops and the CUDA kernels.
//
// Every forward function sits next to its vector-Jacobian product (suffix `_vjp`); gradients carry
// the prefix `v_`. Nothing here includes torch or CUDA headers, so `.cu` files can include it.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SRN_HD __host__ __device__ __forceinline__
#define SRN_SIMD_SUM(...)
#else
#define SRN_HD inline
// Lets the compiler vectorise a sum (reassociating it) in the CPU loops; OpenMP SIMD, no threads.
#define SRN_SIMD_SUM(...) _Pragma(SRN_STR(omp simd reduction(+ : __VA_ARGS__)))
#define SRN_STR(x) #x
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

// ---------------------------------------------------------------------------------------------
// LayerNorm (biased variance, eps inside the square root, as torch.nn.LayerNorm) + optional affine
// + ReLU over one row of n values. `x` holds the pre-normalisation row; the normalised value xhat
// is written to `xhat` (may alias x), the activation to `y`. gamma/beta may be null (no affine).
template <typename T>
SRN_HD void layernorm_stats(const T* x, int n, T eps, T& mean, T& rstd) {
  using std::sqrt;
  T s = T(0);
  SRN_SIMD_SUM(s)
  for (int k = 0; k < n; ++k) s += x[k];
  mean = s / T(n);
  T v = T(0);
  SRN_SIMD_SUM(v)
  for (int k = 0; k < n; ++k) {
    const T d = x[k] - mean;
    v += d * d;
  }
  rstd = T(1) / sqrt(v / T(n) + eps);
}

template <typename T>
SRN_HD T ln_relu_elem(T x, T mean, T rstd, T gamma, T beta) {
  const T a = (x - mean) * rstd * gamma + beta;
  return a > T(0) ? a : T(0);
}

// VJP of LayerNorm + affine + ReLU over one row.
//   xhat: normalised row; y: the ReLU output (the mask is y > 0); v_y: incoming gradient.
//   Writes v_x (may alias v_y); accumulates v_gamma / v_beta when non-null.
template <typename T>
SRN_HD void ln_relu_row_vjp(const T* xhat, const T* y, const T* v_y, int n, T rstd,
                            const T* gamma, T* v_x, T* v_gamma, T* v_beta) {
  // g_k = d loss / d xhat_k
  T sum_g = T(0), sum_gx = T(0);
  SRN_SIMD_SUM(sum_g, sum_gx)
  for (int k = 0; k < n; ++k) {
    const T vy = y[k] > T(0) ? v_y[k] : T(0);
    if (v_gamma) v_gamma[k] += vy * xhat[k];
    if (v_beta) v_beta[k] += vy;
    const T g = gamma ? vy * gamma[k] : vy;
    sum_g += g;
    sum_gx += g * xhat[k];
  }
  const T inv_n = T(1) / T(n);
  for (int k = 0; k < n; ++k) {
    const T vy = y[k] > T(0) ? v_y[k] : T(0);
    const T g = gamma ? vy * gamma[k] : vy;
    v_x[k] = rstd * (g - inv_n * sum_g - xhat[k] * inv_n * sum_gx);
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm + ReLU rows in the form the fused MLP's CPU tiles use (csrc/common/mlp_tile.h): the linear
// layer's bias is added here, the normalised row xhat is kept (it is all the backward needs: the ReLU mask
// is xhat * gamma + beta > 0), and the activation may be written in another type (bf16 for the next
// layer's reduced-precision matmul). Reductions are vectorised on the CPU (omp simd).
#if !defined(__CUDACC__) && defined(_OPENMP)
#define SRN_PRAGMA(x) _Pragma(#x)
#define SRN_SIMD_SUM(...) SRN_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define SRN_SIMD _Pragma("omp simd")
#else
#define SRN_SIMD_SUM(...)
#define SRN_SIMD
#endif

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

// z: one row of n pre-activations without bias (bias may be null). Adds the bias in place, then writes
// xhat = (z - mean) * rstd to `xhat` (may be z itself, or null) and y = ReLU(xhat * gamma + beta) to `y`
// (may be z itself only when xhat is null or z). Returns rstd.
template <typename T, typename Y>
SRN_HD T layernorm_relu_row(T* z, int n, const T* bias, const T* gamma, const T* beta, T eps, T* xhat, Y* y) {
  using std::sqrt;
  T s = T(0);
  if (bias) {
    SRN_SIMD_SUM(s)
    for (int k = 0; k < n; ++k) {
      z[k] += bias[k];
      s += z[k];
    }
  } else {
    SRN_SIMD_SUM(s)
    for (int k = 0; k < n; ++k) s += z[k];
  }
  const T mean = s / T(n);
  T v = T(0);
  SRN_SIMD_SUM(v)
  for (int k = 0; k < n; ++k) v += (z[k] - mean) * (z[k] - mean);
  const T rstd = T(1) / sqrt(v / T(n) + eps);
  if (xhat) {
    SRN_SIMD
    for (int k = 0; k < n; ++k) {
      const T xh = (z[k] - mean) * rstd;
      xhat[k] = xh;
      y[k] = to_storage<Y>(ln_affine_relu(xh, gamma, beta, k));
    }
  } else {
    SRN_SIMD
    for (int k = 0; k < n; ++k) y[k] = to_storage<Y>(ln_affine_relu((z[k] - mean) * rstd, gamma, beta, k));
  }
  return rstd;
}

// VJP of layernorm_relu_row from its saved xhat and rstd. v_y: gradient of y; writes the gradient of the
// (biased) pre-activation z to v_z (may alias v_y); accumulates v_gamma / v_beta when non-null (affine only).
template <typename T>
SRN_HD void layernorm_relu_row_vjp(const T* xhat, const T* v_y, int n, T rstd, const T* gamma, const T* beta,
                                   T* v_z, T* v_gamma, T* v_beta) {
  // Branch-free loops, one per case, so that the CPU compiler vectorises them (the ReLU mask is a select).
  T sum_g = T(0), sum_gx = T(0);
  if (gamma) {
    if (v_gamma || v_beta) {
      for (int k = 0; k < n; ++k) {
        const T xh = xhat[k];
        const T vy = xh * gamma[k] + beta[k] > T(0) ? v_y[k] : T(0);
        if (v_gamma) v_gamma[k] += vy * xh;
        if (v_beta) v_beta[k] += vy;
      }
    }
    SRN_SIMD_SUM(sum_g, sum_gx)
    for (int k = 0; k < n; ++k) {
      const T xh = xhat[k];
      const T g = xh * gamma[k] + beta[k] > T(0) ? v_y[k] * gamma[k] : T(0);
      v_z[k] = g;
      sum_g += g;
      sum_gx += g * xh;
    }
  } else {
    SRN_SIMD_SUM(sum_g, sum_gx)
    for (int k = 0; k < n; ++k) {
      const T xh = xhat[k];
      const T g = xh > T(0) ? v_y[k] : T(0);
      v_z[k] = g;
      sum_g += g;
      sum_gx += g * xh;
    }
  }
  const T mg = sum_g / T(n), mgx = sum_gx / T(n);
  SRN_SIMD
  for (int k = 0; k < n; ++k) v_z[k] = rstd * (v_z[k] - mg - xhat[k] * mgx);
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
