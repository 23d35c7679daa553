// Forward and backward of a small MLP (Linear -> LayerNorm (+affine) -> ReLU per layer, last layer optionally
// plain linear) on one tile of rays, shared by the fused MLP op (csrc/mlp) and the fused march (csrc/march),
// on the CPU and on CUDA.
//
// A tile is S scenes x R rows. On the CPU a tile is S = 1 scene and R ~ 128 rays that stay in cache for every
// layer (the op loops over tiles in parallel); on CUDA one "tile" is the whole batch (S = B, R = N) and every
// matmul is a strided-batched GEMM. Matmuls go through ATen (MKL/oneDNN on the CPU, cuBLAS on CUDA); the
// LayerNorm/ReLU stages are the fused element-wise kernels of elementwise.h.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/aligned.h"
#include "common/cpu_gemm.h"
#include "common/srn_math.h"
#include "common/thin_gemm.h"

namespace srn {

struct MLPWeights {
  std::vector<at::Tensor> W;      // per layer: [S, C_out, C_in] per scene, or [C_out, C_in] shared
  std::vector<at::Tensor> W_mm;   // the same weights in the matmul dtype (e.g. bf16); same as W when none
  std::vector<at::Tensor> W_wide; // CPU bf16 layers on the "widened" route (cpu_gemm.h): W_mm widened to float32
                                  // once per op call, so the tile GEMMs widen only their activations; else undefined
  std::vector<at::Tensor> W_pk;   // CPU bf16 layers on the "avx512bf16" / "amx" routes: int32 [S or 1, words] per
                                  // scene, W_mm packed once per op call for the forward (op(B) = W^T) then for the
                                  // input gradient (op(B) = W), the directions the call reads (PackDirs); else
                                  // undefined
  std::vector<at::Tensor> b;      // [S, C_out] or [C_out]
  std::vector<at::Tensor> gamma;  // [C_out] LayerNorm weight, or undefined (no affine / no norm)
  std::vector<at::Tensor> beta;   // [C_out] LayerNorm bias, or undefined
  std::vector<bool> norm;         // false: plain linear layer

  size_t size() const { return W.size(); }
  bool per_scene(size_t l) const { return W[l].dim() == 3; }
};

// Gradient accumulators shaped like MLPWeights' tensors; undefined = not needed.
struct MLPGrads {
  std::vector<at::Tensor> W, b, gamma, beta;
};

// x [S, R, C_0] -> output [S, R, C_L]. If zs is given it receives every layer's pre-norm activation z_l
// [S, R, C_l]; if ys is given it receives every layer's output (the next layer's input) [S, R, C_l].
at::Tensor mlp_tile_forward(const MLPWeights& w, const at::Tensor& x, std::vector<at::Tensor>* zs = nullptr,
                            std::vector<at::Tensor>* ys = nullptr);

// Backward of mlp_tile_forward given its zs (and ys, or an empty vector to recompute them from zs).
// v_out [S, R, C_L]. Adds the weight/bias/LayerNorm-affine gradients into the defined entries of g.
// Returns the gradient of x [S, R, C_0] when need_vx, else an undefined tensor.
at::Tensor mlp_tile_backward(const MLPWeights& w, const at::Tensor& x, const std::vector<at::Tensor>& zs,
                             const std::vector<at::Tensor>& ys, const at::Tensor& v_out, MLPGrads& g, bool need_vx);

// Which packed copies of the bf16 weights (MLPWeights::W_pk) an op call reads: the forward's (tile::forward) and / or
// the input gradient's (tile::backward). A direction not asked for is left unwritten.
enum PackDirs : int { kPackFwd = 1, kPackBwd = 2, kPackBoth = 3 };

// Builds MLPWeights from the op arguments, checking shapes, dtypes and devices (messages name the argument).
// tiles: the CPU tile loops will run (not the batched path): only they read W_wide / W_pk, so only then are the
// bf16 weights prepared for the route in use, with the packed directions in `pack` (PackDirs).
MLPWeights make_mlp_weights(const char* op, const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                            const std::vector<c10::optional<at::Tensor>>& gamma,
                            const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                            const at::Tensor& x_like, int64_t B, int64_t C_in, int64_t mm_dtype, bool tiles,
                            int pack = kPackBoth);

}  // namespace srn

// =============================================================================================================
// CPU tile routines on raw pointers (namespace srn::tile). Used by the fused MLP op's CPU path (csrc/mlp) and
// meant for the fused march (csrc/march), which evaluates phi inside its own tile loop: keep this interface
// stable. One call handles one scene's weights on a tile of R rays (R ~ 64-256, so that activations and weights
// stay in L2) and runs every layer before returning; the caller parallelises over tiles (at::parallel_for) and
// gives each thread its own Workspace and gradient accumulators. T = float or double. Matmuls go through
// csrc/common/cpu_gemm.h (MKL when torch exports it, else ATen); LayerNorm/ReLU through srn_math.h.
//
// Saved activations ("act"): per layer l < L - 1 (and for the last layer when it has a LayerNorm) a row-major
// [R, cout_l] block: xhat_l (the normalised pre-activation) for norm layers, the output itself for plain linear
// layers; plus rstd_l [R] for norm layers. A norm layer's xhat may be kept in bf16 instead (act_mm[l] non-null, act[l]
// then unused): a bf16 phi's store mode, where those rows go to memory and back, keeps half the bytes. forward()
// fills them when given; backward() needs them (from a stored forward, or recompute them into
// Workspace::act()/rstd() by calling forward() first: that is the march's "recompute" mode).
// =============================================================================================================
namespace srn {

// float -> bf16 with round-to-nearest-even on the bits (NaN handling aside, as c10::BFloat16), written so
// that the compiler vectorises the conversion loops (c10's constructor does not).
template <>
inline c10::BFloat16 to_storage<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}
template <>
inline c10::BFloat16 to_storage<c10::BFloat16, double>(double v) {
  return to_storage<c10::BFloat16, float>(static_cast<float>(v));
}

namespace tile {

constexpr double kLayerNormEps = 1e-5;

// One layer, one scene. Shapes are per scene.
template <typename T>
struct Layer {
  const T* weight = nullptr;                  // [cout, cin] row-major
  const T* bias = nullptr;                    // [cout]
  const T* ln_weight = nullptr;               // [cout] LayerNorm gamma, or nullptr (no affine)
  const T* ln_bias = nullptr;                 // [cout] LayerNorm beta (given together with ln_weight)
  const c10::BFloat16* weight_mm = nullptr;   // [cout, cin] bf16 copy of weight: this layer's matmuls then run
                                              // in bf16 with float32 accumulation (T = float only); else nullptr
  const float* weight_wide = nullptr;         // [cout, cin] weight_mm widened to float32 (the "widened" bf16
                                              // route), or nullptr
  const uint32_t* weight_pk_fwd = nullptr;    // weight_mm^T [cin, cout] packed for the "avx512bf16" route
  const uint32_t* weight_pk_bwd = nullptr;    // weight_mm [cout, cin] packed likewise (input gradient), or nullptr
  int64_t cin = 0, cout = 0;
  bool norm = true;                           // false: plain linear layer
};

// Gradient accumulators of one layer (added into, +=); nullptr where not needed.
template <typename T>
struct LayerGrad {
  T* weight = nullptr;     // [cout, cin]
  T* bias = nullptr;       // [cout]
  T* ln_weight = nullptr;  // [cout]
  T* ln_bias = nullptr;    // [cout]
};

// Per-thread scratch for up to R rays: reuse it across tiles. With `with_act`, it also holds storage for the
// saved activations (act(l), rstd(l)) for recompute-style backward.
template <typename T>
class Workspace {
 public:
  Workspace(const Layer<T>* layers, int L, int64_t R, bool with_act, bool with_zip = false) : R_(R) {
    int64_t cmax = 1;
    for (int l = 0; l < L; ++l) cmax = std::max({cmax, layers[l].cin, layers[l].cout});
    // every buffer (and, for widths of a multiple of 16, every row) on a cache line: aligned.h
    const int64_t n = line_multiple<c10::BFloat16>(std::max<int64_t>(R, 1) * cmax);
    f_.assign(3 * n + 2 * line_multiple<c10::BFloat16>(cmax), T(0));
    h_.assign(3 * n, c10::BFloat16(0.f));
    for (int k = 0; k < 4; ++k) fp_[k] = f_.data() + k * n;
    for (int k = 0; k < 3; ++k) hp_[k] = h_.data() + k * n;
    TORCH_INTERNAL_ASSERT(is_line_aligned(fp_[1]) && is_line_aligned(fp_[2]) && is_line_aligned(hp_[1]),
                          "srn_fast: tile workspace buffers off cache lines");
    if (with_zip) {  // 3 k-pair panel buffers of R rows x max channels (cpu::RowZip)
      const int64_t words = line_multiple<uint32_t>(cpu::amx_kp_stride(R) * ((cmax + 31) / 32 * 32));
      zip_.assign(3 * words, 0u);
      for (int k = 0; k < 3; ++k) zp_[k] = zip_.data() + k * words;
    }
    if (with_act) {
      int64_t total = 0;
      for (int l = 0; l < L; ++l) total += line_multiple<T>(R * layers[l].cout) + line_multiple<T>(R);
      act_store_.assign(std::max<int64_t>(total, 1), T(0));
      T* p = act_store_.data();
      for (int l = 0; l < L; ++l) {
        act_.push_back(p);
        p += line_multiple<T>(R * layers[l].cout);
      }
      for (int l = 0; l < L; ++l) {
        rstd_.push_back(p);
        p += line_multiple<T>(R);
      }
    }
  }
  int64_t rows() const { return R_; }
  T* buf(int k) { return fp_[k]; }                  // 3 float buffers of R * max channels
  T* row() { return fp_[3]; }                        // two float rows of max channels (bf16 saved rows widened)
  c10::BFloat16* buf_mm(int k) { return hp_[k]; }  // 3 bf16 buffers of R * max channels
  uint32_t* zip(int k) { return zp_[k]; }             // 3 k-pair panel buffers (with_zip), else null
  T* const* act() { return act_.empty() ? nullptr : act_.data(); }
  T* const* rstd() { return rstd_.empty() ? nullptr : rstd_.data(); }

 private:
  int64_t R_;
  aligned_vector<T> f_, act_store_;
  aligned_vector<c10::BFloat16> h_;
  aligned_vector<uint32_t> zip_;
  T* fp_[4];
  c10::BFloat16* hp_[3];
  uint32_t* zp_[3] = {nullptr, nullptr, nullptr};
  std::vector<T*> act_, rstd_;
};

namespace detail {

template <typename T>
void to_bf16(const T* src, int64_t ld_src, int64_t R, int64_t C, c10::BFloat16* dst) {
  for (int64_t r = 0; r < R; ++r) {
    const T* s = src + r * ld_src;
    c10::BFloat16* d = dst + r * C;
    SRN_SIMD
    for (int64_t k = 0; k < C; ++k) d[k] = to_storage<c10::BFloat16, T>(s[k]);
  }
}

// A bf16 row [n] widened to T (exactly): a saved bf16 xhat row for code that reads float rows.
template <typename T>
void from_bf16(const c10::BFloat16* src, int64_t n, T* dst) {
  SRN_SIMD
  for (int64_t k = 0; k < n; ++k) dst[k] = T(static_cast<float>(src[k]));
}

// bf16 GEMM of the tile loops. B prepared once per op call for the route in use, or nullptr: B_wide widened to
// float32 (Layer::weight_wide), B_pk packed for "avx512bf16" (Layer::weight_pk_fwd / _bwd). side: lines to ask
// for on the way (packed B only: cpu::gemm_bf16_packed).
inline void gemm_mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                    const c10::BFloat16* B, int64_t ldb, double beta, double* C, int64_t ldc,
                    const float* B_wide = nullptr, const uint32_t* B_pk = nullptr, Trickle* = nullptr) {
  TORCH_CHECK(false, "srn_fast: bf16 matmuls need float32 tensors");
}
inline void gemm_mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                    const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc,
                    const float* B_wide = nullptr, const uint32_t* B_pk = nullptr, Trickle* side = nullptr) {
  if (B_pk) return cpu::gemm_bf16_packed(ta, M, N, K, A, lda, B_pk, beta, C, ldc, side);
  if (B_wide) return cpu::gemm_widened(ta, tb, M, N, K, A, lda, B_wide, ldb, beta, C, ldc);
  cpu::gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

// acc [n] += the sum of the R rows of v [R, n] (row stride ld), four rows a pass (one accumulator load and store
// per four rows: a row at a time, that read-modify-write was the loop's cost).
template <typename T>
void add_row_sums(const T* v, int64_t R, int64_t n, int64_t ld, T* acc) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const T *v0 = v + r * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) acc[k] += (v0[k] + v1[k]) + (v2[k] + v3[k]);
  }
  for (; r < R; ++r) {
    const T* vr = v + r * ld;
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) acc[k] += vr[k];
  }
}

// The end of the LayerNorm+ReLU VJP of a bf16 layer's row: v_z = rstd (g - mg - xhat mgx) (g: the masked gradient,
// mg / mgx: layernorm_relu_row_vjp_means) straight to bf16, the matmuls' input, and into the bias gradient when
// given: one pass where a float v_z row, the bias loop and the bf16 conversion took three.
template <typename T>
void vjp_row_to_bf16(const T* g, const T* xhat, int64_t n, T rstd, RowPair<T> means, c10::BFloat16* out,
                     T* v_bias) {
  const T mg = means.a, mgx = means.b;
  if (v_bias) {
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) {
      const T v = rstd * (g[k] - mg - xhat[k] * mgx);
      out[k] = to_storage<c10::BFloat16, T>(v);
      v_bias[k] += v;
    }
  } else {
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) out[k] = to_storage<c10::BFloat16, T>(rstd * (g[k] - mg - xhat[k] * mgx));
  }
}

// A layer's output ReLU(xhat * gamma + beta) (gamma null: no affine) rebuilt from its saved xhat, straight to bf16
// (the next layer's weight-gradient input); one loop per case, so that each vectorises.
template <typename T>
void act_row_to_bf16(const T* xhat, int64_t n, const T* gamma, const T* beta, c10::BFloat16* out) {
  if (gamma) {
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) {
      const T a = xhat[k] * gamma[k] + beta[k];
      out[k] = to_storage<c10::BFloat16, T>(a > T(0) ? a : T(0));
    }
  } else {
    SRN_SIMD
    for (int64_t k = 0; k < n; ++k) out[k] = to_storage<c10::BFloat16, T>(xhat[k] > T(0) ? xhat[k] : T(0));
  }
}

// A norm layer's output ReLU(xhat gamma + beta) into out [n] as T (for a float product) from its saved xhat row: xf
// (T), or xm (bf16: widened into out first, transformed in place); `fast` (float, the AVX-512 rows on, n a multiple of
// 16): in one AVX-512 pass (cpu::layernorm_relu_act_row_avx512).
template <typename T>
void act_row(const T* xf, const c10::BFloat16* xm, int64_t n, const T* gamma, const T* beta, bool fast, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (fast) return cpu::layernorm_relu_act_row_avx512(xm ? nullptr : xf, xm, n, gamma, beta, out);
  }
  if (xm) from_bf16(xm, n, out);
  const T* a = xm ? out : xf;
  SRN_SIMD
  for (int64_t k = 0; k < n; ++k) out[k] = ln_affine_relu<T>(a[k], gamma, beta, int(k));
}

}  // namespace detail

// Forward of L layers on R rays.
//   x   [R, cin_0], row stride ldx;   out [R, cout_{L-1}], row stride ldo (written).
//   act, rstd: arrays of L pointers (see "Saved activations" above) to fill, or nullptr to keep nothing.
//   stream_act: act is kept for a backward that comes after the whole forward (store mode), not read again while
//   this tile is in cache: a norm layer's pre-activation then stays in the workspace (L2) and the AVX-512 rows
//   write xhat to act with non-temporal stores (no read-for-ownership of the cold lines, nothing evicted for
//   them). A bf16 phi's store-mode forward on the AMX Xeon went from 10.2 to 7.2 ms (B = 2, N = 8192).
//   act_mm: null, or L pointers: a norm layer's xhat kept as bf16 where non-null (see "Saved activations").
template <typename T>
void forward(const Layer<T>* layers, int L, int64_t R, const T* x, int64_t ldx, T* out, int64_t ldo,
             T* const* act, T* const* rstd, Workspace<T>& ws, bool stream_act = false,
             c10::BFloat16* const* act_mm = nullptr) {
  if (R <= 0) return;
  const T eps = T(kLayerNormEps);
  const T* in = x;          // this layer's input (float) ...
  int64_t ld_in = ldx;
  const c10::BFloat16* in_mm = nullptr;  // ... or its bf16 copy when the previous layer wrote one
  int spare = 0;            // float buffer not holding `in`
  // the AVX-512 LayerNorm rows (csrc/common/layernorm_avx512.cpp): float only
  const bool fast_ln = std::is_same_v<T, float> && cpu::avx512_rows();
  for (int l = 0; l < L; ++l) {
    const Layer<T>& ly = layers[l];
    const bool last = l == L - 1;
    const int64_t ci = ly.cin, co = ly.cout;
    const bool next_mm = !last && layers[l + 1].weight_mm != nullptr;
    c10::BFloat16* const xm = act_mm ? act_mm[l] : nullptr;  // this layer's xhat kept as bf16 ...
    T* const xf = act && !xm ? act[l] : nullptr;              // ... or as T (or not kept)
    // the generic rows' xhat row r: the saved row, or the scratch row (narrowed into xm by keep_row)
    auto xhat_out = [&](int64_t r) { return xm ? ws.row() : (xf ? xf + r * co : nullptr); };
    auto keep_row = [&](int64_t r) {
      if (xm) detail::to_bf16(ws.row(), co, 1, co, xm + r * co);
    };
    if (fast_ln && ly.norm && !ly.weight_mm && in && ci <= cpu::kThin && co % 16 == 0) {
      // a thin float layer (phi's input layer): the AVX-512 rows compute z = x W^T + b themselves, no GEMM
      if constexpr (std::is_same_v<T, float>) {
        c10::BFloat16* y_mm = next_mm ? ws.buf_mm(1) : nullptr;
        T* y = next_mm ? nullptr : (last ? out : ws.buf(spare));
        const int64_t ldy = last && !next_mm ? ldo : co;
        cpu::layernorm_relu_rows_thin_avx512(in, ld_in, ci, ly.weight, R, co, ly.bias, ly.ln_weight, ly.ln_bias, eps,
                                             xf, xm, co, y, y_mm, ldy, rstd ? rstd[l] : nullptr, stream_act);
        in_mm = y_mm;
        in = y, ld_in = ldy;
        if (y == ws.buf(spare)) spare = 1 - spare;
      }
      continue;
    }
    T* z;
    int64_t ldz = co;
    if (last && !ly.norm) {
      z = out, ldz = ldo;
    } else if (act && !ly.norm) {  // a plain layer's saved activation is its output
      z = act[l];
    } else {  // a norm layer's pre-activation: the LayerNorm rows below write xhat to act[l]
      z = ws.buf(spare);
    }
    if (ly.weight_mm) {
      if (!in_mm) {
        detail::to_bf16(in, ld_in, R, ci, ws.buf_mm(0));
        in_mm = ws.buf_mm(0);
      }
      detail::gemm_mm(false, true, R, co, ci, in_mm, ci, ly.weight_mm, ci, T(0), z, ldz, ly.weight_wide,
                      ly.weight_pk_fwd);
    } else {
      cpu::gemm(false, true, R, co, ci, in, ld_in, ly.weight, ci, T(0), z, ldz);
    }
    in_mm = nullptr;
    if (!ly.norm) {
      for (int64_t r = 0; r < R; ++r) {
        T* zr = z + r * ldz;
        SRN_SIMD
        for (int64_t k = 0; k < co; ++k) zr[k] += ly.bias[k];
      }
      in = z, ld_in = ldz;
      if (z == ws.buf(spare)) spare = 1 - spare;
      continue;
    }
    const bool fast_rows = fast_ln && co % 16 == 0;
    if (next_mm) {  // the next layer reads bf16: write the activation as bf16 directly
      c10::BFloat16* y = ws.buf_mm(1);
      if (fast_rows) {
        if constexpr (std::is_same_v<T, float>) {
          cpu::layernorm_relu_rows_avx512(z, R, ldz, co, ly.bias, ly.ln_weight, ly.ln_bias, eps, xf, xm, co, nullptr,
                                          y, co, rstd ? rstd[l] : nullptr, stream_act);
        }
        in_mm = y;
        in = nullptr;
        continue;
      }
      for (int64_t r = 0; r < R; ++r) {
        const T rs = layernorm_relu_row<T, c10::BFloat16>(z + r * ldz, int(co), ly.bias, ly.ln_weight, ly.ln_bias,
                                                          eps, xhat_out(r), y + r * co);
        keep_row(r);
        if (rstd) rstd[l][r] = rs;
      }
      in_mm = y;
      in = nullptr;
      continue;
    }
    // float activation: into `out` (last layer), else in place (z is the spare buffer)
    T* y = last ? out : z;
    const int64_t ldy = last ? ldo : co;
    if (fast_rows) {
      if constexpr (std::is_same_v<T, float>) {
        cpu::layernorm_relu_rows_avx512(z, R, ldz, co, ly.bias, ly.ln_weight, ly.ln_bias, eps, xf, xm, co, y, nullptr,
                                        ldy, rstd ? rstd[l] : nullptr, stream_act);
      }
    } else {
      for (int64_t r = 0; r < R; ++r) {
        const T rs = layernorm_relu_row<T, T>(z + r * ldz, int(co), ly.bias, ly.ln_weight, ly.ln_bias, eps,
                                              xhat_out(r), y + r * ldy);
        keep_row(r);
        if (rstd) rstd[l][r] = rs;
      }
    }
    in = y, ld_in = ldy;
    if (y == ws.buf(spare)) spare = 1 - spare;
  }
}

// Backward of forward() on the same tile.
//   x [R, cin_0] (ldx); act, rstd: the saved activations of forward() (required).
//   v_out [R, cout_{L-1}] (ldv): gradient of the output.
//   v_x [R, cin_0] (ldvx): gradient of x, written (or added when accumulate_vx); nullptr = not needed.
//   grads: L accumulators (+=); entries may be null.
//   act_mm: null, or L pointers: a norm layer's xhat kept as bf16 where non-null (as forward() was given it).
//   after (or null): lines the caller reads next, asked for during layer 1's weight gradient where it is the last
//   bf16 product (the zipped route); each bf16 input gradient likewise asks for the saved rows of the layer below it.
template <typename T>
void backward(const Layer<T>* layers, int L, int64_t R, const T* x, int64_t ldx, const T* const* act,
              const T* const* rstd, const T* v_out, int64_t ldv, T* v_x, int64_t ldvx, bool accumulate_vx,
              const LayerGrad<T>* grads, Workspace<T>& ws, const c10::BFloat16* const* act_mm = nullptr,
              Trickle* after = nullptr) {
  if (R <= 0) return;
  auto xm_of = [&](int l) -> const c10::BFloat16* { return act_mm ? act_mm[l] : nullptr; };
  // layer l's saved row r (c wide) as T: the saved row, or its bf16 copy widened into the scratch row
  auto saved_row = [&](int l, int64_t r, int64_t c) -> const T* {
    const c10::BFloat16* h = xm_of(l);
    if (!h) return act[l] + r * c;
    detail::from_bf16(h + r * c, c, ws.row());
    return ws.row();
  };
  int cur = 0;  // ws.buf(cur) holds v_z of the current layer; buf(1 - cur) receives the gradient of its input
  // the AVX-512 LayerNorm rows (csrc/common/layernorm_avx512.cpp): float only
  const bool fast_ln = std::is_same_v<T, float> && cpu::avx512_rows();
  T* a_buf = ws.buf(2);
  const T* v = v_out;
  int64_t ld_v = ldv;
  // the AVX-512 VJP of layer l (below) writes layer l's output as bf16 on the way when layer l + 1's weight gradient
  // waits for it (`pending`): one pass over the saved xhat where a separate rebuild took two
  auto fast_vjp_of = [&](int l) { return layers[l].norm && fast_ln && layers[l].cout % 16 == 0; };
  auto defers = [&](int l) { return grads[l].weight && layers[l].weight_mm && l > 0 && fast_vjp_of(l - 1); };
  // and with a workspace that has k-pair panels (the AMX and AVX512-BF16 routes), the VJP rows write a waiting
  // layer's v_z and the output below it straight into them too: the weight gradient packs nothing
  // (cpu::gemm_bf16_zipped_at; on AMX it transposes one of them)
  const bool zip = std::is_same_v<T, float> && ws.zip(0) != nullptr;
  const int64_t kps = zip ? cpu::amx_kp_stride(R) : 0;
  auto zero_pad = [&](uint32_t* panels, int64_t cols) {  // the k-pairs past R (and the missing row of an odd R)
    if (R == 2 * kps) return;
    for (int64_t p = 0; p < (cols + 31) / 32; ++p) {
      std::fill(panels + (p * kps + R / 2) * 32, panels + (p + 1) * kps * 32, 0u);
    }
  };
  int pending = -1;
  bool pending_zip = false;  // the pending layer's v_z is in its panels (and the output below goes to ws.zip(0))
  for (int l = L - 1; l >= 0; --l) {
    const Layer<T>& ly = layers[l];
    const LayerGrad<T>& g = grads[l];
    const int64_t ci = ly.cin, co = ly.cout;
    T* vz = ws.buf(cur);
    c10::BFloat16* vz_mm = ws.buf_mm(1 + (l & 1));  // alternating: a pending layer's v_z outlives the next VJP
    c10::BFloat16* a_out = pending >= 0 && !pending_zip ? ws.buf_mm(0) : nullptr;
    // a bf16 layer with LayerNorm: its VJP writes v_z as bf16 and the bias gradient directly (detail::vjp_row_to_bf16)
    const bool vz_in_mm = ly.norm && ly.weight_mm;
    // gradient of the (biased) pre-activation z_l
    const bool fast_vjp = fast_vjp_of(l);  // the AVX-512 row adds the bias gradient itself
    if (fast_vjp) {
      if constexpr (std::is_same_v<T, float>) {
        const c10::BFloat16* xm = xm_of(l);
        cpu::RowZip rz;
        rz.kp_stride = kps;
        if (zip && vz_in_mm && defers(l)) {
          rz.v_z = ws.zip(1 + (l & 1));
          zero_pad(rz.v_z, co);
        }
        if (pending_zip) {
          rz.y = ws.zip(0);
          zero_pad(rz.y, co);
        }
        const cpu::RowZip* rzp = rz.v_z || rz.y ? &rz : nullptr;
        int64_t r = 0;
        // the saved xhat rows come from memory: asked for kAhead rows before they are read (prefetch_span)
        constexpr int64_t kAhead = 6;
        const char* saved = xm ? reinterpret_cast<const char*>(xm) : reinterpret_cast<const char*>(act[l]);
        const int64_t row_bytes = co * int64_t(xm ? sizeof(c10::BFloat16) : sizeof(T));
        if (vz_in_mm) {  // two rows at a time (the tail row below)
          for (; r + 2 <= R; r += 2) {
            if (r + kAhead + 2 <= R) prefetch_span(saved + (r + kAhead) * row_bytes, 2 * row_bytes);
            rz.row = r;
            cpu::layernorm_relu_rows2_vjp_avx512(xm ? nullptr : act[l] + r * co, xm ? xm + r * co : nullptr, co,
                                                 v + r * ld_v, ld_v, co, rstd[l] + r, ly.ln_weight, ly.ln_bias,
                                                 ws.row(), g.ln_weight, g.ln_bias, vz_mm + r * co, g.bias,
                                                 a_out ? a_out + r * co : nullptr, rzp);
          }
        }
        for (; r < R; ++r) {
          if (r + kAhead < R) prefetch_span(saved + (r + kAhead) * row_bytes, row_bytes);
          rz.row = r;
          // with v_z written as bf16 the float row is scratch: one row, not R rows of the tile's footprint in L2
          cpu::layernorm_relu_row_vjp_avx512(xm ? nullptr : act[l] + r * co, xm ? xm + r * co : nullptr, v + r * ld_v,
                                             co, rstd[l][r], ly.ln_weight, ly.ln_bias,
                                             vz_in_mm ? ws.row() : vz + r * co, g.ln_weight, g.ln_bias,
                                             vz_in_mm ? vz_mm + r * co : nullptr, g.bias,
                                             a_out ? a_out + r * co : nullptr, rzp);
        }
      }
    } else if (vz_in_mm) {
      for (int64_t r = 0; r < R; ++r) {
        const T* xh = saved_row(l, r, co);
        const RowPair<T> m = layernorm_relu_row_vjp_means<T>(xh, v + r * ld_v, int(co), ly.ln_weight, ly.ln_bias,
                                                             vz + r * co, g.ln_weight, g.ln_bias);
        detail::vjp_row_to_bf16(vz + r * co, xh, co, rstd[l][r], m, vz_mm + r * co, g.bias);
      }
    } else if (ly.norm) {
      for (int64_t r = 0; r < R; ++r) {
        layernorm_relu_row_vjp<T>(saved_row(l, r, co), v + r * ld_v, int(co), rstd[l][r], ly.ln_weight, ly.ln_bias,
                                  vz + r * co, g.ln_weight, g.ln_bias);
      }
    } else if (v != vz || ld_v != co) {
      for (int64_t r = 0; r < R; ++r) std::memcpy(vz + r * co, v + r * ld_v, sizeof(T) * co);
    }
    if (pending >= 0) {  // layer l + 1's weight gradient, its input now in a_out (or in ws.zip(0))
      const Layer<T>& p = layers[pending];
      if (pending_zip) {
        if constexpr (std::is_same_v<T, float>) {
          cpu::gemm_bf16_zipped_at(p.cout, p.cin, R, ws.zip(1 + (pending & 1)), ws.zip(0), 1.f, grads[pending].weight,
                                   p.cin, l == 0 ? after : nullptr);
        }
      } else {
        detail::gemm_mm(true, false, p.cout, p.cin, R, ws.buf_mm(1 + (pending & 1)), p.cout, a_out, p.cin, T(1),
                        grads[pending].weight, p.cin);
      }
      pending = -1;
      pending_zip = false;
    }
    if (g.bias && !vz_in_mm && !fast_vjp) detail::add_row_sums(vz, R, co, co, g.bias);
    const bool need_prev = l > 0 || v_x != nullptr;
    if (g.weight) {  // v_W += v_z^T a_{l-1}
      if (defers(l)) {  // after the VJP of layer l - 1, which writes a_{l-1}
        if (!vz_in_mm) detail::to_bf16(vz, co, R, co, vz_mm);
        pending = l;
        pending_zip = zip && fast_vjp && vz_in_mm;  // as the VJP above wrote the panels
      } else if (ly.weight_mm) {
        c10::BFloat16* a_mm = ws.buf_mm(0);
        if (l == 0) {
          detail::to_bf16(x, ldx, R, ci, a_mm);
        } else {  // the previous layer's output from its saved activation
          const Layer<T>& p = layers[l - 1];
          for (int64_t r = 0; r < R; ++r) {
            if (p.norm) {
              detail::act_row_to_bf16(saved_row(l - 1, r, ci), ci, p.ln_weight, p.ln_bias, a_mm + r * ci);
            } else {
              detail::to_bf16(act[l - 1] + r * ci, ci, 1, ci, a_mm + r * ci);
            }
          }
        }
        if (!vz_in_mm) detail::to_bf16(vz, co, R, co, vz_mm);
        detail::gemm_mm(true, false, co, ci, R, vz_mm, co, a_mm, ci, T(1), g.weight, ci);
      } else {
        const T* a = x;
        int64_t lda = ldx;
        if (l > 0) {
          const Layer<T>& p = layers[l - 1];
          lda = ci;
          if (p.norm) {
            const c10::BFloat16* h = xm_of(l - 1);
            for (int64_t r = 0; r < R; ++r) {
              detail::act_row<T>(h ? nullptr : act[l - 1] + r * ci, h ? h + r * ci : nullptr, ci, p.ln_weight,
                                 p.ln_bias, fast_ln && ci % 16 == 0, a_buf + r * ci);
            }
            a = a_buf;
          } else {
            a = act[l - 1];
          }
        }
        cpu::gemm(true, false, co, ci, R, vz, co, a, lda, T(1), g.weight, ci);
      }
    }
    if (!need_prev) break;
    // gradient of the input: v_z @ W
    T* dst = l > 0 ? ws.buf(1 - cur) : v_x;
    const int64_t ld_dst = l > 0 ? ci : ldvx;
    const T beta = (l == 0 && accumulate_vx) ? T(1) : T(0);
    if (ly.weight_mm) {
      if (!g.weight && !vz_in_mm) detail::to_bf16(vz, co, R, co, vz_mm);
      Trickle next;  // the saved rows that the next layer's VJP reads, asked for while this product runs
      if (l > 0 && fast_vjp_of(l - 1)) {
        const c10::BFloat16* xm = xm_of(l - 1);
        next.add(xm ? static_cast<const void*>(xm) : act[l - 1], R * ci * int64_t(xm ? sizeof(*xm) : sizeof(T)));
        next.add(rstd[l - 1], R * int64_t(sizeof(T)));
      }
      detail::gemm_mm(false, false, R, ci, co, vz_mm, co, ly.weight_mm, ci, beta, dst, ld_dst, ly.weight_wide,
                      ly.weight_pk_bwd, &next);
    } else {
      cpu::gemm(false, false, R, ci, co, vz, co, ly.weight, ci, beta, dst, ld_dst);
    }
    v = dst, ld_v = ld_dst;
    cur = 1 - cur;
  }
}

// Layers at least this wide on both sides get bf16 matmuls (scene_layers in tile_loops.h); narrower ones stay in T.
constexpr int64_t kMinBf16Width = 16;

}  // namespace tile
}  // namespace srn
